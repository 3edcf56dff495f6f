"""Figures of a study (seaborn, written as PNG beside the report); each returns None when its data is absent."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dlmstudy.analysis.paired import reference_setting  # noqa: E402
from dlmstudy.study.plan import short_count  # noqa: E402

LOSS_LABEL = "validation loss (nats/token)"
LEVELS_NOTE = "AR: exact NLL; diffusion: ELBO upper bound (levels not comparable across arms)"
Z = 1.96


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _palette(arms) -> dict:
    arms = sorted(set(arms))
    return dict(zip(arms, sns.color_palette("colorblind", len(arms))))


def _grid(n: int, width: float = 4.2, height: float = 3.4, wrap: int = 4):
    cols = min(n, wrap)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def setting_label(unique_tokens: float, epochs: float, size: str = "") -> str:
    """'U=23.2k, R=4.24' (plus the model size when given) for titles and legends."""
    return f"U={short_count(unique_tokens)}, R={epochs:.3g}" + (f", {size}" if size else "")


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


def _sizes_vary(frame: pd.DataFrame) -> bool:
    return "size" in frame and frame["size"].nunique() > 1


def loss_vs_tokens(scalars: pd.DataFrame, path: Path) -> Path | None:
    """Validation loss against tokens seen, one panel per data setting (U, R), one line per arm (and size);
    the band is ±1.96 Monte-Carlo standard errors of the diffusion ELBO."""
    if scalars.empty or "val_loss" not in scalars or "tokens_seen" not in scalars:
        return None
    df = scalars.dropna(subset=["val_loss", "tokens_seen", "unique_tokens"]).sort_values("tokens_seen")
    if df.empty:
        return None
    df = df.assign(setting=[setting_label(u, r) for u, r in zip(df["unique_tokens"], df["epochs"])])
    settings = sorted(df["setting"].unique(), key=lambda s: (df.loc[df["setting"] == s, "unique_tokens"].iloc[0], s))
    colours = _palette(df["arm"])
    fig, axes = _grid(len(settings))
    for ax, setting in zip(axes, settings):
        for _, run in df[df["setting"] == setting].groupby("run_id"):
            arm = run["arm"].iloc[0]
            label = f"{arm} {run['size'].iloc[0]}" if _sizes_vary(df) else arm
            ax.plot(run["tokens_seen"], run["val_loss"], marker="o", ms=3, color=colours[arm], label=label)
            if "val_loss_stderr" in run and run["val_loss_stderr"].fillna(0).gt(0).any():
                band = Z * run["val_loss_stderr"].fillna(0)
                ax.fill_between(run["tokens_seen"], run["val_loss"] - band, run["val_loss"] + band,
                                color=colours[arm], alpha=0.2, lw=0)
        ax.set_title(setting)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(LOSS_LABEL)
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
        ax.legend(handles.values(), handles.keys(), fontsize=8)
    fig.suptitle(f"Validation loss during training, on {set_label(df, 'best_val_set')} ({LEVELS_NOTE})", fontsize=10)
    return _save(fig, path)


def loss_vs_epochs(runs: pd.DataFrame, path: Path) -> Path | None:
    """Final and best validation loss against epochs (log x), lines at fixed U (or at fixed total tokens when
    no U was repeated at several epoch counts); error bars ±1.96 MC standard errors; AR minima starred."""
    if runs.empty or runs["epochs"].nunique() < 2:
        return None
    runs = runs.assign(model=[size or short_count(n)
                              for size, n in zip(runs["size"].fillna(""), runs["params_non_embedding"])])
    by = "unique_tokens" if runs.groupby(["arm", "model", "unique_tokens"])["epochs"].nunique().max() > 1 else "tokens"
    colours = _palette(runs["arm"])
    styles = dict(zip(sorted(runs[by].unique()), ["-", "--", ":", "-."] * 8))
    markers = dict(zip(sorted(runs["model"].unique()), "osD^v<>p" * 4))  # one marker per model size
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, column, title in ((axes[0], "final_val_loss", f"final, on {set_label(runs, 'final_val_set')}"),
                              (axes[1], "best_val_loss", f"best, on {set_label(runs, 'best_val_set')}")):
        starred = set()  # epoch counts whose AR minimum is already labelled on this panel
        for (arm, model, key), line in runs.groupby(["arm", "params_non_embedding", by]):
            line_model = line["model"].iloc[0]
            line = line.groupby("epochs", as_index=False).agg(  # replicate seeds: their mean
                {column: "mean", "final_val_loss_stderr": "mean", "objective": "first"})
            label = (f"{arm}{' ' + line_model if runs['model'].nunique() > 1 else ''}, "
                     f"{'U' if by == 'unique_tokens' else 'D'}={short_count(key)}")
            err = Z * line["final_val_loss_stderr"].fillna(0) if column == "final_val_loss" else None
            ax.errorbar(line["epochs"], line[column], yerr=err, marker=markers[line_model], ms=4, capsize=2,
                        color=colours[arm], ls=styles[key], label=label)
            if line["objective"].iloc[0] == "ar" and len(line) > 1:
                best = line.loc[line[column].idxmin()]
                ax.plot(best["epochs"], best[column], marker="*", ms=15, color=colours[arm], mec="black", ls="none")
                if best["epochs"] not in starred:
                    starred.add(best["epochs"])
                    ax.annotate(f"AR min: R={best['epochs']:.3g}", (best["epochs"], best[column]),
                                textcoords="offset points", xytext=(5, 8), fontsize=8)
        _log_x(ax, runs["epochs"])
        ax.set_xlabel("epochs (log scale)")
        ax.set_ylabel(LOSS_LABEL)
        ax.set_title(f"{title}", fontsize=9)
    axes[1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(LEVELS_NOTE, fontsize=9)
    return _save(fig, path)


def pareto_frontier(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not beaten by any row with at most the same x (lowest y so far as x grows)."""
    ordered = frame.sort_values([x, y])
    return ordered[ordered[y] < ordered[y].cummin().shift(fill_value=np.inf)]


