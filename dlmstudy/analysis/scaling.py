"""Muennighoff et al. (2023) data-constrained scaling law: effective data D', the law L(N, D'), its per-arm
fit (the datablations method: Huber on log loss in log-sum-exp form, quasi-Newton from a grid of starts,
single-epoch constants first, then R_D* with those frozen) and what it implies for a study: the bootstrap
interval of R_D*, usable epochs, and the compute where two arms' curves cross."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import brentq, minimize, minimize_scalar

from dlmstudy.errors import UserError

HUBER_DELTA = 1e-3  # on log loss, as in datablations
R_STAR_RANGE = (1.0, 1e4)  # R_D* is searched in log space over this range
R_STAR_GRID = 161  # log-spaced points before the bounded 1-D refinement
# Muennighoff et al.'s C4 fit (nats/token): the fallback's shape when a study has too few one-epoch runs.
C4 = {"E": 1.87, "A": 520.8, "B": 1487.7, "alpha": 0.353, "beta": 0.353, "R_D_star": 15.4, "R_N_star": 5.3}
COLUMNS = ("arm", "params", "unique_tokens", "tokens", "loss")


def effective_data(unique_tokens: ArrayLike, tokens: ArrayLike, r_star: ArrayLike) -> np.ndarray:
    """D' = U_D + U_D·R*·(1 − exp(−R/R*)) with R = D/U_D − 1 repetitions and U_D = min(U, D) unique tokens
    seen, so a run of at most one epoch has D' = D; as R → ∞, D' → U_D·(1 + R*). Broadcasts over arrays."""
    unique_seen = np.minimum(unique_tokens, tokens)
    repetitions = np.asarray(tokens, dtype=float) / unique_seen - 1.0
    return unique_seen + unique_seen * r_star * -np.expm1(-repetitions / r_star)


def _compute_optimal_params(tokens: ArrayLike, A: float, B: float, alpha: float, beta: float) -> np.ndarray:
    """N_opt(D) of L = E + A/N^α + B/D^β at fixed C = 6ND: where α·A/N^α = β·B/D^β."""
    return (alpha * A * np.asarray(tokens, dtype=float) ** beta / (beta * B)) ** (1.0 / alpha)


def law_loss(params_N: ArrayLike, unique_tokens: ArrayLike, tokens: ArrayLike, E: float, A: float, B: float,
             alpha: float, beta: float, r_d_star: ArrayLike, r_n_star: float | None = None) -> np.ndarray:
    """L = E + A/N'^α + B/D'^β with D' = effective_data(U, D, R_D*). N' = N unless R_N* is given; then, as in
    Muennighoff et al., parameters beyond U_N = min(N, N_opt(U_D)) decay like repeated data with R_N*."""
    data = effective_data(unique_tokens, tokens, r_d_star)
    params = np.asarray(params_N, dtype=float)
    if r_n_star is not None:
        optimal = _compute_optimal_params(np.minimum(unique_tokens, tokens), A, B, alpha, beta)
        params = effective_data(np.minimum(params, optimal), params, r_n_star)
    return E + A / params**alpha + B / data**beta


@dataclass(frozen=True)
class _Form:
    """One way to fit the single-epoch constants θ = (e, a, b, α, β) = (log E, log A, log B, α, β) as
    θ = M·free + c, with a start grid per free coordinate and the one-epoch runs it needs: `min_runs` runs and
    (sparser, richer) counts of distinct N and distinct D of at least `min_distinct`."""

    name: str
    M: np.ndarray
    c: np.ndarray
    grids: tuple[tuple[float, ...], ...]
    min_runs: int
    min_distinct: tuple[int, int]

    def starts(self) -> np.ndarray:
        return np.array(list(itertools.product(*self.grids)))


_E_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
_AB_GRID = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
_EXP_GRID = (0.1, 0.3, 0.5, 1.0, 1.5)
_C4_THETA = np.array([np.log(C4["E"]), np.log(C4["A"]), np.log(C4["B"]), C4["alpha"], C4["beta"]])
_C4_EXPONENTS = np.array([0.0, 0.0, 0.0, C4["alpha"], C4["beta"]])
# From most to fewest free constants; each needs a one-epoch run more than it has free constants, but the last
# resort (Muennighoff's C4 law times one fitted factor) which takes whatever one-epoch runs there are.
FORMS = (
    _Form("full", np.eye(5), np.zeros(5), (_E_GRID, _AB_GRID, _AB_GRID, _EXP_GRID, _EXP_GRID),
          min_runs=6, min_distinct=(3, 3)),
    _Form("tied-exponents", np.vstack([np.eye(4), [0, 0, 0, 1]]), np.zeros(5), (_E_GRID, _AB_GRID, _AB_GRID, _EXP_GRID),
          min_runs=5, min_distinct=(2, 3)),
    _Form("c4-exponents", np.vstack([np.eye(3), np.zeros((2, 3))]), _C4_EXPONENTS, (_E_GRID, _AB_GRID, _AB_GRID),
          min_runs=4, min_distinct=(2, 2)),
    _Form("c4-scaled", np.array([[1.0], [1.0], [1.0], [0.0], [0.0]]), _C4_THETA, (tuple(np.linspace(-3, 3, 13)),),
          min_runs=1, min_distinct=(1, 1)),
)


def _choose_form(log_n: np.ndarray, log_d: np.ndarray) -> _Form | None:
    """The richest form the one-epoch runs determine: α and β apart need 3 sizes and 3 data sizes; tied α = β
    needs the curvature of one of them (3 values); Muennighoff's exponents with free E, A, B need a 2×2 spread;
    else Muennighoff's whole C4 law scaled by one fitted factor (an offset in log loss)."""
    distinct = sorted((len(np.unique(log_n)), len(np.unique(log_d))))
    for form in FORMS:
        if len(log_n) >= form.min_runs and all(have >= need for have, need in zip(distinct, form.min_distinct)):
            return form
    return None


