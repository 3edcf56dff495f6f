"""The report's headline figure: what repeated data was worth to each arm against epochs at fixed U, with the
papers' expectation drawn in.

Preferred: D_eq/D (effective data, within each arm, so the diffusion ELBO's slack cancels) against epochs, with
the ratio the papers' laws give at R_D* = 15 (AR, Muennighoff et al.) and 500 (diffusion, Prabhudesai et al.).
Without a one-epoch curve to read D_eq from: each arm's final loss against epochs, with the papers' usable
epochs (≈ 4 for AR, ≈ 100 for diffusion) marked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from dlmstudy.analysis.claims import PAPER
from dlmstudy.analysis.figures import (LEVELS_NOTE, LOSS_LABEL, Z, epoch_axis, fixed_u_lines, grid, legend,
                                       loss_epoch_panel, palette, save, size_order, size_styles)
from dlmstudy.analysis.scaling import effective_data
from dlmstudy.study.plan import short_count

EXPECTED = {"ar": ("AR law, R_D* = 15 (Muennighoff et al.)", "--"),
            "mdm": ("diffusion law, R_D* = 500 (Prabhudesai et al.)", ":")}


def _bound(reads: str) -> float:
    """The number of a bound as the effective-data table reads it ("> 0.25", "< 0.0156")."""
    return float(reads.strip("<> "))


def effective_data_vs_epochs(effective: pd.DataFrame, sizes: list[str], path: Path) -> Path | None:
    """D_eq/D of every repeated-data cell against its epochs, one panel per U; a filled point with its 95% interval
    where the loss lies on the arm's one-epoch curve, an open triangle for a bound beyond the curve's ends. Arms
    are set a few percent apart in epochs so that equal values stay visible.
    `sizes`: the model sizes from smallest to largest (their line styles)."""
    if effective.empty:
        return None
    colours = palette(effective["arm"])
    styles = size_styles([s for s in sizes if s in set(effective["size"])])
    uniques = sorted(effective["unique_tokens"].unique())
    fig, axes = grid(len(uniques), width=5.2, height=3.9, wrap=3)
    for ax, unique in zip(axes, uniques):
        panel = effective[effective["unique_tokens"] == unique]
        epochs = np.geomspace(1.0, panel["epochs"].max() * 1.3, 200)
        for objective, (label, ls) in EXPECTED.items():
            r_star = PAPER["R_D_star"][objective]
            ax.plot(epochs, effective_data(unique, unique * epochs, r_star) / (unique * epochs), color="black",
                    ls=ls, lw=1.2)
        ax.axhline(1.0, color="0.7", lw=0.8)
        arms = sorted(panel["arm"].unique())
        for (arm, size), line in panel.groupby(["arm", "size"], sort=True):
            dodge = 1.0 + 0.05 * (arms.index(arm) - (len(arms) - 1) / 2)  # arms side by side, not on top
            line = line.sort_values("epochs").assign(epochs=lambda f: f["epochs"] * dodge)
            style = styles.get(size, {"ls": "-", "marker": "o"})
            on_curve = line[np.isfinite(line["D_eq/D"]) & (line["D_eq/D"] > 0)]
            shown = line.assign(y=[r if np.isfinite(r) and r > 0 else _bound(reads)
                                   for r, reads in zip(line["D_eq/D"], line["D_eq/D (reads)"])])
            ax.plot(shown["epochs"], shown["y"], color=colours[arm], ls=style["ls"], lw=1.2)
            low = (on_curve["D_eq/D"] - on_curve["lo"]).clip(lower=0)
            high = (on_curve["hi"].clip(upper=10.0) - on_curve["D_eq/D"]).clip(lower=0)
            ax.errorbar(on_curve["epochs"], on_curve["D_eq/D"], yerr=[low, high], ls="none", capsize=2, ms=5,
                        marker=style["marker"], color=colours[arm])
            for _, row in shown[~shown.index.isin(on_curve.index)].iterrows():
                ax.plot(row["epochs"], row["y"], ls="none", ms=8, mfc="white", mec=colours[arm], mew=1.5,
                        marker="^" if row["D_eq/D"] > 0 else "v")
        ax.set_yscale("log")
        ax.set_ylim(min(0.5, _shown_min(panel) / 2), 2.0)
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        epoch_axis(ax, pd.concat([pd.Series([1.0]), panel["epochs"]]))
        ax.set_ylabel("D_eq / D  (repeated data's worth in fresh tokens)", fontsize=8)
        ax.set_title(f"U={short_count(unique)} unique tokens", fontsize=9)
    extra = [Line2D([], [], color="black", ls=ls, label=label) for label, ls in EXPECTED.values()]
    extra += [Line2D([], [], color="0.4", marker="^", mfc="white", ls="none", label="bound: loss beyond the "
                     "one-epoch curve")]
    legend(fig, colours, styles, extra)
    return save(fig, path)


def _shown_min(panel: pd.DataFrame) -> float:
    """The smallest D_eq/D a panel draws (a point or a bound)."""
    values = [r if np.isfinite(r) and r > 0 else _bound(reads) for r, reads in
              zip(panel["D_eq/D"], panel["D_eq/D (reads)"])]
    return float(min(values + list(panel["lo"][panel["lo"] > 0])))


def loss_vs_epochs_marked(cells: pd.DataFrame, path: Path) -> Path | None:
    """Each arm's final loss (±1.96 s.e.) against epochs, one panel per U trained at several epoch counts (else per
    total tokens, else per U), with the papers' usable epochs marked: ≈ 4 (AR) and ≈ 100 (diffusion)."""
    if cells.empty:
        return None
    by, keys = fixed_u_lines(cells)
    keys = keys or sorted(cells[by].unique())
    colours, styles = palette(cells["arm"]), size_styles(size_order(cells, "params"))
    fig, axes = grid(len(keys), width=5.0, height=3.8, wrap=3)
    usable = PAPER["usable_epochs"]
    for ax, key in zip(axes, keys):
        panel = cells[cells[by] == key]
        loss_epoch_panel(ax, panel, "loss", colours, styles, err="se")
        for objective, (label, ls) in EXPECTED.items():
            ax.axvline(usable[objective], color="black", ls=ls, lw=1.2)
        epoch_axis(ax, pd.concat([panel["epochs"], pd.Series(list(usable.values()))]))
        ax.set_xlim(0.8, max(panel["epochs"].max(), max(usable.values())) * 1.3)
        ax.set_ylabel("final " + LOSS_LABEL)
        ax.set_title(f"{'U' if by == 'unique_tokens' else 'D'}={short_count(key)}"
                     f"{' unique tokens' if by == 'unique_tokens' else ' tokens'}", fontsize=9)
    extra = [Line2D([], [], color="black", ls=EXPECTED[objective][1],
                    label=f"papers: {name} usable ≈ {usable[objective]:g} epochs")
             for objective, name in (("ar", "AR"), ("mdm", "diffusion"))]
    legend(fig, colours, styles, extra)
    fig.suptitle(f"{LEVELS_NOTE}; error bars ±{Z} s.e.", fontsize=9)
    return save(fig, path)
