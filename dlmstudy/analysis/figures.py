"""Figures of a study (matplotlib/seaborn, written as PNG beside the report); each returns None when its data is
absent.

One look across every figure: an arm is a colour, a model size a line style and marker; panels run in numeric
order (U, then epochs); each figure has one legend, outside the data; heatmaps of one figure share one colour
scale and one colour bar; epoch axes tick at the epoch counts trained; error bars wherever an interval exists.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from dlmstudy.analysis.paired import reference_setting  # noqa: E402
from dlmstudy.study.plan import short_count  # noqa: E402

LOSS_LABEL = "validation loss (nats/token)"
LEVELS_NOTE = "AR: exact NLL; diffusion: ELBO upper bound"
Z = 1.96
LINE_STYLES = ["-", "--", ":", "-."]
MARKERS = "osD^v<>p"


def save(fig, path: Path) -> Path:
    """Write the figure (tight around its outside legend) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def palette(arms) -> dict:
    """Arm -> colour, the same arm the same colour in every figure of a study (sorted names)."""
    arms = sorted(set(arms))
    return dict(zip(arms, sns.color_palette("colorblind", max(len(arms), 1))))


def size_order(frame: pd.DataFrame, params: str = "params_non_embedding") -> list[str]:
    """Model-size labels from smallest to largest (by non-embedding parameters where known)."""
    if "size" not in frame or frame.empty:
        return []
    if params in frame:
        return list(frame.groupby("size")[params].mean().sort_values().index)
    return sorted(frame["size"].dropna().unique())


def size_styles(sizes: list[str]) -> dict[str, dict]:
    """Size -> line style and marker, in size order."""
    return {size: {"ls": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)]}
            for i, size in enumerate(sizes)}


def legend(fig, colours: dict, styles: dict | None = None, extra: list | None = None) -> None:
    """The figure's one legend, right of its panels: arms (colour), sizes (style) when there are several, extras."""
    handles = [Line2D([], [], color=c, lw=2.5, label=arm) for arm, c in colours.items()]
    if styles and len(styles) > 1:
        handles += [Line2D([], [], color="0.35", label=size, **style) for size, style in styles.items()]
    handles += extra or []
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False, fontsize=8)


def grid(n: int, width: float = 4.2, height: float = 3.4, wrap: int = 4, **kwargs):
    """n panels in rows of at most `wrap`; the unused axes hidden."""
    cols = min(max(n, 1), wrap)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kwargs)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def setting_label(unique_tokens: float, epochs: float, size: str = "") -> str:
    """'U=23.2k, R=4.24' (plus the model size when given) for titles and legends."""
    return f"U={short_count(unique_tokens)}, R={epochs:.3g}" + (f", {size}" if size else "")


def epoch_axis(ax, epochs, label: str = "epochs (log scale)") -> None:
    """Log epoch axis ticked at the epoch counts trained (plain numbers, integers where they are)."""
    ticks = sorted({float(e) for e in pd.Series(epochs).dropna()})
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.6, ticks[0] * 1.6)
    ax.set_xlabel(label)


def _log_x(ax, values) -> None:
    """Log x axis; under one decade, plain tick labels instead of matplotlib's crowded powers of ten."""
    ax.set_xscale("log")
    values = pd.Series(values).dropna()
    if len(values) and values.max() < 10 * values.min():
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)


def set_label(frame: pd.DataFrame, column: str) -> str:
    """The validation set a column of losses was scored on (`best_val_set`, `final_val_set`), or a warning."""
    labels = sorted(frame[column].dropna().unique()) if column in frame else []
    return labels[0] if len(labels) == 1 else "set not recorded" if not labels else "sets differ between runs"


