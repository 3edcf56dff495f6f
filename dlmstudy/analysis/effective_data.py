"""The value of repeated data as effective data: D_eq/D per cell from its arm's own one-epoch curve.

D_eq is the number of fresh tokens that would give the cell's loss at the same model size: the arm's
one-epoch cells (tokens ≤ unique tokens) at that size form a curve of loss against log D, made monotone
(the lowest loss reached with at most D fresh tokens), and D_eq is read off it by linear interpolation in
log D. D_eq/D = 1 means repeated data was worth as much as fresh data; 0.5 that half of the tokens counted.
Within an arm, so the diffusion ELBO's slack cancels: two arms are compared by their ratios, never by their
loss levels. A loss beyond the curve's ends gives a bound only (no extrapolation).

The interval draws every cell's loss (the cell's and the curve's) from N(loss, se²) with the seeded
generator, so the same runs give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dlmstudy.analysis.scaling import effective_data

DRAWS = 4000
PAPER_R_D_STAR = {"ar": 15.0, "mdm": 500.0}  # Prabhudesai et al.'s fits, for the expected ratio columns


def equivalent_tokens(curve_tokens: np.ndarray, curve_loss: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """D_eq for each loss (draws, or a scalar) given one-epoch curves (curve_loss: one curve, or one per draw;
    points ordered by curve_tokens ascending): interpolated in log D on the monotone curve; a loss above the
    curve's highest gives 0 (D_eq below its smallest D), one below its lowest gives ∞."""
    curve_loss = np.minimum.accumulate(np.atleast_2d(curve_loss), axis=1)  # lowest loss with at most D tokens
    loss = np.atleast_1d(np.asarray(loss, dtype=float))
    rows = max(len(loss), len(curve_loss))
    curve_loss, loss = np.broadcast_to(curve_loss, (rows, curve_loss.shape[1])), np.broadcast_to(loss, (rows,))
    log_d = np.log(curve_tokens)
    out = np.empty(len(loss))
    for i, (points, target) in enumerate(zip(curve_loss, loss)):
        if target > points[0]:
            out[i] = 0.0
        elif target < points[-1]:
            out[i] = np.inf
        else:
            out[i] = np.exp(np.interp(-target, -points, log_d))  # np.interp needs increasing x
    return out


@dataclass
class EffectiveData:
    """`table`: one row per cell with a one-epoch curve at its arm and size (D_eq, D_eq/D with its interval,
    the curve's tokens, the ratio the papers' R_D* would give); `draws`: log(D_eq/D) per draw, keyed by
    (arm, size, unique_tokens, tokens)."""

    table: pd.DataFrame
    draws: dict = field(default_factory=dict)


def _bound(ratio: float, curve_tokens: np.ndarray, tokens: float) -> str:
    """How the point estimate reads: a number, or the bound a loss beyond the curve gives."""
    if ratio == 0:
        return f"< {curve_tokens[0] / tokens:.3g}"
    if ratio == np.inf:
        return f"> {curve_tokens[-1] / tokens:.3g}"
    return f"{ratio:.3g}"


def effective_data_ratios(cells: pd.DataFrame, *, draws: int = DRAWS, seed: int = 0,
                          level: float = 0.95) -> EffectiveData:
    """D_eq/D of every repeated-data cell whose arm has ≥ 2 one-epoch cells (distinct D) at its size, with the
    `level` interval over `draws` draws (0 and ∞ stand for the open ends of a bound)."""
    rng = np.random.default_rng(seed)
    rows, kept = [], {}
    if cells.empty:
        return EffectiveData(pd.DataFrame())
    for (arm, size), group in cells.groupby(["arm", "size"], sort=True):
        curve = group[group["tokens"] <= group["unique_tokens"]].groupby("tokens", as_index=False).agg(
            loss=("loss", "mean"), se=("se", "max")).sort_values("tokens")
        if len(curve) < 2:
            continue
        tokens_axis = curve["tokens"].to_numpy(dtype=float)
        curve_draws = curve["loss"].to_numpy() + curve["se"].to_numpy() * rng.standard_normal((draws, len(curve)))
        repeated = group[group["tokens"] > group["unique_tokens"]]
        for _, cell in repeated.sort_values(["unique_tokens", "tokens"]).iterrows():
            cell_draws = cell["loss"] + cell["se"] * rng.standard_normal(draws)
            point = equivalent_tokens(tokens_axis, curve["loss"].to_numpy(), cell["loss"])[0] / cell["tokens"]
            with np.errstate(divide="ignore"):
                logs = np.log(equivalent_tokens(tokens_axis, curve_draws, cell_draws) / cell["tokens"])
            lo, hi = np.exp(np.quantile(logs, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf"))
            kept[(arm, size, cell["unique_tokens"], cell["tokens"])] = logs
            paper = {f"expected at R_D* = {r:g}":
                     effective_data(cell["unique_tokens"], cell["tokens"], r) / cell["tokens"]
                     for r in PAPER_R_D_STAR.values()}
            rows.append({"arm": arm, "objective": cell["objective"], "size": size,
                         "unique_tokens": cell["unique_tokens"], "tokens": cell["tokens"], "epochs": cell["epochs"],
                         "loss": cell["loss"], "D_eq": point * cell["tokens"], "D_eq/D": point,
                         "D_eq/D (reads)": _bound(point, tokens_axis, cell["tokens"]), "lo": lo, "hi": hi,
                         "n_seeds": cell["n_seeds"], "replicated": cell["replicated"],
                         "one-epoch curve (tokens)": ", ".join(f"{t:.3g}" for t in tokens_axis), **paper,
                         "runs": cell["runs"]})
    return EffectiveData(pd.DataFrame(rows), kept)
