"""The claims table: what a study's runs say about the data-constrained claims of the two papers below.

Claims (Muennighoff et al. 2023; Prabhudesai et al. 2025):
  (a) AR can use ≈ 4 epochs of repeated data, diffusion ≈ 100;
  (b) the decay constant R_D* is ≈ 15 for AR and ≈ 500 for diffusion;
  (c) diffusion beats AR only past a critical compute, C_crit(U) ≈ 2.12e15·(U/1e6)^2.174 FLOPs;
  (d) questions asked in the reverse direction favour diffusion.

Each test gives a verdict from its numbers and their noise: a difference counts only when it exceeds
both 1.96 standard errors (Monte-Carlo error of the diffusion ELBO, and the spread over seeds when a setting
has several) and, for single-seed settings, NOISE_FLOOR (seed-to-seed variation a single seed cannot
measure). Accuracies use Wilson 95% intervals and Newcombe's interval for their difference. Loss levels
are compared across arms only in (c), where the diffusion ELBO is an upper bound on its NLL: diffusion ahead
is then real, AR ahead may be the bound's slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dlmstudy.analysis.scaling import R_STAR_RANGE, critical_compute, fit_repetition, usable_epochs
from dlmstudy.study.plan import short_count

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
NOT_TESTABLE = "not testable at this scale"
INCONCLUSIVE = "inconclusive"
WITHIN_NOISE = "inconclusive (within noise)"
Z = 1.96  # two-sided 95%
NOISE_FLOOR = 0.02  # nats/token: smallest loss difference taken as real when a setting has a single seed
PAPER = {"usable_epochs": {"ar": 4.0, "mdm": 100.0}, "R_D_star": {"ar": 15.0, "mdm": 500.0},
         "c_crit": (2.12e15, 2.174)}
# The claim separates the arms only where AR's law (R_D* = 15) already values repeated data below 90% of fresh.
DISCRIMINATING_EPOCHS = usable_epochs(PAPER["R_D_star"]["ar"])
LAW_COLUMNS = ("E", "A", "B", "alpha", "beta", "R_D_star", "params_min", "params_max", "tokens_min", "tokens_max")
CLAIMS = {
    "a": ("AR's usable repetitions ≈ 4 epochs vs diffusion's ≈ 100", "≈ 4 (AR) vs ≈ 100 epochs (diffusion)"),
    "b": ("R_D* ≈ 15 (AR) vs ≈ 500 (diffusion)",
          "R_D* ≈ 15 (AR), ≈ 500 (diffusion); 32 vs 513 in a later version"),
    "c": ("diffusion wins only past a critical compute", "C_crit(U) ≈ 2.12e15·(U/1e6)^2.174 FLOPs"),
    "d": ("reversal questions favour diffusion", "diffusion answers reverse questions that AR cannot"),
}
CAVEATS = {
    "a": "changes within an arm only; ELBO and NLL levels are never compared",
    "b": "within-arm fit per arm; levels not compared",
    "c": "diffusion ELBO (upper bound) vs AR exact NLL: conservative toward diffusion",
    "d": "exact-match accuracy, binomial 95% intervals",
}


def paper_critical_compute(unique_tokens: float) -> float:
    """Prabhudesai et al.'s fitted critical compute C_crit(U) in FLOPs (C4, GPT-2 tokenizer)."""
    scale, power = PAPER["c_crit"]
    return scale * (unique_tokens / 1e6) ** power


@dataclass(frozen=True)
class Difference:
    """value ± standard error, with the floor below which a single-seed difference is noise."""

    value: float
    se: float
    floor: float

    @property
    def threshold(self) -> float:
        return max(Z * self.se, self.floor)

    @property
    def sign(self) -> int:
        """+1 or −1 when the difference is beyond the noise, 0 when within it (or NaN)."""
        if not np.isfinite(self.value) or abs(self.value) <= self.threshold:
            return 0
        return 1 if self.value > 0 else -1

    def __str__(self) -> str:
        return f"{self.value:+.3f} ± {self.threshold:.3f}"


def difference(a, b) -> Difference:
    """a − b of two cells (rows holding loss, se and floor)."""
    return Difference(a["loss"] - b["loss"], math.hypot(a["se"], b["se"]), max(a["floor"], b["floor"]))