def loss_vs_tokens(scalars: pd.DataFrame, path: Path) -> Path | None:
    """Validation loss against tokens seen, one panel per data setting (U, then R, in numeric order), one line per
    run; the band is ±1.96 Monte-Carlo standard errors of the diffusion ELBO."""
    if scalars.empty or "val_loss" not in scalars or "tokens_seen" not in scalars:
        return None
    df = scalars.dropna(subset=["val_loss", "tokens_seen", "unique_tokens"]).sort_values("tokens_seen")
    if df.empty:
        return None
    settings = sorted({(float(u), float(r)) for u, r in zip(df["unique_tokens"], df["epochs"])})
    colours, styles = palette(df["arm"]), size_styles(size_order(df))
    fig, axes = grid(len(settings))
    banded = False
    for ax, (unique, epochs) in zip(axes, settings):
        panel = df[(df["unique_tokens"] == unique) & (df["epochs"] == epochs)]
        for _, run in panel.groupby("run_id"):
            arm, style = run["arm"].iloc[0], styles.get(run["size"].iloc[0], {"ls": "-", "marker": "o"})
            ax.plot(run["tokens_seen"], run["val_loss"], ms=3, color=colours[arm], **style)
            if "val_loss_stderr" in run and run["val_loss_stderr"].fillna(0).gt(0).any():
                band, banded = Z * run["val_loss_stderr"].fillna(0), True
                ax.fill_between(run["tokens_seen"], run["val_loss"] - band, run["val_loss"] + band,
                                color=colours[arm], alpha=0.2, lw=0)
        ax.set_title(setting_label(unique, epochs), fontsize=9)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(LOSS_LABEL)
    extra = [matplotlib.patches.Patch(color="0.6", alpha=0.4, label="±1.96 MC s.e. (ELBO)")] if banded else []
    legend(fig, colours, styles, extra)
    fig.suptitle(f"Validation loss during training, on {set_label(df, 'best_val_set')} ({LEVELS_NOTE})", fontsize=9)
    return save(fig, path)


def fixed_u_lines(table: pd.DataFrame) -> tuple[str, list[float]]:
    """How loss-against-epochs lines are joined: ("unique_tokens", the U values trained at several epoch counts
    by some arm and size), else ("tokens", the same for total tokens); empty when no line has two points."""
    for by in ("unique_tokens", "tokens"):
        counts = table.groupby(["arm", "size", by])["epochs"].nunique() if len(table) else pd.Series(dtype=int)
        keys = sorted({float(key[-1]) for key, n in counts.items() if n > 1})
        if keys:
            return by, keys
    return "unique_tokens", []


def loss_epoch_panel(ax, table: pd.DataFrame, value: str, colours: dict, styles: dict, err: str | None = None,
                     star_ar: bool = False) -> None:
    """One arm × size line of `value` against epochs per arm and size of `table` (one U or one total), with ±1.96
    `err` error bars; `star_ar` stars each AR line's lowest point."""
    for (arm, size), line in table.groupby(["arm", "size"], sort=True):
        line = line.sort_values("epochs")
        yerr = Z * line[err].fillna(0) if err else None
        ax.errorbar(line["epochs"], line[value], yerr=yerr, ms=4, capsize=2, color=colours[arm],
                    **styles.get(size, {"ls": "-", "marker": "o"}))
        if star_ar and line["objective"].iloc[0] == "ar" and len(line) > 1:
            best = line.loc[line[value].idxmin()]
            ax.plot(best["epochs"], best[value], marker="*", ms=14, color=colours[arm], mec="black", ls="none")


STAR = Line2D([], [], marker="*", ms=12, color="0.6", mec="black", ls="none", label="AR line's lowest loss")