def _log_law(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """log L = LSE(e, a − α·log N, b − β·log D): the law in log-sum-exp form; θ may be (5,) or (G, 5)."""
    e, a, b, alpha, beta = (theta[..., k, None] for k in range(5))
    return np.logaddexp(np.logaddexp(e, a - alpha * log_n), b - beta * log_d)


def _huber(residual: np.ndarray) -> np.ndarray:
    """Huber(δ)/δ, summed over the last axis: dividing by δ keeps gradients O(1) and leaves the argmin alone."""
    r = np.abs(residual)
    return np.where(r <= HUBER_DELTA, 0.5 * r**2 / HUBER_DELTA, r - 0.5 * HUBER_DELTA).sum(axis=-1)


def _objective(free: np.ndarray, form: _Form, log_n, log_d, log_loss) -> tuple[float, np.ndarray]:
    """Huber objective of the single-epoch law and its gradient with respect to the free constants."""
    e, a, b, alpha, beta = form.M @ free + form.c
    z_a, z_b = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(z_a, z_b), e)
    w_e, w_a, w_b = np.exp(e - top), np.exp(z_a - top), np.exp(z_b - top)
    total = w_e + w_a + w_b
    residual = top + np.log(total) - log_loss  # LSE(e, z_a, z_b) − log L
    slope = np.clip(residual / HUBER_DELTA, -1.0, 1.0) / total  # Huber' times softmax's denominator
    slope_a, slope_b = slope * w_a, slope * w_b
    gradient = np.array([slope @ w_e, slope_a.sum(), slope_b.sum(), -slope_a @ log_n, -slope_b @ log_d])
    return float(_huber(residual)), form.M.T @ gradient


def _fit_constants(form: _Form, log_n, log_d, log_loss, starts: np.ndarray | None = None) -> np.ndarray:
    """Free constants of the single-epoch law by BFGS from `starts`, by default the 8 best points of the start
    grid. (Dense BFGS, not L-BFGS: with five constants the full matrix costs nothing, and scipy's L-BFGS-B
    calls threaded LAPACK every step, 10-20x slower on a busy shared CPU.)"""
    if starts is None:
        grid = form.starts()
        starts = grid[np.argsort(_huber(_log_law(grid @ form.M.T + form.c, log_n, log_d) - log_loss))[:8]]
    results = [minimize(_objective, x0, args=(form, log_n, log_d, log_loss), jac=True, method="BFGS") for x0 in starts]
    return min(results, key=lambda res: res.fun).x


def _fit_r_star(theta: np.ndarray, log_n, unique, tokens, log_loss) -> float:
    """R_D* with the single-epoch constants θ frozen: Huber objective on a log grid of R*, then bounded Brent
    between the best point's neighbours."""
    def score(rho):
        rho = np.asarray(rho, dtype=float)
        log_d = np.log(effective_data(unique, tokens, np.exp(rho)[..., None]))
        return _huber(_log_law(theta, log_n, log_d) - log_loss)

    rho = np.linspace(*np.log(R_STAR_RANGE), R_STAR_GRID)
    best = int(np.argmin(score(rho)))
    bracket = (rho[max(best - 1, 0)], rho[min(best + 1, len(rho) - 1)])
    refined = minimize_scalar(score, bounds=bracket, method="bounded", options={"xatol": 1e-4}).x
    return float(np.exp(min((rho[best], refined), key=score)))


