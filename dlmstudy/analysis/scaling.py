"""Muennighoff et al. (2023) data-constrained scaling law: effective data D', the law L(N, D'), its per-arm
fit and what it implies for a study: usable epochs, and the compute where two arms' curves cross.

The fit profiles R_D*: at each R* of a log grid every other constant is fitted to all runs (the law in
log-sum-exp form, least squares on log loss, quasi-Newton from a grid of starts and from the neighbouring R*);
the profile's F test gives R_D*'s interval, open-ended ("not identified") where the runs cannot bound it.
Fitting R_D* with the single-epoch constants frozen (the two-stage datablations method) ignores their
uncertainty, and its intervals can exclude the truth on grids that cannot identify R_D*."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import chi2
from scipy.stats import f as f_dist

from dlmstudy.errors import UserError

R_STAR_RANGE = (1.0, 1e4)  # R_D* is searched in log space over this range
R_STAR_GRID = 49  # log-spaced points of the profile (neighbours a factor 1.21 apart), refined between them
LEVEL = 0.99  # R_D*'s interval: the law's fit is the report's most assumption-laden number, so 99%, not 95%
CONSTANTS = ("E", "A", "B", "alpha", "beta")
EXPONENT_RANGE = (0.02, 2.5)  # fitted α, β outside it are flagged as degenerate
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


def _terms(free: np.ndarray, form: _Form, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """log E, log A/N^α, log B/D^β per problem and run: shape (P, n, 3) for free constants of shape (P, k)."""
    theta = free @ form.M.T + form.c
    e, a, b, alpha, beta = (theta[:, k, None] for k in range(5))
    return np.stack(np.broadcast_arrays(e, a - alpha * log_n, b - beta * log_d), axis=-1)


def _lm(free: np.ndarray, form: _Form, log_n, log_d, log_loss, weights=None, tolerance: float = 1e-10,
        iterations: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt on P least-squares problems at once: minimise Σ w·(LSE(terms) − log L)² over the
    free constants from starts `free` (P, k); log_d and weights may be (n,) or (P, n). A problem stops when a
    step gains less than `tolerance` of its RSS or its damping passes 1e8. Returns the constants and each
    problem's weighted residual sum of squares. Vectorised, because a profile and its bootstrap are hundreds of
    small fits."""
    free = np.array(free, dtype=float)
    count = len(free)
    log_d = np.broadcast_to(log_d, (count, len(log_loss)))
    root_w = np.sqrt(np.broadcast_to(np.ones_like(log_loss) if weights is None else weights, log_d.shape))

    def evaluate(x, rows):
        with np.errstate(over="ignore", invalid="ignore"):
            z = _terms(x, form, log_n, log_d[rows])
            top = z.max(axis=-1, keepdims=True)
            share = np.exp(z - top)
            total = share.sum(axis=-1, keepdims=True)
            residual = (top + np.log(total))[..., 0] - log_loss
        residual = np.where(np.isfinite(residual), residual, 1e6)  # an overflowing step is rejected, not NaN
        return residual * root_w[rows], (share / total) * root_w[rows][..., None]

    residual, share = evaluate(free, slice(None))
    rss = (residual**2).sum(axis=1)
    damping = np.full(count, 1e-3)
    active = np.arange(count)
    eye = np.eye(free.shape[1])
    for _ in range(iterations):
        if not len(active):
            break
        w = share[active]
        slopes = np.stack([w[..., 0], w[..., 1], w[..., 2], -w[..., 1] * log_n, -w[..., 2] * log_d[active]],
                          axis=-1) @ form.M  # ∂ residual / ∂ free, (P, n, k)
        hessian = slopes.transpose(0, 2, 1) @ slopes
        gradient = (slopes.transpose(0, 2, 1) @ residual[active][..., None])[..., 0]
        diagonal = np.diagonal(hessian, axis1=1, axis2=2)
        scale = (diagonal + 1e-9 * diagonal.max(axis=1, keepdims=True) + 1e-30)[:, None, :] * eye
        step = np.linalg.solve(hessian + damping[active, None, None] * scale, -gradient[..., None])[..., 0]
        trial, trial_share = evaluate(free[active] + step, active)
        trial_rss = (trial**2).sum(axis=1)
        better = trial_rss < rss[active]
        gain = rss[active] - trial_rss
        moved = active[better]
        free[moved] += step[better]
        residual[moved], share[moved], rss[moved] = trial[better], trial_share[better], trial_rss[better]
        damping[active] = np.where(better, np.maximum(damping[active] / 3.0, 1e-12), damping[active] * 4.0)
        done = (better & (gain <= tolerance * rss[active])) | (damping[active] > 1e8)
        active = active[~done]
    return free, rss


