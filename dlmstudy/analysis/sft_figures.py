"""SFT figures: the metrics every arm shares, arms together; each arm's own SFT objective on its own panel.

A diffusion arm's SFT loss is a masked-token ELBO that also scores the EOS padding LLaDA trains on; an AR arm's is
the NLL of the answer tokens. They measure different things, so they never share an axis. What the arms share is
scored on the same held-out answers: answer NLL on the same tokens (exact for AR, the ELBO upper bound for
diffusion), SQuAD token F1 and exact match.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.lines import Line2D

from dlmstudy.analysis.figures import LINE_STYLES, MARKERS, grid, legend, palette, save

SHARED = {"answer_nll": "answer NLL, same tokens (nats/token)", "answer_f1": "answer F1 (SQuAD tokens)",
          "accuracy": "exact match of the first line"}
BOUNDED = {"answer_f1", "accuracy"}  # shares, drawn from 0


def _run_styles(names) -> dict[str, dict]:
    """SFT run name ("1 epoch", "3 epochs", or a folder name) -> line style and marker, shortest run first."""
    def key(name: str) -> tuple:
        head = name.split()[0]
        return (0, float(head), name) if head.replace(".", "", 1).isdigit() else (1, 0.0, name)
    return {name: {"ls": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)]}
            for i, name in enumerate(sorted(set(names), key=key))}


def _epoch_ticks(ax, epochs) -> None:
    """Integer SFT epoch ticks."""
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
    ax.set_xlabel("SFT epoch")


def evaluations(results: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch evaluations with the epoch rounded to the whole epoch each was made after."""
    if results.empty or "epoch" not in results:
        return pd.DataFrame()
    return results.dropna(subset=["epoch"]).assign(epoch=lambda f: f["epoch"].round().astype(int))


def sft_shared(results: pd.DataFrame, path: Path) -> Path | None:
    """Each shared metric (answer NLL, answer F1, exact match) against SFT epoch, one panel each, every arm on it;
    None when no evaluation recorded one."""
    evals = evaluations(results)
    metrics = [m for m in SHARED if m in evals and evals[m].notna().any()]
    if not metrics:
        return None
    colours, styles = palette(evals["arm"]), _run_styles(evals["sft"])
    fig, axes = grid(len(metrics), width=4.2, height=3.3, wrap=3)
    for ax, metric in zip(axes, metrics):
        for (arm, name), rows in evals.dropna(subset=[metric]).groupby(["arm", "sft"]):
            rows = rows.sort_values("epoch")
            ax.plot(rows["epoch"], rows[metric], color=colours[arm], ms=5, **styles[name])
        if metric in BOUNDED:
            top = max(0.05, float(evals[metric].max()) * 1.15)
            ax.set_ylim(-0.04 * top, top)  # from 0, with room to see a line lying at 0
        ax.set_ylabel(SHARED[metric], fontsize=8)
        ax.set_title(metric, fontsize=9)
        _epoch_ticks(ax, evals["epoch"])
    legend(fig, colours, {f"SFT run: {name}": style for name, style in styles.items()})
    return save(fig, path)


def sft_own_objectives(curves: pd.DataFrame, results: pd.DataFrame, path: Path) -> Path | None:
    """One panel per arm: its SFT training loss against epoch (lines) and its validation loss after each epoch
    (points), both its own objective; None without either."""
    evals = evaluations(results)
    has_curve = len(curves) and {"epoch", "loss"} <= set(curves.columns)
    has_val = len(evals) and "val_loss" in evals and evals["val_loss"].notna().any()
    if not has_curve and not has_val:
        return None
    arms = sorted(set(curves["arm"] if has_curve else []) | set(evals["arm"] if has_val else []))
    names = list(curves["sft"] if has_curve else []) + list(evals["sft"] if has_val else [])
    colours, styles = palette(arms), _run_styles(names)
    fig, axes = grid(len(arms), width=4.4, height=3.3, wrap=3)
    epochs = []
    for ax, arm in zip(axes, arms):
        if has_curve:
            for name, curve in curves[(curves["arm"] == arm)].dropna(subset=["loss", "epoch"]).groupby("sft"):
                ax.plot(curve["epoch"], curve["loss"], color=colours[arm], lw=1, alpha=0.6, ls=styles[name]["ls"])
                epochs += [curve["epoch"].max()]
        if has_val:
            for name, rows in evals[evals["arm"] == arm].dropna(subset=["val_loss"]).groupby("sft"):
                ax.plot(rows["epoch"], rows["val_loss"], color=colours[arm], ms=6, mec="black", ls="none",
                        marker=styles[name]["marker"])
                epochs += list(rows["epoch"])
        ax.set_title(f"{arm}: its own SFT objective", fontsize=9)
        ax.set_ylabel("SFT loss (nats/token)", fontsize=8)
        _epoch_ticks(ax, [0, *epochs] if epochs else [0, 1])
    extra = [Line2D([], [], color="0.4", lw=1, label="training loss"),
             Line2D([], [], color="0.4", marker="o", mec="black", ls="none", label="validation loss after an epoch")]
    legend(fig, colours, {f"SFT run: {name}": style for name, style in styles.items()}, extra)
    return save(fig, path)