def _check_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that have a loss, with the columns the fit needs; one clear error for anything else."""
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise UserError(f"fit_repetition needs columns {', '.join(COLUMNS)}; missing: {', '.join(missing)}")
    runs = frame.loc[frame["loss"].notna(), list(COLUMNS)]
    numbers = runs[list(COLUMNS[1:])].astype(float)
    if not np.isfinite(numbers.to_numpy()).all() or (numbers <= 0).any().any():
        raise UserError("fit_repetition needs finite, positive params, unique_tokens, tokens and loss in every run")
    runs[list(COLUMNS[1:])] = numbers
    return runs


def _fit_arm(runs: pd.DataFrame, bootstrap: int, rng: np.random.Generator) -> dict:
    """Both stages of the fit for one arm, the bootstrap interval of R_D*, and the fit's R² on loss."""
    log_n, log_loss = np.log(runs["params"].to_numpy()), np.log(runs["loss"].to_numpy())
    unique, tokens = runs["unique_tokens"].to_numpy(), runs["tokens"].to_numpy()
    one_epoch = np.flatnonzero(tokens <= unique)
    repeated = np.flatnonzero(tokens > unique)
    row = {"n_runs": len(runs), "n_one_epoch": len(one_epoch), "max_epochs": float((tokens / unique).max()),
           "params_min": runs["params"].min(), "params_max": runs["params"].max(),
           "tokens_min": tokens.min(), "tokens_max": tokens.max()}
    form = _choose_form(log_n[one_epoch], np.log(tokens[one_epoch]))
    nan = dict.fromkeys(("R_D_star", "R_D_star_lo", "R_D_star_hi", "r2", "E", "A", "B", "alpha", "beta"), np.nan)
    if form is None:
        return {**nan, **row, "at_bound": False, "method": "none: no one-epoch runs"}

    def fit(sample_one, sample_all, starts=None):
        free = _fit_constants(form, log_n[sample_one], np.log(tokens[sample_one]), log_loss[sample_one], starts)
        theta = form.M @ free + form.c
        r_star = _fit_r_star(theta, log_n[sample_all], unique[sample_all], tokens[sample_all], log_loss[sample_all])
        return free, theta, r_star

    free, theta, r_star = fit(one_epoch, np.arange(len(runs)))
    lo = hi = np.nan
    if len(repeated) == 0:
        r_star = np.nan  # nothing was repeated: R_D* is not determined
    elif bootstrap > 0:
        draws = []
        for _ in range(bootstrap):  # resample one-epoch and repeated runs apart, so each draw has both; warm start
            sample_one = rng.choice(one_epoch, len(one_epoch))
            sample_all = np.concatenate([sample_one, rng.choice(repeated, len(repeated))])
            draws.append(fit(sample_one, sample_all, starts=[free])[2])
        lo, hi = np.percentile(draws, [2.5, 97.5])
    data = effective_data(unique, tokens, r_star) if len(repeated) else tokens
    predicted = np.exp(_log_law(theta, log_n, np.log(data)))
    loss = np.exp(log_loss)
    r2 = 1.0 - ((loss - predicted) ** 2).sum() / ((loss - loss.mean()) ** 2).sum() if len(runs) > 1 else np.nan
    rho_range = np.log(R_STAR_RANGE)
    at_bound = bool(np.isfinite(r_star) and np.min(np.abs(np.log(r_star) - rho_range)) < 1e-3)
    E, A, B = np.exp(theta[:3])
    return {**row, "R_D_star": r_star, "R_D_star_lo": lo, "R_D_star_hi": hi, "at_bound": at_bound, "r2": r2,
            "E": E, "A": A, "B": B, "alpha": theta[3], "beta": theta[4], "method": form.name}