def _combine(verdicts: list[str]) -> str:
    """Several settings' verdicts as one: supported or contradicted when at least one setting is and none says
    the opposite; both → inconclusive; else inconclusive, within noise when that is all there is."""
    found = set(verdicts)
    if SUPPORTED in found and CONTRADICTED in found:
        return INCONCLUSIVE
    for verdict in (SUPPORTED, CONTRADICTED, INCONCLUSIVE):
        if verdict in found:
            return verdict
    return WITHIN_NOISE


def wilson(k: int, n: int) -> tuple[float, float, float]:
    """Proportion k/n and its Wilson 95% interval (NaNs when n = 0)."""
    if n == 0:
        return (np.nan,) * 3
    p, z2 = k / n, Z * Z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return p, centre - half, centre + half


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """p1 − p2 and Newcombe's 95% interval (hybrid score, from the two Wilson intervals)."""
    p1, l1, u1 = wilson(k1, n1)
    p2, l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def _size_keys(runs: pd.DataFrame) -> pd.Series:
    """A model-size label shared by matched runs of different arms: run.json's size, else the size rank."""
    if "size" in runs and runs["size"].fillna("").astype(str).str.len().gt(0).all():
        return runs["size"].astype(str)
    rank = runs.groupby("arm")["params_non_embedding"].rank(method="dense").astype(int)
    return "size #" + rank.astype(str)


def cells(runs: pd.DataFrame, noise_floor: float = NOISE_FLOOR) -> pd.DataFrame:
    """One row per arm × size × U × tokens: mean final validation loss over seeds and its standard error
    (MC error of each run and, with several seeds, the spread between them); `floor` = noise_floor for a
    single seed, 0 when the spread is measured."""
    runs = runs.dropna(subset=["final_val_loss"]).assign(size_key=lambda r: _size_keys(r))
    rows = []
    for (arm, size, unique, tokens), group in runs.groupby(["arm", "size_key", "unique_tokens", "tokens"]):
        n = len(group)
        mc_se = math.sqrt((group["final_val_loss_stderr"].fillna(0.0) ** 2).sum()) / n
        seed_se = group["final_val_loss"].std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
        rows.append({"arm": arm, "objective": group["objective"].iloc[0], "backbone": group["backbone"].iloc[0],
                     "size": size, "params": group["params_non_embedding"].mean(), "unique_tokens": unique,
                     "tokens": tokens, "epochs": group["epochs"].mean(), "flops": group["flops"].mean(),
                     "loss": group["final_val_loss"].mean(), "se": math.hypot(mc_se, seed_se),
                     "floor": noise_floor if n == 1 else 0.0, "n_seeds": n,
                     "loss_kind": group["val_loss_kind"].iloc[0]})
    return pd.DataFrame(rows)