def loss_vs_flops(runs: pd.DataFrame, path: Path) -> Path | None:
    """Final validation loss (one set for every run) against training compute C = 6·N·D (N non-embedding
    parameters), with each arm's Pareto frontier (the lowest loss reached at or below each compute)."""
    if runs.empty or "flops" not in runs:
        return None
    df = runs.dropna(subset=["final_val_loss", "flops"])
    if df.empty:
        return None
    colours = _palette(df["arm"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm, group in df.groupby("arm"):
        ax.scatter(group["flops"], group["final_val_loss"], color=colours[arm], alpha=0.6, s=25, label=arm)
        front = pareto_frontier(group, "flops", "final_val_loss")
        ax.step(front["flops"], front["final_val_loss"], where="post", color=colours[arm], lw=1.5,
                label=f"{arm} frontier")
    _log_x(ax, df["flops"])
    ax.set_xlabel("training FLOPs  C = 6·N·D  (N non-embedding)")
    ax.set_ylabel("final " + LOSS_LABEL)
    ax.legend(fontsize=8)
    ax.set_title(f"on {set_label(df, 'final_val_set')}; {LEVELS_NOTE}", fontsize=8)
    return _save(fig, path)


def params_epochs_heatmap(runs: pd.DataFrame, path: Path) -> Path | None:
    """Final validation loss over model size × epochs, one panel per arm and U that has several of each."""
    if runs.empty:
        return None
    spread = runs.groupby(["arm", "unique_tokens"]).agg(sizes=("params_non_embedding", "nunique"),
                                                         epochs=("epochs", "nunique"))
    panels = sorted(spread[(spread["sizes"] > 1) & (spread["epochs"] > 1)].index)
    if not panels:
        return None
    fig, axes = _grid(len(panels), width=4.6, height=3.6, wrap=3)
    for ax, (arm, unique) in zip(axes, panels):
        group = runs[(runs["arm"] == arm) & (runs["unique_tokens"] == unique)]
        table = group.pivot_table(index="params_non_embedding", columns=group["epochs"].round(3),
                                  values="final_val_loss")
        table = table.sort_index(ascending=False)
        table.index = [short_count(n) for n in table.index]
        table.columns = [f"{r:g}" for r in table.columns]
        sns.heatmap(table, annot=True, fmt=".3f", cmap="viridis_r", ax=ax, cbar=False, annot_kws={"fontsize": 7})
        ax.set_title(f"{arm}, U={short_count(unique)}")
        ax.set_xlabel("epochs")
        ax.set_ylabel("non-embedding params")
    fig.suptitle(f"Final validation loss on {set_label(runs, 'final_val_set')} (lower is better; {LEVELS_NOTE})",
                 fontsize=9)
    return _save(fig, path)


def accuracy_by_arm(reversal: pd.DataFrame, path: Path) -> Path | None:
    """Exact-match accuracy per setting, arm and direction with Wilson 95% intervals (from claims.reversal_table)."""
    if reversal.empty:
        return None
    df = reversal.assign(setting=[setting_label(u, r, s if reversal["size"].nunique() > 1 else "")
                                  for u, r, s in zip(reversal["unique_tokens"], reversal["epochs"], reversal["size"])])
    directions = sorted(df["direction"].unique())
    settings = sorted(df["setting"].unique())
    arms = sorted(df["arm"].unique())
    colours = _palette(arms)
    width = 0.8 / len(arms)
    panel_width = max(3.0, 0.8 * len(settings) * len(arms))
    fig, axes = plt.subplots(1, len(directions), figsize=(panel_width * len(directions), 3.6), squeeze=False,
                             sharey=True)
    for ax, direction in zip(axes[0], directions):
        for i, arm in enumerate(arms):
            rows = df[(df["direction"] == direction) & (df["arm"] == arm)].set_index("setting").reindex(settings)
            x = np.arange(len(settings)) + (i - (len(arms) - 1) / 2) * width
            err = np.vstack([rows["accuracy"] - rows["ci_lo"], rows["ci_hi"] - rows["accuracy"]])
            ax.bar(x, rows["accuracy"], width, yerr=err, capsize=3, color=colours[arm], label=arm)
        ax.set_xticks(np.arange(len(settings)), settings, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{direction} questions")
        ax.set_ylabel("exact-match accuracy")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _run_labels(runs: pd.DataFrame | None) -> dict[str, str]:
    """run_id -> "arm, U=..., R=..." for panel titles (empty without the runs table)."""
    if runs is None or not len(runs):
        return {}
    return {r.run_id: f"{r.arm}, {setting_label(r.unique_tokens, r.epochs)}" for r in runs.itertuples()}


def _sampler_frame(grid: pd.DataFrame) -> pd.DataFrame:
    """A copy of a sampler grid with a boolean `compiled` and an integer `batch_size` column (grids written before
    they existed ran eager, at one batch size: 0 here)."""
    return grid.assign(compiled=grid["compiled"].fillna(False).astype(bool) if "compiled" in grid else False,
                       batch_size=grid["batch_size"].fillna(0).astype(int) if "batch_size" in grid else 0)


def _sampler_title(run_label: str, batch_size: int, detail: str) -> str:
    """A sampler panel's title: the run, its batch size where the grid recorded one, and the panel's detail."""
    return run_label + (f", batch {batch_size}" if batch_size else "") + f"\n{detail}"


def sampler_heatmaps(grid: pd.DataFrame, value: str, path: Path, runs: pd.DataFrame | None = None) -> Path | None:
    """`value` (accuracy or tokens_per_s) over steps × block length, one panel per run, batch size, threshold and
    compiled."""
    if grid.empty or value not in grid:
        return None
    df = _sampler_frame(grid)
    df["threshold"] = grid["threshold"].map(lambda t: "off" if pd.isna(t) else f"{t:g}")
    labels = _run_labels(runs)
    keys = ["run_id", "batch_size", "threshold", "compiled"]
    panels = sorted(df.groupby(keys).groups)
    scale = df.groupby("run_id")[value].agg(["min", "max"]).apply(tuple, axis=1)  # one colour scale per run
    fig, axes = _grid(len(panels), width=4.4, height=3.6, wrap=3)
    for ax, panel in zip(axes, panels):
        run_id, batch_size, threshold, is_compiled = panel
        cell = df[(df[keys] == pd.Series(panel, index=keys)).all(axis=1)]
        table = cell.pivot_table(index="steps", columns="block_length", values=value)
        sns.heatmap(table, annot=True, fmt=".2f" if value == "accuracy" else ".3g", cmap="viridis", ax=ax, cbar=False,
                    annot_kws={"fontsize": 7}, vmin=scale[run_id][0], vmax=scale[run_id][1])
        ax.set_title(_sampler_title(labels.get(run_id, run_id), batch_size,
                                    f"threshold {threshold}" + (", compiled" if is_compiled else "")), fontsize=8)
    fig.suptitle(f"Sampler grid: {value.replace('tokens_per_s', 'tokens/s')}", fontsize=10)
    return _save(fig, path)


def sampler_tradeoff(grid: pd.DataFrame, path: Path, runs: pd.DataFrame | None = None) -> Path | None:
    """Each sampler setting's speed-up over the plain sampler at its batch size (x, log) against its accuracy
    difference, paired probe by probe (y, +-1.96 paired standard errors), one panel per run and batch size:
    settings whose bar crosses 0 are equal within noise."""
    if grid.empty or "accuracy_diff_se" not in grid:
        return None
    labels = _run_labels(runs)
    df = _sampler_frame(grid).dropna(subset=["accuracy_diff_se"])
    panels = sorted(df.groupby(["run_id", "batch_size"]).groups)
    thresholds = sorted(set(df["threshold"].dropna()))
    colours = dict(zip(thresholds, sns.color_palette("viridis", len(thresholds))))
    fig, axes = _grid(len(panels), width=5.0, height=3.8, wrap=2)
    for ax, (run_id, batch_size) in zip(axes, panels):
        rows = df[(df["run_id"] == run_id) & (df["batch_size"] == batch_size)].reset_index(drop=True)
        settings = [(r.steps, r.block_length, None if pd.isna(r.threshold) else r.threshold, r.compiled)
                    for r in rows.itertuples()]
        ref = rows.iloc[reference_setting(settings)]
        for r in rows.itertuples():
            speedup, delta = r.tokens_per_s / ref["tokens_per_s"], r.accuracy - ref["accuracy"]
            colour = "tab:grey" if pd.isna(r.threshold) else colours[r.threshold]
            ax.errorbar(speedup, delta, yerr=1.96 * r.accuracy_diff_se, fmt="o", color=colour, capsize=2,
                        markerfacecolor=colour if r.compiled else "white")
            threshold = "" if pd.isna(r.threshold) else f" τ{r.threshold:g}"
            ax.annotate(f"{r.steps}/{r.block_length}{threshold}", (speedup, delta), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="black", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("speed-up over the plain sampler (tokens/s)")
        ax.set_ylabel("accuracy - plain (paired, 95%)")
        ax.set_title(_sampler_title(labels.get(run_id, run_id), batch_size,
                                    "filled: compiled; grey: fixed schedule, colours: thresholds τ"), fontsize=8)
    return _save(fig, path)


def sft_curves(curves: pd.DataFrame, results: pd.DataFrame, path: Path) -> Path | None:
    """SFT training loss against step per arm and SFT run, and each per-epoch result metric against epoch."""
    metrics = [c for c in results.columns if c not in ("epoch", "step") and ("loss" in c or "nll" in c or "acc" in c or "f1" in c)
               and pd.api.types.is_numeric_dtype(results[c])] if len(results) else []
    has_curve = len(curves) and {"step", "loss"} <= set(curves.columns)
    if not has_curve and not metrics:
        return None
    arms = set(curves["arm"]) if has_curve else set()
    colours = _palette(arms | (set(results["arm"]) if len(results) else set()))
    fig, axes = _grid(bool(has_curve) + len(metrics), wrap=3)
    panels = iter(axes)
    if has_curve:
        ax = next(panels)
        for (arm, name), curve in curves.dropna(subset=["loss"]).groupby(["arm", "sft"]):
            ax.plot(curve["step"], curve["loss"], color=colours[arm], label=f"{arm}: {name}", alpha=0.8)
        ax.set_xlabel("SFT step")
        ax.set_ylabel("training loss")
        ax.set_title("SFT training loss")
        ax.legend(fontsize=7)
    for metric in metrics:
        ax = next(panels)
        for (arm, name), rows in results.dropna(subset=[metric]).groupby(["arm", "sft"]):
            rows = rows.sort_values("epoch")
            ax.plot(rows["epoch"], rows[metric], marker="o", color=colours[arm], label=f"{arm}: {name}")
        ax.set_xlabel("SFT epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"SFT {metric} per epoch")
        ax.legend(fontsize=7)
    return _save(fig, path)