def fit_repetition(frame: pd.DataFrame, *, bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """Fit the data-constrained law per arm from one row per run (arm, params [non-embedding], unique_tokens,
    tokens [total trained], loss [validation]); rows without a loss are skipped (partial studies).

    Stage 1 fits E, A, B, α, β on the one-epoch runs (tokens <= unique_tokens), falling back to fewer free
    constants when those runs cannot determine all five (column `method`: full, tied-exponents, c4-exponents,
    c4-scaled; see `FORMS`). Stage 2 fits R_D* on all runs with those frozen, in log space over R_STAR_RANGE
    (`at_bound` says it hit an end; NaN when no run repeated data). R_D_star_lo/hi: 95% bootstrap percentile
    interval over runs (resampled within one-epoch and repeated runs). `r2`: R² of the fitted law on loss (not
    log loss) over all the arm's runs. Also n_one_epoch, max_epochs and the runs' params/tokens ranges.
    """
    runs = _check_frame(frame)
    if runs.empty:
        raise UserError("fit_repetition got no runs with a loss")
    rows = []
    for index, (arm, arm_runs) in enumerate(runs.groupby("arm", sort=True)):
        rng = np.random.default_rng([seed, index])
        rows.append({"arm": arm, **_fit_arm(arm_runs.reset_index(drop=True), bootstrap, rng)})
    first = ["arm", "R_D_star", "R_D_star_lo", "R_D_star_hi", "at_bound", "r2", "n_runs", "n_one_epoch", "max_epochs",
             "E", "A", "B", "alpha", "beta", "method"]
    return pd.DataFrame(rows)[first + [key for key in rows[0] if key not in first]]


def usable_epochs(r_d_star: float, tolerance: float = 0.1) -> float:
    """Epochs 1 + R at which repeated data is worth (1 − tolerance) of fresh data, D'/D = 1 − tolerance.
    Tolerance 0.1: 5.1 epochs at R_D* = 15 and 109 at 500 (the papers' "~4 vs ~100"); 0.07 gives 4.0 and 76."""
    if not 0 < tolerance < 1:
        raise UserError(f"usable_epochs needs 0 < tolerance < 1, got {tolerance}")
    if r_d_star == np.inf:
        return float("inf")  # no decay: repeated data is as good as fresh for ever
    if not np.isfinite(r_d_star) or r_d_star <= 0:
        return float("nan")

    def worth(repetitions):  # D'/D at U = 1, decreasing from 1 towards 0
        return effective_data(1.0, 1.0 + repetitions, r_d_star) / (1.0 + repetitions) - (1.0 - tolerance)

    high = 1.0
    while worth(high) > 0:
        high *= 2.0
    return 1.0 + brentq(worth, 0.0, high, xtol=1e-10)


def critical_compute(fits: pd.DataFrame, *, unique_tokens: float, params: float | None = None,
                     arms: tuple[str, str] | None = None, compute: tuple[float, float] | None = None) -> float | None:
    """Training FLOPs C = 6·N·D at which two arms' fitted losses cross at U = unique_tokens (the lowest crossing),
    or None when they do not cross in the examined range. With `params`, each curve is the law at that N;
    without, it is the best loss over N in the fitted runs' size range (the compute frontier). `compute`
    defaults to the range the runs span, [6·min N·min D, 6·max N·max D] (N = `params` when given)."""
    arms = arms or tuple(fits["arm"])
    if len(arms) != 2:
        raise UserError(f"critical_compute compares 2 arms, got {len(arms)}: {', '.join(map(str, arms))}; pass arms=")
    missing = [arm for arm in arms if arm not in set(fits["arm"])]
    if missing:
        raise UserError(f"critical_compute: no fit for arm {missing[0]!r}")
    rows = [fits.set_index("arm").loc[arm] for arm in arms]
    constants = ["E", "A", "B", "alpha", "beta", "R_D_star"]
    if any(not np.isfinite(row[constants].to_numpy(dtype=float)).all() for row in rows):
        return None
    if params is None:
        sizes = np.geomspace(min(row["params_min"] for row in rows), max(row["params_max"] for row in rows), 512)
    else:
        sizes = np.array([params], dtype=float)
    if compute is None:
        compute = (6 * sizes[0] * min(row["tokens_min"] for row in rows),
                   6 * sizes[-1] * max(row["tokens_max"] for row in rows))

    def gap(log_c):  # loss of the first arm minus the second's, at each log C
        c = np.exp(np.asarray(log_c, dtype=float))[..., None]
        best = [law_loss(sizes, unique_tokens, c / (6 * sizes), *row[constants]).min(axis=-1) for row in rows]
        return best[0] - best[1]

    log_c = np.linspace(*np.log(compute), 512)
    sign = np.sign(gap(log_c))
    changes = np.flatnonzero(sign[:-1] * sign[1:] < 0)
    if len(changes) == 0:
        return None
    root = brentq(lambda x: gap(x).item(), log_c[changes[0]], log_c[changes[0] + 1], xtol=1e-12)
    return float(np.exp(root))