def _grid_starts(form: _Form, log_n, log_d, log_loss, count: int = 8) -> np.ndarray:
    """The `count` points of the form's start grid with the smallest squared error."""
    grid = form.starts()
    with np.errstate(over="ignore", invalid="ignore"):
        error = ((_log_law(grid @ form.M.T + form.c, log_n, log_d) - log_loss) ** 2).sum(axis=-1)
    return grid[np.argsort(np.nan_to_num(error, nan=np.inf))[:count]]


@dataclass
class Profile:
    """The profile of R_D*: at each log R* of the grid `rho`, the residual sum of squares `rss` of log loss with
    the other constants (`free`, one row per grid point) optimised."""

    rho: np.ndarray
    rss: np.ndarray
    free: np.ndarray

    def with_point(self, rho: float, free: np.ndarray, rss: float) -> "Profile":
        """The profile with one more point (the refined minimum), kept in order of R*."""
        at = int(np.searchsorted(self.rho, rho))
        return Profile(np.insert(self.rho, at, rho), np.insert(self.rss, at, rss), np.insert(self.free, at, free, 0))


def profile_r_star(form: _Form, log_n, unique, tokens, log_loss) -> Profile:
    """Profile the squared error over log R* on R_STAR_GRID points of R_STAR_RANGE: the 8 best start-grid points
    at five anchor R*, each anchor's best fit then carried to every grid point, and passes that restart each
    point from its neighbours' fits until none improves (a fit stuck in a poor basin is replaced)."""
    rho = np.linspace(*np.log(R_STAR_RANGE), R_STAR_GRID)
    log_d = np.log(effective_data(unique, tokens, np.exp(rho)[:, None]))
    anchors = np.linspace(0, len(rho) - 1, 5).round().astype(int)
    starts = np.concatenate([_grid_starts(form, log_n, log_d[i], log_loss) for i in anchors])
    fitted, rss = _lm(starts, form, log_n, np.repeat(log_d[anchors], len(starts) // len(anchors), axis=0), log_loss)
    best = fitted.reshape(len(anchors), -1, fitted.shape[1])[np.arange(len(anchors)),
                                                               rss.reshape(len(anchors), -1).argmin(axis=1)]
    fitted, rss = _lm(np.repeat(best, len(rho), axis=0), form, log_n, np.tile(log_d, (len(anchors), 1)), log_loss)
    pick = rss.reshape(len(anchors), len(rho)).argmin(axis=0)
    free = fitted.reshape(len(anchors), len(rho), -1)[pick, np.arange(len(rho))]
    rss = rss.reshape(len(anchors), len(rho))[pick, np.arange(len(rho))]
    for _ in range(len(rho)):
        neighbours = np.concatenate([np.r_[0, np.arange(len(rho) - 1)], np.r_[np.arange(1, len(rho)), len(rho) - 1]])
        fitted, tried = _lm(free[neighbours], form, log_n, np.tile(log_d, (2, 1)), log_loss)
        tried, fitted = tried.reshape(2, len(rho)), fitted.reshape(2, len(rho), -1)
        side = tried.argmin(axis=0)
        better = tried[side, np.arange(len(rho))] < rss * (1 - 1e-9)
        if not better.any():
            break
        free[better] = fitted[side, np.arange(len(rho))][better]
        rss[better] = tried[side, np.arange(len(rho))][better]
    return Profile(rho, rss, free)


def _fit_at(rho: float, start: np.ndarray, form: _Form, log_n, unique, tokens, log_loss) -> tuple[np.ndarray, float]:
    """The other constants at R* = exp(rho), warm-started from `start`: (free constants, RSS)."""
    log_d = np.log(effective_data(unique, tokens, np.exp(rho)))
    free, rss = _lm(start[None], form, log_n, log_d, log_loss)
    return free[0], float(rss[0])


def _minimum(profile: Profile, fit_at) -> tuple[float, np.ndarray, float]:
    """The profile's minimum (log R*, free constants, RSS): bounded Brent between the best grid point's
    neighbours; the grid point itself at an end of the range."""
    best = int(np.argmin(profile.rss))
    grid = (profile.rho[best], profile.free[best], profile.rss[best])
    if best in (0, len(profile.rho) - 1):
        return grid
    found = minimize_scalar(lambda r: fit_at(r, profile.free[best])[1], method="bounded",
                            bounds=(profile.rho[best - 1], profile.rho[best + 1]), options={"xatol": 1e-3})
    if found.fun >= grid[2]:
        return grid
    return found.x, fit_at(found.x, profile.free[best])[0], float(found.fun)


def _profile_interval(profile: Profile, fit_at, rss_min: float, n_runs: int, n_constants: int, noise_var: float,
                      level: float) -> tuple[float, float, str]:
    """(lo, hi, test) of R_D*: the R* whose profile statistic (RSS(R*) − RSS_min)/s² stays under F(1, n − p) at
    `level` (χ²(1) where the known noise floors s²), with s² = max(RSS_min/(n − p), noise_var) and p the free
    constants + 1. The ends are found by Brent between grid points; a region reaching the low end of the search
    range gives lo = 0, the high end hi = ∞ (the runs do not bound R_D* that way). The hull of the region: a
    profile with two dips keeps both."""
    dof = n_runs - n_constants - 1
    residual_var = rss_min / dof if dof > 0 else 0.0
    s2 = max(residual_var, noise_var)
    if s2 <= 0:
        return 0.0, np.inf, f"none: no residual degrees of freedom ({n_runs} runs, {n_constants + 1} constants)"
    if residual_var >= noise_var:
        critical, test = f_dist.ppf(level, 1, dof), f"profile F(1, {dof})"
    else:
        critical, test = chi2.ppf(level, 1), "profile χ²(1) with the runs' standard errors"
    inside = np.flatnonzero((profile.rss - rss_min) / s2 <= critical)

    def end(i, outside):
        def excess(r):
            return (fit_at(r, profile.free[i])[1] - rss_min) / s2 - critical
        return float(np.exp(brentq(excess, profile.rho[i], profile.rho[outside], xtol=1e-4)))

    first, last = inside[0], inside[-1]
    lo = 0.0 if first == 0 else end(first, first - 1)
    hi = np.inf if last == len(profile.rho) - 1 else end(last, last + 1)
    return lo, hi, test


def _bootstrap_weights(settings: list[np.ndarray], one_epoch: np.ndarray, draws: int,
                       rng: np.random.Generator) -> np.ndarray:
    """(draws, n) counts of each run in bootstrap draws: settings (runs of one N, U and D) drawn with replacement,
    one-epoch and repeated settings apart so every draw has both, then each drawn setting's runs (its seeds)
    likewise."""
    counts = np.zeros((draws, len(one_epoch)))
    strata = [[runs for runs in settings if one_epoch[runs[0]] == stratum] for stratum in (True, False)]
    for draw in range(draws):
        for pool in strata:
            for k in rng.integers(len(pool), size=len(pool)):
                np.add.at(counts[draw], rng.choice(pool[k], size=len(pool[k])), 1.0)
    return counts


def _bootstrap_interval(profile: Profile, form: _Form, log_n, unique, tokens, log_loss, settings, draws: int,
                        rng: np.random.Generator, level: float) -> tuple[float, float]:
    """Percentile interval of the profile's minimum over bootstrap draws of the runs (`_bootstrap_weights`),
    each profiled on the grid warm-started from the full data's fits (to 1e-6 of the RSS: only the minimum's
    place is needed); an end at the search range's end is open (0 or ∞)."""
    weights = _bootstrap_weights(settings, tokens <= unique, draws, rng)
    log_d = np.log(effective_data(unique, tokens, np.exp(profile.rho)[:, None]))
    grid = len(profile.rho)
    _, rss = _lm(np.tile(profile.free, (draws, 1)), form, log_n, np.tile(log_d, (draws, 1)), log_loss,
                 weights=np.repeat(weights, grid, axis=0), tolerance=1e-6, iterations=100)
    minima = rss.reshape(draws, grid).argmin(axis=1)
    lo, hi = np.quantile(minima, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return (0.0 if lo == 0 else float(np.exp(profile.rho[lo])),
            np.inf if hi == grid - 1 else float(np.exp(profile.rho[hi])))


def degenerate_constants(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> str:
    """Why fitted constants are no result, or "": a term of the law (E, A/N^α, B/D'^β) below 1% of the loss in
    every run (collapsed: the runs do not determine it, e.g. A ≈ 1e-164), or an exponent outside EXPONENT_RANGE."""
    e, a, b, alpha, beta = theta
    z = np.array([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d])
    share = np.exp(z - z.max(axis=0))
    share /= share.sum(axis=0)
    flags = [f"{name} collapsed ({name} ≈ {value:.2g}, under 1% of every run's loss)"
             for name, value, part in zip("EAB", np.exp([e, a, b]), share)
             if part.max() < 0.01]
    flags += [f"{name} = {value:.3g} outside {EXPONENT_RANGE[0]}-{EXPONENT_RANGE[1]}"
              for name, value in (("α", alpha), ("β", beta)) if not EXPONENT_RANGE[0] <= value <= EXPONENT_RANGE[1]]
    return "; ".join(flags)


def _check_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that have a loss, with the columns the fit needs; one clear error for anything else."""
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise UserError(f"fit_repetition needs columns {', '.join(COLUMNS)}; missing: {', '.join(missing)}")
    extra = [name for name in ("loss_se", "run_id") if name in frame.columns]
    runs = frame.loc[frame["loss"].notna(), list(COLUMNS) + extra]
    numbers = runs[list(COLUMNS[1:])].astype(float)
    if not np.isfinite(numbers.to_numpy()).all() or (numbers <= 0).any().any():
        raise UserError("fit_repetition needs finite, positive params, unique_tokens, tokens and loss in every run")
    runs[list(COLUMNS[1:])] = numbers
    return runs


def _status(lo: float, hi: float) -> str:
    """"identified" when the interval is closed, else what the runs do bound."""
    if lo > 0 and hi < np.inf:
        return "identified"
    if lo > 0:
        return f"not identified: R_D* > {lo:.3g}"
    if hi < np.inf:
        return f"not identified: R_D* < {hi:.3g}"
    return "not identified: the profile is flat over the whole search range"


def _fit_arm(runs: pd.DataFrame, level: float, bootstrap: int, rng: np.random.Generator) -> dict:
    """The profile fit of one arm: R_D* with its interval and status, the constants at the profile's minimum
    (blanked when degenerate), R² on loss, and what the fit stood on."""
    log_n, log_loss = np.log(runs["params"].to_numpy()), np.log(runs["loss"].to_numpy())
    unique, tokens = runs["unique_tokens"].to_numpy(), runs["tokens"].to_numpy()
    one_epoch = tokens <= unique
    noise_var = float(np.mean((runs["loss_se"].fillna(0.0) / runs["loss"]) ** 2)) if "loss_se" in runs else 0.0
    row = {"n_runs": len(runs), "n_one_epoch": int(one_epoch.sum()), "max_epochs": float((tokens / unique).max()),
           "params_min": runs["params"].min(), "params_max": runs["params"].max(),
           "tokens_min": tokens.min(), "tokens_max": tokens.max(),
           "runs": ", ".join(runs["run_id"]) if "run_id" in runs else ""}
    form = _choose_form(log_n[one_epoch], np.log(tokens[one_epoch]))
    if form is None:
        return {**row, **dict.fromkeys(("R_D_star", "R_D_star_lo", "R_D_star_hi", "r2", *CONSTANTS), np.nan),
                "at_bound": False, "identified": False, "status": "not fitted: no one-epoch runs", "interval": "",
                "degenerate": "", "method": "none"}
    if one_epoch.all():
        log_d = np.log(tokens)
        fitted, rss = _lm(_grid_starts(form, log_n, log_d, log_loss), form, log_n, log_d, log_loss)
        free = fitted[rss.argmin()]
        r_star, lo, hi, at_bound, interval = np.nan, np.nan, np.nan, False, ""
        status = "no repeated data: R_D* not determined"
    else:
        profile = profile_r_star(form, log_n, unique, tokens, log_loss)

        def fit_at(rho, start):
            return _fit_at(rho, start, form, log_n, unique, tokens, log_loss)

        rho, free, rss_min = _minimum(profile, fit_at)
        r_star, at_bound = float(np.exp(rho)), bool(rho in (profile.rho[0], profile.rho[-1]))
        lo, hi, interval = _profile_interval(profile.with_point(rho, free, rss_min), fit_at, rss_min, len(runs),
                                             form.M.shape[1], noise_var, level)
        if bootstrap > 0:
            settings = list(runs.groupby(["params", "unique_tokens", "tokens"]).indices.values())
            boot_lo, boot_hi = _bootstrap_interval(profile, form, log_n, unique, tokens, log_loss, settings,
                                                   bootstrap, rng, level)
            lo, hi = min(lo, boot_lo), max(hi, boot_hi)
            interval += f" ∪ bootstrap over runs and seeds ({bootstrap} draws)"
        log_d = np.log(effective_data(unique, tokens, r_star))
        status = _status(lo, hi)
    theta = form.M @ free + form.c
    loss, predicted = np.exp(log_loss), np.exp(_log_law(theta, log_n, log_d))
    r2 = 1.0 - ((loss - predicted) ** 2).sum() / ((loss - loss.mean()) ** 2).sum() if len(runs) > 1 else np.nan
    degenerate = degenerate_constants(theta, log_n, log_d) if form.name != "c4-scaled" else ""
    constants = dict(zip(CONSTANTS, [*np.exp(theta[:3]), *theta[3:]]))
    if degenerate:
        constants = dict.fromkeys(CONSTANTS, np.nan)
    return {**row, "R_D_star": r_star, "R_D_star_lo": lo, "R_D_star_hi": hi, "at_bound": at_bound,
            "identified": status == "identified", "status": status, "interval": interval, "r2": r2, **constants,
            "degenerate": degenerate, "method": form.name}


def fit_repetition(frame: pd.DataFrame, *, level: float = LEVEL, bootstrap: int = 0, seed: int = 0) -> pd.DataFrame:
    """Fit the data-constrained law per arm from one row per run (arm, params [non-embedding], unique_tokens,
    tokens [total trained], loss [validation]; optional loss_se [its standard error] and run_id); rows without
    a loss are skipped (partial studies).

    R_D* by profile likelihood: at each R* of a log grid over R_STAR_RANGE the other constants are fitted to
    every run (least squares on log loss, the Gaussian likelihood of a multiplicative noise); the estimate is the
    profile's minimum and the `level` interval the R* that the profile F test does not reject. With
    `bootstrap` > 0 the interval also spans the percentile interval of the minimum over that many draws of the
    runs (settings, and seeds within them; seeded by `seed`, so the same runs give the same numbers). An
    interval reaching an end of the search range is open (lo = 0 or hi = ∞), and `status` then says "not
    identified" with the bound the runs do give; `interval` names the tests. The single-epoch constants' form
    (`method`: full, tied-exponents, c4-exponents, c4-scaled; see `FORMS`) is the richest the one-epoch runs
    (tokens ≤ unique_tokens) determine. Constants that collapsed or left EXPONENT_RANGE are blanked and
    `degenerate` says why. `r2`: R² on loss (not log loss); `runs`: the run ids the fit used (given run_id).
    """
    if not 0 < level < 1:
        raise UserError(f"fit_repetition needs 0 < level < 1, got {level}")
    runs = _check_frame(frame)
    if runs.empty:
        raise UserError("fit_repetition got no runs with a loss")
    rows = [{"arm": arm, **_fit_arm(arm_runs.reset_index(drop=True), level, bootstrap,
                                     np.random.default_rng([seed, index]))}
            for index, (arm, arm_runs) in enumerate(runs.groupby("arm", sort=True))]
    first = ["arm", "R_D_star", "R_D_star_lo", "R_D_star_hi", "identified", "status", "at_bound", "r2", "n_runs",
             "n_one_epoch", "max_epochs", *CONSTANTS, "degenerate", "method", "interval"]
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