def arm_pairs(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(diffusion arm, AR arm) pairs to compare: same backbone where such pairs exist, else every pair."""
    arms = runs.drop_duplicates("arm").set_index("arm")
    diffusion = [a for a in arms.index if arms.loc[a, "objective"] == "mdm"]
    ar = [a for a in arms.index if arms.loc[a, "objective"] == "ar"]
    same = [(d, a) for d in diffusion for a in ar if arms.loc[d, "backbone"] == arms.loc[a, "backbone"]]
    return same or [(d, a) for d in diffusion for a in ar]


def repetition_penalties(table: pd.DataFrame) -> pd.DataFrame:
    """Per arm, size and total-token budget: the loss change when the budget is spent on repeated instead of
    fresh data (each repeated setting against the one with fewest epochs)."""
    rows = []
    for (arm, size, tokens), group in table.groupby(["arm", "size", "tokens"]):
        if len(group) < 2:
            continue
        group = group.sort_values("epochs")
        fresh = group.iloc[0]
        for _, repeated in group.iloc[1:].iterrows():
            d = difference(repeated, fresh)
            rows.append({"arm": arm, "objective": fresh["objective"], "size": size, "tokens": tokens,
                         "unique fresh": fresh["unique_tokens"], "unique repeated": repeated["unique_tokens"],
                         "epochs fresh": fresh["epochs"], "epochs repeated": repeated["epochs"],
                         "loss fresh": fresh["loss"], "loss repeated": repeated["loss"], "penalty": d.value,
                         "se": d.se, "floor": d.floor, "noise (±)": d.threshold,
                         "repetition": {1: "hurts", -1: "helps", 0: "no change beyond noise"}[d.sign]})
    return pd.DataFrame(rows)


def arm_gaps(table: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Matched settings (size, U, tokens) of each pair: diffusion ELBO − AR NLL, ordered by compute."""
    rows = []
    for d_arm, a_arm in pairs:
        both = table[table["arm"] == d_arm].merge(table[table["arm"] == a_arm], on=["size", "unique_tokens", "tokens"],
                                                  suffixes=("_d", "_a"))
        for _, row in both.iterrows():
            d = Difference(row["loss_d"] - row["loss_a"], math.hypot(row["se_d"], row["se_a"]),
                           max(row["floor_d"], row["floor_a"]))
            rows.append({"diffusion": d_arm, "ar": a_arm, "size": row["size"], "unique_tokens": row["unique_tokens"],
                         "tokens": row["tokens"], "epochs": row["epochs_d"],
                         "flops_d": row["flops_d"], "flops_a": row["flops_a"], "loss diffusion (ELBO)": row["loss_d"],
                         "loss AR (NLL)": row["loss_a"], "gap": d.value, "noise (±)": d.threshold,
                         "ahead": {1: a_arm, -1: d_arm, 0: "neither (within noise)"}[d.sign],
                         "paper C_crit(U)": paper_critical_compute(row["unique_tokens"])})
    return pd.DataFrame(rows).sort_values(["diffusion", "ar", "unique_tokens", "flops_d"]) if rows else pd.DataFrame()


def compute_frontiers(table: pd.DataFrame, gaps: pd.DataFrame) -> pd.DataFrame:
    """Per pair and U, at each matched setting's compute C: each arm's best loss over its runs with compute ≤ C
    (the Pareto frontier), and diffusion − AR between the two frontiers."""
    rows = []
    for (d_arm, a_arm, unique), group in gaps.groupby(["diffusion", "ar", "unique_tokens"]) if len(gaps) else []:
        mine = table[table["unique_tokens"] == unique]
        for budget in sorted(set(np.maximum(group["flops_d"], group["flops_a"]))):
            best = {arm: mine[(mine["arm"] == arm) & (mine["flops"] <= budget)].sort_values("loss").iloc[0]
                    for arm in (d_arm, a_arm)}
            d = difference(best[d_arm], best[a_arm])
            rows.append({"diffusion": d_arm, "ar": a_arm, "unique_tokens": unique, "flops": budget,
                         "best diffusion": f"{best[d_arm]['size']}, R={best[d_arm]['epochs']:.3g}",
                         "best AR": f"{best[a_arm]['size']}, R={best[a_arm]['epochs']:.3g}",
                         "loss diffusion (ELBO)": best[d_arm]["loss"], "loss AR (NLL)": best[a_arm]["loss"],
                         "gap": d.value, "noise (±)": d.threshold,
                         "ahead": {1: a_arm, -1: d_arm, 0: "neither (within noise)"}[d.sign],
                         "paper C_crit(U)": paper_critical_compute(unique)})
    return pd.DataFrame(rows)


def reversal_table(runs: pd.DataFrame, qa: pd.DataFrame) -> pd.DataFrame:
    """Per run and direction: correct / probes with the Wilson 95% interval."""
    if qa.empty or "direction" not in qa:
        return pd.DataFrame()
    runs = runs.assign(size_key=_size_keys(runs))
    counts = (qa.assign(correct=qa["correct"].astype(bool)).groupby(["run_id", "direction"])["correct"]
              .agg(["sum", "count"]))
    rows = []
    for (run_id, direction), (k, n) in counts.iterrows():
        run = runs.set_index("run_id").loc[run_id]
        p, lo, hi = wilson(int(k), int(n))
        rows.append({"run_id": run_id, "arm": run["arm"], "size": run["size_key"],
                     "unique_tokens": run["unique_tokens"], "tokens": run["tokens"], "epochs": run["epochs"],
                     "direction": direction, "correct": int(k), "probes": int(n), "accuracy": p,
                     "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows)


def fit_readiness(runs: pd.DataFrame) -> dict[str, str | None]:
    """Per arm, None when the runs can determine R_D* (≥ 2 one-epoch runs for the single-epoch law, repeated
    data at ≥ 2 epoch counts), else the reason they cannot."""
    out = {}
    for arm, group in runs.dropna(subset=["final_val_loss"]).groupby("arm"):
        one = group["tokens"] <= group["unique_tokens"]
        repeated = group.loc[~one, "epochs"].round(3).nunique()
        reasons = ([f"{int(one.sum())} one-epoch run(s) (tokens ≤ unique tokens), the fit needs 2"]
                   if one.sum() < 2 else [])
        reasons += [f"repeated data at {repeated} epoch count(s), the fit needs 2"] if repeated < 2 else []
        out[arm] = "; ".join(reasons) or None
    return out


def fit_arms(runs: pd.DataFrame, *, bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """`fit_repetition` on the arms whose runs determine it (N = non-embedding params, loss = final validation
    loss). The R_D* interval is the bootstrap one widened to cover refits with every repeated run's loss moved
    by ±1.96 Monte-Carlo standard errors; an interval reaching the search bound is open (∞)."""
    ready = [arm for arm, reason in fit_readiness(runs).items() if reason is None]
    if not ready:
        return pd.DataFrame()
    sub = runs[runs["arm"].isin(ready)].dropna(subset=["final_val_loss"])
    frame = pd.DataFrame({"arm": sub["arm"], "params": sub["params_non_embedding"],
                          "unique_tokens": sub["unique_tokens"], "tokens": sub["tokens"],
                          "loss": sub["final_val_loss"]})
    fits = fit_repetition(frame, bootstrap=bootstrap, seed=seed).set_index("arm")
    shift = Z * sub["final_val_loss_stderr"].fillna(0.0) * (sub["tokens"] > sub["unique_tokens"])
    if (shift > 0).any():
        for sign in (1, -1):
            moved = fit_repetition(frame.assign(loss=frame["loss"] + sign * shift), bootstrap=0).set_index("arm")
            fits["R_D_star_lo"] = np.fmin(fits["R_D_star_lo"], moved["R_D_star"])
            fits["R_D_star_hi"] = np.fmax(fits["R_D_star_hi"], moved["R_D_star"])
    fits.loc[fits["R_D_star_hi"] >= 0.999 * R_STAR_RANGE[1], "R_D_star_hi"] = np.inf
    fits.loc[fits["at_bound"] & (fits["R_D_star"] >= 0.999 * R_STAR_RANGE[1]), "R_D_star_hi"] = np.inf
    for suffix in ("", "_lo", "_hi"):
        fits[f"usable_epochs{suffix}"] = [np.inf if r == np.inf else usable_epochs(r)
                                          for r in fits[f"R_D_star{suffix}"]]
    return fits.reset_index()


@dataclass(frozen=True)
class Evidence:
    """One test of one claim: its numbers, its verdict and why; `decides` is False for context-only rows."""

    claim: str
    test: str
    arms: str
    numbers: str
    verdict: str
    reason: str
    decides: bool = True


def _interval(value: float, lo: float, hi: float) -> str:
    def f(x):
        return "∞" if x == np.inf else f"{x:.3g}"
    return f"{f(value)} [{f(lo)}, {f(hi)}" + (")" if hi == np.inf else "]")


def _ordering(lo_d: float, hi_d: float, lo_a: float, hi_a: float) -> str:
    """Verdict from two intervals: diffusion's above AR's, below it, or overlapping."""
    if lo_d > hi_a:
        return SUPPORTED
    if lo_a > hi_d:
        return CONTRADICTED
    return WITHIN_NOISE


def _fit_evidence(fits: pd.DataFrame, readiness: dict, pairs, objectives: dict) -> list[Evidence]:
    out = []
    fitted = fits.set_index("arm") if len(fits) else pd.DataFrame()
    for d_arm, a_arm in pairs:
        arms = f"{d_arm} vs {a_arm}"
        unfit = {arm: readiness.get(arm) or "not fitted" for arm in (d_arm, a_arm) if arm not in fitted.index
                 or not np.isfinite(fitted.loc[arm, "R_D_star"])}
        if unfit:
            why = "; ".join(f"{arm}: {reason}" for arm, reason in unfit.items())
            for claim in ("a", "b"):
                out.append(Evidence(claim, "fit of the data-constrained law", arms, "no fit", NOT_TESTABLE,
                                    f"the fit is not determined by these runs ({why})"))
            continue
        d, a = fitted.loc[d_arm], fitted.loc[a_arm]
        borrowed = {"c4-exponents", "c4-scaled"} & {d["method"], a["method"]}
        form = f"fit form: {d['method']} / {a['method']}" + (
            " (exponents borrowed from Muennighoff's C4 fit)" if borrowed else "")
        for claim, key, paper in (("b", "R_D_star", PAPER["R_D_star"]), ("a", "usable_epochs", PAPER["usable_epochs"])):
            verdict = _ordering(d[f"{key}_lo"], d[f"{key}_hi"], a[f"{key}_lo"], a[f"{key}_hi"])
            inside = [f"{arm} {'in' if row[f'{key}_lo'] <= paper[objectives[arm]] <= row[f'{key}_hi'] else 'out'}side"
                      for arm, row in ((d_arm, d), (a_arm, a))]
            label = "R_D*" if key == "R_D_star" else "usable epochs (repeated data worth ≥ 90% of fresh)"
            numbers = (f"{label}: {d_arm} {_interval(d[key], d[f'{key}_lo'], d[f'{key}_hi'])}, "
                       f"{a_arm} {_interval(a[key], a[f'{key}_lo'], a[f'{key}_hi'])} (95% bootstrap + MC noise); "
                       f"R² {d['r2']:.3f} / {a['r2']:.3f}; {form}")
            reason = {SUPPORTED: "diffusion's interval lies above AR's", WITHIN_NOISE: "the intervals overlap",
                      CONTRADICTED: "AR's interval lies above diffusion's"}[verdict]
            reason += f"; paper values: {', '.join(inside)} the intervals"
            out.append(Evidence(claim, "fit of the data-constrained law", arms, numbers, verdict, reason))
    return out


def _penalty_evidence(penalties: pd.DataFrame, pairs) -> list[Evidence]:
    """(a) at equal total tokens: AR's repetition penalty minus diffusion's, where the claim separates them."""
    out = []
    for d_arm, a_arm in pairs:
        arms = f"{d_arm} vs {a_arm}"
        keys = ["size", "tokens", "unique fresh", "unique repeated"]
        both = penalties[penalties["arm"] == d_arm].merge(penalties[penalties["arm"] == a_arm], on=keys,
                                                          suffixes=("_d", "_a")) if len(penalties) else penalties
        if both.empty:
            out.append(Evidence("a", "equal-token fresh vs repeated", arms, "no matched settings", NOT_TESTABLE,
                                "no total-token budget was spent both on fresh and on repeated data in both arms"))
            continue
        parts, verdicts = [], []
        for _, row in both.iterrows():
            d = Difference(row["penalty_a"] - row["penalty_d"], math.hypot(row["se_a"], row["se_d"]),
                           max(row["floor_a"], row["floor_d"]))
            parts.append(f"{row['epochs repeated_d']:.3g} vs {row['epochs fresh_d']:.3g} epochs at "
                         f"{short_count(row['tokens'])} tokens: penalty {d_arm} {row['penalty_d']:+.3f}, "
                         f"{a_arm} {row['penalty_a']:+.3f}, AR − diffusion {d}")
            if row["epochs repeated_d"] > DISCRIMINATING_EPOCHS:
                verdicts.append({1: SUPPORTED, -1: CONTRADICTED, 0: WITHIN_NOISE}[d.sign])
        if not verdicts:
            verdict, reason = NOT_TESTABLE, (
                f"repeated data at most {both['epochs repeated_d'].max():.3g} epochs; the claim separates the arms "
                f"only beyond {DISCRIMINATING_EPOCHS:.3g} epochs, where AR's law (R_D* = 15) values repeated data "
                "below 90% of fresh")
        else:
            verdict = _combine(verdicts)
            reason = {SUPPORTED: "repetition costs AR more than diffusion beyond the noise",
                      CONTRADICTED: "repetition costs diffusion more than AR beyond the noise",
                      WITHIN_NOISE: "the penalties differ by less than the noise",
                      INCONCLUSIVE: "settings disagree"}[verdict]
        out.append(Evidence("a", "equal-token fresh vs repeated", arms, "; ".join(parts), verdict, reason))
    return out


def _sweep_evidence(table: pd.DataFrame, pairs) -> list[Evidence]:
    """(a) at fixed U and size over ≥ 3 epoch counts: does diffusion keep improving after AR's best epoch count?"""
    out = []
    for d_arm, a_arm in pairs:
        arms = f"{d_arm} vs {a_arm}"
        both = table[table["arm"] == d_arm].merge(table[table["arm"] == a_arm], on=["size", "unique_tokens", "tokens"],
                                                  suffixes=("_d", "_a"))
        parts, verdicts = [], []
        for (size, unique), sweep in both.groupby(["size", "unique_tokens"]):
            if len(sweep) < 3 or sweep["epochs_d"].max() <= DISCRIMINATING_EPOCHS:
                continue
            sweep = sweep.sort_values("epochs_d").reset_index(drop=True)
            cell = {s: sweep[[f"loss_{s}", f"se_{s}", f"floor_{s}"]].set_axis(["loss", "se", "floor"], axis=1)
                    for s in "da"}

            def keeps_improving(arm: str, after: int) -> Difference | None:
                later = cell[arm].iloc[after + 1:]
                return difference(cell[arm].iloc[after], later.loc[later["loss"].idxmin()]) if len(later) else None

            best = {s: int(cell[s]["loss"].idxmin()) for s in "da"}
            gain_d, gain_a = keeps_improving("d", best["a"]), keeps_improving("a", best["d"])
            d_gains, a_gains = bool(gain_d and gain_d.sign > 0), bool(gain_a and gain_a.sign > 0)
            verdicts.append(INCONCLUSIVE if d_gains and a_gains else SUPPORTED if d_gains else
                            CONTRADICTED if a_gains else WITHIN_NOISE)
            parts.append(f"U={short_count(unique)}, {size}: best at {sweep['epochs_a'][best['a']]:.3g} epochs "
                         f"({a_arm}) and "
                         f"{sweep['epochs_d'][best['d']]:.3g} ({d_arm}); {d_arm} gains after {a_arm}'s best: "
                         f"{gain_d or '—'}; {a_arm} gains after {d_arm}'s best: {gain_a or '—'}")
        if not parts:
            out.append(Evidence("a", "epoch sweep at fixed U", arms, "no sweep", NOT_TESTABLE,
                                f"no (size, U) with ≥ 3 epoch counts reaching beyond {DISCRIMINATING_EPOCHS:.3g} "
                                "epochs in both arms"))
            continue
        verdict = _combine(verdicts)
        reason = {SUPPORTED: "diffusion keeps improving, beyond the noise, after AR's best epoch count",
                  CONTRADICTED: "AR keeps improving, beyond the noise, after diffusion's best epoch count",
                  WITHIN_NOISE: "neither arm improves beyond the noise after the other's best epoch count",
                  INCONCLUSIVE: "settings disagree"}[verdict]
        out.append(Evidence("a", "epoch sweep at fixed U", arms, "; ".join(parts), verdict, reason))
    return out


def _compute_evidence(frontiers: pd.DataFrame, fits: pd.DataFrame, pairs) -> list[Evidence]:
    """(c) per U: which arm's compute frontier is ahead, as compute C = 6·N·D grows?"""
    out = []
    for d_arm, a_arm in pairs:
        arms = f"{d_arm} vs {a_arm}"
        mine = (frontiers[(frontiers["diffusion"] == d_arm) & (frontiers["ar"] == a_arm)] if len(frontiers)
                else frontiers)
        if mine.empty:
            out.append(Evidence("c", "compute frontiers", arms, "no matched runs", NOT_TESTABLE,
                                "no setting (size, U, tokens) was trained in both arms"))
            continue
        parts, verdicts = [], []
        for unique, group in mine.groupby("unique_tokens"):
            a_ahead = group.loc[group["ahead"] == a_arm, "flops"]
            d_ahead = group.loc[group["ahead"] == d_arm, "flops"]
            c_paper = paper_critical_compute(unique)
            parts.append(f"U={short_count(unique)}: " + ", ".join(
                f"C={row['flops']:.2g} gap {row['gap']:+.3f} ± {row['noise (±)']:.3f}" for _, row in group.iterrows())
                + f" (paper C_crit {c_paper:.2g})")
            if len(a_ahead) and len(d_ahead):
                verdicts.append(SUPPORTED if a_ahead.max() < d_ahead.min() else
                                CONTRADICTED if d_ahead.max() < a_ahead.min() else INCONCLUSIVE)
            elif len(d_ahead):
                verdicts.append(INCONCLUSIVE)
            elif len(a_ahead):
                verdicts.append(NOT_TESTABLE if group["flops"].max() < c_paper else INCONCLUSIVE)
            else:
                verdicts.append(WITHIN_NOISE)
        testable = [v for v in verdicts if v != NOT_TESTABLE]
        if not testable:
            verdict = NOT_TESTABLE
            reason = ("AR is ahead, and every run lies below the paper's critical compute for its U, where the claim "
                      "expects AR ahead")
        else:
            verdict = _combine(testable)
            reason = {SUPPORTED: "AR ahead at lower compute, diffusion ahead at higher compute (same U)",
                      CONTRADICTED: "diffusion ahead at lower compute, AR ahead at higher compute (same U)",
                      WITHIN_NOISE: "the arms are within noise of each other",
                      INCONCLUSIVE: "no crossover from AR to diffusion is resolved: diffusion ahead throughout, AR "
                                    "ahead beyond the paper's C_crit (AR ahead of an ELBO does not show AR ahead of "
                                    "the NLL), or settings disagree"}[verdict]
        out.append(Evidence("c", "compute frontiers", arms, "; ".join(parts), verdict, reason))
        if len(fits) and {d_arm, a_arm} <= set(fits["arm"]) and set(LAW_COLUMNS) <= set(fits.columns):
            crossings = []
            for unique in sorted(mine["unique_tokens"].unique()):
                c = critical_compute(fits, unique_tokens=unique, arms=(a_arm, d_arm))
                where = f"{c:.2g} FLOPs" if c else "no crossing in the fitted range"
                crossings.append(f"U={short_count(unique)}: {where} (paper {paper_critical_compute(unique):.2g})")
            out.append(Evidence("c", "fitted laws' crossing", arms, "; ".join(crossings), "—",
                                "context only: the crossing has no confidence interval here", decides=False))
    return out


def _reversal_evidence(reversal: pd.DataFrame, pairs) -> list[Evidence]:
    """(d) reverse-question accuracy, diffusion − AR, pooled over the settings both arms were trained on."""
    out = []
    for d_arm, a_arm in pairs:
        arms = f"{d_arm} vs {a_arm}"
        if reversal.empty:
            out.append(Evidence("d", "reverse-question accuracy", arms, "no probes", NOT_TESTABLE,
                                "no QA probes were run"))
            continue
        keys = ["size", "unique_tokens", "tokens"]
        matched = reversal.loc[reversal["arm"] == d_arm, keys].merge(reversal.loc[reversal["arm"] == a_arm, keys])
        matched = matched.drop_duplicates()
        pooled = reversal.merge(matched, on=keys).groupby(["arm", "direction"])[["correct", "probes"]].sum()
        need = [(arm, direction) for arm in (d_arm, a_arm) for direction in ("forward", "reverse")]
        if any(key not in pooled.index for key in need):
            out.append(Evidence("d", "reverse-question accuracy", arms, "no matched probes", NOT_TESTABLE,
                                "the two arms were not probed forward and in reverse on the same settings"))
            continue
        k = {key: int(pooled.loc[key, "correct"]) for key in need}
        n = {key: int(pooled.loc[key, "probes"]) for key in need}
        acc = {key: f"{k[key]}/{n[key]}" for key in need}
        d_rev, a_rev = (d_arm, "reverse"), (a_arm, "reverse")
        diff, lo, hi = newcombe(k[d_rev], n[d_rev], k[a_rev], n[a_rev])
        numbers = (f"reverse {d_arm} {acc[(d_arm, 'reverse')]}, {a_arm} {acc[(a_arm, 'reverse')]}; forward "
                   f"{d_arm} {acc[(d_arm, 'forward')]}, {a_arm} {acc[(a_arm, 'forward')]}; reverse difference "
                   f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        if k[(d_arm, "forward")] == 0 and k[(a_arm, "forward")] == 0:
            verdict = NOT_TESTABLE
            reason = "neither arm answers forward questions, so the facts were not learned to be reversed"
        else:
            verdict = SUPPORTED if lo > 0 else CONTRADICTED if hi < 0 else WITHIN_NOISE
            reason = {SUPPORTED: "diffusion answers more reverse questions (Newcombe 95% interval above 0)",
                      CONTRADICTED: "AR answers more reverse questions (Newcombe 95% interval below 0)",
                      WITHIN_NOISE: "the 95% interval of the difference contains 0"}[verdict]
        out.append(Evidence("d", "reverse-question accuracy", arms, numbers, verdict, reason))
    return out


def _summarise(rows: list[Evidence]) -> tuple[str, str, str]:
    """One verdict per claim from its deciding tests: agreeing verdicts stand, disagreeing ones are inconclusive."""
    deciding = [r for r in rows if r.decides]
    testable = [r for r in deciding if r.verdict != NOT_TESTABLE]
    chosen = testable or deciding
    verdict = _combine([r.verdict for r in testable]) if testable else NOT_TESTABLE
    numbers = "\n".join(f"{r.test} ({r.arms}): {r.numbers}" for r in chosen)
    reasons = "\n".join(f"{r.test}: {r.reason}" for r in chosen)
    return verdict, numbers, reasons


@dataclass
class Claims:
    """table: one row per claim; evidence: one row per test; and the frames the tests read."""

    table: pd.DataFrame
    evidence: pd.DataFrame
    cells: pd.DataFrame
    penalties: pd.DataFrame
    gaps: pd.DataFrame
    frontiers: pd.DataFrame
    reversal: pd.DataFrame
    fits: pd.DataFrame


def judge_claims(runs: pd.DataFrame, qa: pd.DataFrame | None = None, *, fits: pd.DataFrame | None = None,
                 noise_floor: float = NOISE_FLOOR, bootstrap: int = 200) -> Claims:
    """The claims table of a study from its finished runs (frames.runs) and probe answers (frames.qa). `fits`:
    precomputed `fit_arms` output; None fits the arms whose runs determine the law."""
    qa = qa if qa is not None else pd.DataFrame()
    empty = pd.DataFrame()
    if runs.empty or "final_val_loss" not in runs:
        table = pd.DataFrame([{"claim": f"({key}) {text}", "paper": paper, "this study": "no finished runs",
                               "verdict": NOT_TESTABLE, "why": "no finished runs", "caveat": CAVEATS[key]}
                              for key, (text, paper) in CLAIMS.items()])
        return Claims(table, empty, empty, empty, empty, empty, empty, empty)
    if "flops" not in runs:
        from dlmstudy.analysis.frames import training_flops

        runs = runs.assign(flops=training_flops(runs["params_non_embedding"], runs["tokens"]))
    table = cells(runs, noise_floor)
    pairs = arm_pairs(runs)
    objectives = dict(zip(runs["arm"], runs["objective"]))
    readiness = fit_readiness(runs)
    if fits is None:
        fits = fit_arms(runs, bootstrap=bootstrap)
    penalties = repetition_penalties(table)
    gaps = arm_gaps(table, pairs)
    frontiers = compute_frontiers(table, gaps)
    reversal = reversal_table(runs, qa)
    evidence = (_fit_evidence(fits, readiness, pairs, objectives) + _penalty_evidence(penalties, pairs)
                + _sweep_evidence(table, pairs) + _compute_evidence(frontiers, fits, pairs)
                + _reversal_evidence(reversal, pairs))
    rows = []
    for key, (text, paper) in CLAIMS.items():
        mine = [e for e in evidence if e.claim == key]
        if not pairs:
            verdict, numbers, why = NOT_TESTABLE, "—", "the study needs a diffusion arm and an AR arm"
        else:
            verdict, numbers, why = _summarise(mine)
        rows.append({"claim": f"({key}) {text}", "paper": paper, "this study": numbers, "verdict": verdict,
                     "why": why, "caveat": CAVEATS[key]})
    return Claims(pd.DataFrame(rows), pd.DataFrame([e.__dict__ for e in evidence]), table, penalties, gaps, frontiers,
                  reversal, fits)