def loss_vs_epochs(cells: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path | None:
    """Final validation loss (cell means, ±1.96 s.e.) and best loss during training against epochs, one panel
    each per U trained at several epoch counts (else per total tokens); AR minima starred."""
    if cells.empty or runs.empty:
        return None
    by, keys = fixed_u_lines(cells)
    if not keys:
        return None
    best = (runs.dropna(subset=["best_val_loss"]).groupby(["arm", "size", "unique_tokens", "tokens"], as_index=False)
            .agg(epochs=("epochs", "mean"), best_val_loss=("best_val_loss", "mean"), objective=("objective", "first")))
    colours, styles = palette(cells["arm"]), size_styles(size_order(cells, "params"))
    name = "U" if by == "unique_tokens" else "D"
    panels = [("final", key) for key in keys] + [("best", key) for key in keys if len(best)]
    fig, axes = grid(len(panels), width=4.6, height=3.6, wrap=4)
    for ax, (kind, key) in zip(axes, panels):
        if kind == "final":
            loss_epoch_panel(ax, cells[cells[by] == key], "loss", colours, styles, err="se", star_ar=True)
            ax.set_title(f"final loss, {name}={short_count(key)}\non {set_label(runs, 'final_val_set')}", fontsize=8)
        else:
            loss_epoch_panel(ax, best[best[by] == key], "best_val_loss", colours, styles, star_ar=True)
            ax.set_title(f"best loss, {name}={short_count(key)}\non {set_label(runs, 'best_val_set')}", fontsize=8)
        epoch_axis(ax, cells.loc[cells[by] == key, "epochs"])
        ax.set_ylabel(LOSS_LABEL)
    legend(fig, colours, styles, [STAR])
    fig.suptitle(LEVELS_NOTE, fontsize=9)
    return save(fig, path)


def pareto_frontier(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not beaten by any row with at most the same x (lowest y so far as x grows)."""
    ordered = frame.sort_values([x, y])
    return ordered[ordered[y] < ordered[y].cummin().shift(fill_value=np.inf)]


def loss_vs_flops(cells: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path | None:
    """Final validation loss (cell means ±1.96 s.e., one set for every run) against training compute
    C = 6·N·D (N non-embedding parameters), with each arm's Pareto frontier."""
    if cells.empty or "flops" not in cells:
        return None
    df = cells.dropna(subset=["loss", "flops"])
    if df.empty:
        return None
    colours, styles = palette(df["arm"]), size_styles(size_order(df, "params"))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (arm, size), group in df.groupby(["arm", "size"]):
        ax.errorbar(group["flops"], group["loss"], yerr=Z * group["se"], ls="none", ms=5, capsize=2, alpha=0.8,
                    color=colours[arm], marker=styles.get(size, {"marker": "o"})["marker"])
    for arm, group in df.groupby("arm"):
        front = pareto_frontier(group, "flops", "loss")
        ax.step(front["flops"], front["loss"], where="post", color=colours[arm], lw=1.5)
    _log_x(ax, df["flops"])
    ax.set_xlabel("training FLOPs  C = 6·N·D  (N non-embedding)")
    ax.set_ylabel("final " + LOSS_LABEL)
    markers = {size: {"marker": style["marker"], "ls": "none"} for size, style in styles.items()}
    legend(fig, colours, markers)
    ax.set_title(f"on {set_label(runs, 'final_val_set')}; {LEVELS_NOTE}", fontsize=8)
    return save(fig, path)


def params_epochs_heatmap(runs: pd.DataFrame, diverged: pd.DataFrame, path: Path) -> Path | None:
    """Final validation loss over model size × epochs, one panel per arm and U with several of each, on one colour
    scale; a cell whose run diverged says so, one never trained says "not run"."""
    if runs.empty:
        return None
    spread = runs.groupby(["arm", "unique_tokens"]).agg(sizes=("params_non_embedding", "nunique"),
                                                         epochs=("epochs", "nunique"))
    panels = sorted(spread[(spread["sizes"] > 1) & (spread["epochs"] > 1)].index)
    if not panels:
        return None
    scale = Normalize(runs["final_val_loss"].min(), runs["final_val_loss"].max())
    fig, axes = grid(len(panels), width=4.4, height=3.4, wrap=3)
    gone = diverged if len(diverged) else pd.DataFrame(columns=["arm", "unique_tokens", "params_non_embedding",
                                                                "epochs"])
    for ax, (arm, unique) in zip(axes, panels):
        group = runs[(runs["arm"] == arm) & (runs["unique_tokens"] == unique)]
        lost = gone[(gone["arm"] == arm) & (gone["unique_tokens"] == unique)]
        table = pd.concat([group, lost.assign(final_val_loss=np.nan)]).pivot_table(
            index="params_non_embedding", columns="epochs", values="final_val_loss", dropna=False)
        table = table.sort_index(ascending=False).sort_index(axis=1)
        sns.heatmap(table, annot=True, fmt=".3f", cmap="viridis_r", norm=scale, ax=ax, cbar=False,
                    annot_kws={"fontsize": 7}, xticklabels=[f"{r:g}" for r in table.columns],
                    yticklabels=[short_count(n) for n in table.index])
        diverged_at = {(n, r) for n, r in zip(lost["params_non_embedding"], lost["epochs"])}
        for i, n in enumerate(table.index):
            for j, r in enumerate(table.columns):
                if np.isnan(table.loc[n, r]):
                    ax.text(j + 0.5, i + 0.5, "diverged" if (n, r) in diverged_at else "not run",
                            ha="center", va="center", fontsize=7, color="0.3")
        ax.set_title(f"{arm}, U={short_count(unique)}", fontsize=9)
        ax.set_xlabel("epochs")
        ax.set_ylabel("non-embedding params")
    fig.tight_layout()
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=scale, cmap="viridis_r"), ax=axes, shrink=0.9,
                 label=f"final {LOSS_LABEL}")
    fig.suptitle(f"Final validation loss on {set_label(runs, 'final_val_set')} (lower is better; {LEVELS_NOTE})",
                 fontsize=9, y=1.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def accuracy_by_arm(reversal: pd.DataFrame, path: Path) -> Path | None:
    """Exact-match accuracy per setting, arm and direction with Wilson 95% intervals (from claims.reversal_table)."""
    if reversal.empty:
        return None
    sizes = reversal["size"].nunique() > 1
    keys = sorted({(float(u), float(r), s) for u, r, s in
                   zip(reversal["unique_tokens"], reversal["epochs"], reversal["size"])})
    settings = [setting_label(u, r, s if sizes else "") for u, r, s in keys]
    df = reversal.assign(setting=[setting_label(u, r, s if sizes else "") for u, r, s in
                                  zip(reversal["unique_tokens"], reversal["epochs"], reversal["size"])])
    directions = sorted(df["direction"].unique())
    arms = sorted(df["arm"].unique())
    colours = palette(arms)
    width = 0.8 / len(arms)
    panel_width = max(3.0, 0.8 * len(settings) * len(arms))
    fig, axes = plt.subplots(1, len(directions), figsize=(panel_width * len(directions), 3.6), squeeze=False,
                             sharey=True)
    for ax, direction in zip(axes[0], directions):
        for i, arm in enumerate(arms):
            rows = df[(df["direction"] == direction) & (df["arm"] == arm)].set_index("setting").reindex(settings)
            x = np.arange(len(settings)) + (i - (len(arms) - 1) / 2) * width
            err = np.vstack([rows["accuracy"] - rows["ci_lo"], rows["ci_hi"] - rows["accuracy"]])
            ax.bar(x, rows["accuracy"], width, yerr=err, capsize=3, color=colours[arm])
        ax.set_xticks(np.arange(len(settings)), settings, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{direction} questions", fontsize=9)
        ax.set_ylabel("exact-match accuracy")
    legend(fig, colours)
    return save(fig, path)


def _run_labels(runs: pd.DataFrame | None) -> dict[str, str]:
    """run_id -> "arm, U=..., R=..." for panel titles (empty without the runs table)."""
    if runs is None or not len(runs):
        return {}
    return {r.run_id: f"{r.arm}, {setting_label(r.unique_tokens, r.epochs)}" for r in runs.itertuples()}


def _sampler_frame(grid_: pd.DataFrame) -> pd.DataFrame:
    """A copy of a sampler grid with a boolean `compiled` and an integer `batch_size` column (grids written before
    they existed ran eager, at one batch size: 0 here)."""
    return grid_.assign(compiled=grid_["compiled"].fillna(False).astype(bool) if "compiled" in grid_ else False,
                        batch_size=grid_["batch_size"].fillna(0).astype(int) if "batch_size" in grid_ else 0)


def _sampler_title(run_label: str, batch_size: int, detail: str) -> str:
    """A sampler panel's title: the run, its batch size where the grid recorded one, and the panel's detail."""
    return run_label + (f", batch {batch_size}" if batch_size else "") + f"\n{detail}"


def sampler_heatmaps(grid_: pd.DataFrame, value: str, path: Path, runs: pd.DataFrame | None = None) -> Path | None:
    """`value` (accuracy or tokens_per_s) over steps × block length, one panel per run, batch size, threshold (off
    first, then ascending) and compiled; one colour scale and colour bar for every panel (tokens/s on a log
    scale, as the arms differ by orders of magnitude)."""
    if grid_.empty or value not in grid_:
        return None
    df = _sampler_frame(grid_)
    df["threshold_order"] = df["threshold"].fillna(-1.0)
    labels = _run_labels(runs)
    keys = ["run_id", "batch_size", "threshold_order", "compiled"]
    panels = sorted(df.groupby(keys).groups)
    values = df[value].dropna()
    scale = (LogNorm(values[values > 0].min(), values.max()) if value == "tokens_per_s"
             else Normalize(0.0, max(values.max(), 1e-9)))
    fig, axes = grid(len(panels), width=4.0, height=3.4, wrap=3)
    for ax, panel in zip(axes, panels):
        run_id, batch_size, threshold, is_compiled = panel
        cell = df[(df[keys] == pd.Series(panel, index=keys)).all(axis=1)]
        table = cell.pivot_table(index="steps", columns="block_length", values=value)
        sns.heatmap(table, annot=True, fmt=".2f" if value == "accuracy" else ".3g", cmap="viridis", ax=ax, cbar=False,
                    annot_kws={"fontsize": 7}, norm=scale)
        detail = f"threshold {'off' if threshold < 0 else f'{threshold:g}'}" + (", compiled" if is_compiled else "")
        ax.set_title(_sampler_title(labels.get(run_id, run_id), batch_size, detail), fontsize=8)
    fig.tight_layout()
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=scale, cmap="viridis"), ax=axes,
                 shrink=0.9 if len(panels) <= 6 else 0.4, label=value.replace("tokens_per_s", "tokens/s"))
    fig.suptitle(f"Sampler grid: {value.replace('tokens_per_s', 'tokens/s')}", fontsize=10, y=1.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def sampler_tradeoff(grid_: pd.DataFrame, path: Path, runs: pd.DataFrame | None = None) -> Path | None:
    """Each sampler setting's speed-up over the plain sampler at its batch size (x, log) against its accuracy
    difference, paired probe by probe (y, ±1.96 paired standard errors), one panel per run and batch size:
    settings whose bar crosses 0 are equal within noise."""
    if grid_.empty or "accuracy_diff_se" not in grid_:
        return None
    labels = _run_labels(runs)
    df = _sampler_frame(grid_).dropna(subset=["accuracy_diff_se"])
    panels = sorted(df.groupby(["run_id", "batch_size"]).groups)
    thresholds = sorted(set(df["threshold"].dropna()))
    colours = dict(zip(thresholds, sns.color_palette("viridis", len(thresholds))))
    fig, axes = grid(len(panels), width=5.0, height=3.8, wrap=2)
    for ax, (run_id, batch_size) in zip(axes, panels):
        rows = df[(df["run_id"] == run_id) & (df["batch_size"] == batch_size)].reset_index(drop=True)
        settings = [(r.steps, r.block_length, None if pd.isna(r.threshold) else r.threshold, r.compiled)
                    for r in rows.itertuples()]
        ref = rows.iloc[reference_setting(settings)]
        for r in rows.itertuples():
            speedup, delta = r.tokens_per_s / ref["tokens_per_s"], r.accuracy - ref["accuracy"]
            colour = "tab:grey" if pd.isna(r.threshold) else colours[r.threshold]
            ax.errorbar(speedup, delta, yerr=Z * r.accuracy_diff_se, fmt="o", color=colour, capsize=2,
                        markerfacecolor=colour if r.compiled else "white")
            ax.annotate(f"{r.steps}/{r.block_length}", (speedup, delta), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0, color="black", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("speed-up over the plain sampler (tokens/s)")
        ax.set_ylabel("accuracy − plain (paired, 95%)")
        ax.set_title(_sampler_title(labels.get(run_id, run_id), batch_size, "labels: steps/block length"), fontsize=8)
    handles = [Line2D([], [], marker="o", ls="none", color="tab:grey", label="fixed schedule")]
    handles += [Line2D([], [], marker="o", ls="none", color=c, label=f"threshold τ={t:g}") for t, c in colours.items()]
    handles += [Line2D([], [], marker="o", ls="none", color="0.3", label="compiled"),
                Line2D([], [], marker="o", ls="none", color="0.3", markerfacecolor="white", label="eager")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False, fontsize=8)
    return save(fig, path)
