"""The claims: what a study's runs say about the data-constrained claims of "Scaling Data-Constrained
Language Models" (Muennighoff et al., 2023) and "Diffusion Beats Autoregressive in Data-Constrained
Settings" (Prabhudesai et al., 2025), one structured verdict per claim and comparison.

Claims:
  (a) AR can use ≈ 4 epochs of repeated data, diffusion ≈ 100;
  (b) the decay constant R_D* is ≈ 15 for AR and ≈ 500 for diffusion;
  (c) diffusion beats AR only past a critical compute, C_crit(U) ≈ 2.12e15·(U/1e6)^2.174 FLOPs;
  (d) questions asked in the reverse direction favour diffusion.

Comparisons are the spec's `comparisons` when it lists them, else every diffusion arm against every AR
arm; a listed pair that cannot be compared is kept with the reason. Diverged runs never get here (the
caller passes `StudyFrames.runs`; rows marked `diverged` are dropped all the same). Losses are compared in
cells (`noise.cells`) with the seed-to-seed noise measured from replicates; the tests turn their settings
into verdicts by the rules of `verdicts`. Loss levels are compared across arms only in (c), where the
diffusion ELBO is an upper bound on its NLL: diffusion ahead is then real, AR ahead may be the bound's slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dlmstudy.analysis import verdicts as rules
from dlmstudy.analysis.effective_data import EffectiveData, effective_data_ratios
from dlmstudy.analysis.noise import Difference, cells, difference, seed_noise, size_keys
from dlmstudy.analysis.scaling import critical_compute, fit_repetition, usable_epochs
from dlmstudy.analysis.verdicts import NOT_TESTABLE, Finding, Setting, Verdict, judge
from dlmstudy.study.plan import short_count

Z = 1.96  # two-sided 95%
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
    "a": "effective data within each arm; ELBO and NLL levels are never compared",
    "b": "within-arm fit per arm; levels not compared",
    "c": "diffusion ELBO (upper bound) vs AR exact NLL: conservative toward diffusion",
    "d": "exact-match accuracy, binomial 95% intervals",
}


def paper_critical_compute(unique_tokens: float) -> float:
    """Prabhudesai et al.'s fitted critical compute C_crit(U) in FLOPs (C4, GPT-2 tokenizer)."""
    scale, power = PAPER["c_crit"]
    return scale * (unique_tokens / 1e6) ** power


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


def _pair(item) -> tuple[str, str] | None:
    """Two arm names from one `comparisons` entry: [a, b], {diffusion: a, ar: b} (or any two values), "a vs b"."""
    if isinstance(item, str):
        parts = [p.strip() for p in item.replace(" vs. ", " vs ").split(" vs ")]
    elif isinstance(item, dict):
        parts = [item["diffusion"], item["ar"]] if {"diffusion", "ar"} <= set(item) else list(item.values())
    elif isinstance(item, (list, tuple)):
        parts = list(item)
    else:
        return None
    return (str(parts[0]), str(parts[1])) if len(parts) == 2 else None


def comparisons(runs: pd.DataFrame, spec: dict | None = None) -> list[tuple[str, str, str | None]]:
    """(diffusion arm, AR arm, why it cannot be compared or None) for each comparison: the spec's `comparisons`
    when present (each pair ordered diffusion first where the runs tell), else every diffusion arm against
    every AR arm. Nothing is dropped: a pair with a problem is returned with it."""
    objectives = dict(zip(runs["arm"], runs["objective"])) if len(runs) else {}
    listed = (spec or {}).get("comparisons")
    if not listed:
        diffusion = sorted(a for a, o in objectives.items() if o == "mdm")
        ar = sorted(a for a, o in objectives.items() if o == "ar")
        return [(d, a, None) for d in diffusion for a in ar]
    out = []
    for item in listed:
        pair = _pair(item)
        if pair is None:
            out.append((str(item), "—", f"comparison {item!r} does not name two arms"))
            continue
        first, second = pair
        if objectives.get(first) == "ar" and objectives.get(second) == "mdm":
            first, second = second, first
        absent = [arm for arm in (first, second) if arm not in objectives]
        if absent:
            problem = f"no finished (non-diverged) runs of {', '.join(absent)}"
        elif (objectives[first], objectives[second]) != ("mdm", "ar"):
            problem = (f"{first} ({objectives[first]}) and {second} ({objectives[second]}) are not a diffusion and "
                       "an AR arm")
        else:
            problem = None
        out.append((first, second, problem))
    return out


def repetition_penalties(table: pd.DataFrame) -> pd.DataFrame:
    """Context: per arm, size and total-token budget, the loss change when the budget is spent on repeated
    instead of fresh data (each repeated setting against the one with fewest epochs), in nats."""
    rows = []
    for (arm, size, tokens), group in table.groupby(["arm", "size", "tokens"]) if len(table) else []:
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
                         "noise (±)": d.noise,
                         "repetition": {1: "hurts", -1: "helps", 0: "no change beyond noise"}[d.sign]})
    return pd.DataFrame(rows)


def arm_gaps(table: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Matched settings (size, U, tokens) of each pair: diffusion ELBO − AR NLL, ordered by compute."""
    rows = []
    for d_arm, a_arm in pairs:
        both = table[table["arm"] == d_arm].merge(table[table["arm"] == a_arm], on=["size", "unique_tokens", "tokens"],
                                                  suffixes=("_d", "_a"))
        for _, row in both.iterrows():
            d = Difference(row["loss_d"] - row["loss_a"], math.hypot(row["se_d"], row["se_a"]))
            rows.append({"diffusion": d_arm, "ar": a_arm, "size": row["size"], "unique_tokens": row["unique_tokens"],
                         "tokens": row["tokens"], "epochs": row["epochs_d"],
                         "flops_d": row["flops_d"], "flops_a": row["flops_a"], "loss diffusion (ELBO)": row["loss_d"],
                         "loss AR (NLL)": row["loss_a"], "gap": d.value, "noise (±)": d.noise,
                         "ahead": {1: a_arm, -1: d_arm, 0: "neither (within noise)"}[d.sign],
                         "replicated": bool(row["replicated_d"] and row["replicated_a"]),
                         "paper C_crit(U)": paper_critical_compute(row["unique_tokens"])})
    return pd.DataFrame(rows).sort_values(["diffusion", "ar", "unique_tokens", "flops_d"]) if rows else pd.DataFrame()


def compute_frontiers(table: pd.DataFrame, gaps: pd.DataFrame) -> pd.DataFrame:
    """Per pair and U, at each matched setting's compute C: each arm's best loss over its cells with compute ≤ C
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
                         "gap": d.value, "noise (±)": d.noise,
                         "ahead": {1: a_arm, -1: d_arm, 0: "neither (within noise)"}[d.sign],
                         "replicated": bool(best[d_arm]["replicated"] and best[a_arm]["replicated"]),
                         "paper C_crit(U)": paper_critical_compute(unique)})
    return pd.DataFrame(rows)


def reversal_table(runs: pd.DataFrame, qa: pd.DataFrame) -> pd.DataFrame:
    """Per run and direction: correct / probes with the Wilson 95% interval."""
    if qa.empty or "direction" not in qa or runs.empty:
        return pd.DataFrame()
    runs = runs.assign(size_key=size_keys(runs)).set_index("run_id")
    qa = qa[qa["run_id"].isin(runs.index)]
    counts = (qa.assign(correct=qa["correct"].astype(bool)).groupby(["run_id", "direction"])["correct"]
              .agg(["sum", "count"]))
    rows = []
    for (run_id, direction), (k, n) in counts.iterrows():
        run = runs.loc[run_id]
        p, lo, hi = wilson(int(k), int(n))
        rows.append({"run_id": run_id, "arm": run["arm"], "size": run["size_key"],
                     "unique_tokens": run["unique_tokens"], "tokens": run["tokens"], "epochs": run["epochs"],
                     "direction": direction, "correct": int(k), "probes": int(n), "accuracy": p,
                     "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows)


def fit_readiness(runs: pd.DataFrame) -> dict[str, str | None]:
    """Per arm, None when the runs can be fitted for R_D* (≥ 2 one-epoch runs for the single-epoch law, repeated
    data at ≥ 2 epoch counts), else the reason they cannot. Whether the fit then bounds R_D* is the fit's."""
    out = {}
    for arm, group in runs.dropna(subset=["final_val_loss"]).groupby("arm"):
        one = group["tokens"] <= group["unique_tokens"]
        repeated = group.loc[~one, "epochs"].round(3).nunique()
        reasons = ([f"{int(one.sum())} one-epoch run(s) (tokens ≤ unique tokens), the fit needs 2"]
                   if one.sum() < 2 else [])
        reasons += [f"repeated data at {repeated} epoch count(s), the fit needs 2"] if repeated < 2 else []
        out[arm] = "; ".join(reasons) or None
    return out


def fit_arms(runs: pd.DataFrame, *, bootstrap: int = 0, seed: int = 0) -> pd.DataFrame:
    """`fit_repetition` on the arms whose runs can be fitted (N = non-embedding params, loss = final validation
    loss on one set; each run's standard error combines its ELBO Monte-Carlo error and its arm's seed-to-seed
    noise, measured or assumed, as the floor of the fit's noise), with usable epochs for R_D* and its interval
    ends. `runs` names the runs each fit used."""
    ready = [arm for arm, reason in fit_readiness(runs).items() if reason is None]
    if not ready:
        return pd.DataFrame()
    sub = runs[runs["arm"].isin(ready)].dropna(subset=["final_val_loss"])
    noise = seed_noise(runs)
    seed_sd = np.array([noise.sd(arm)[0] for arm in sub["arm"]])
    frame = pd.DataFrame({"arm": sub["arm"], "params": sub["params_non_embedding"],
                          "unique_tokens": sub["unique_tokens"], "tokens": sub["tokens"],
                          "loss": sub["final_val_loss"], "run_id": sub["run_id"],
                          "loss_se": np.hypot(sub["final_val_loss_stderr"].fillna(0.0), seed_sd)})
    fits = fit_repetition(frame, bootstrap=bootstrap, seed=seed)
    for suffix in ("", "_lo", "_hi"):
        fits[f"usable_epochs{suffix}"] = [1.0 if r == 0 else usable_epochs(r) for r in fits[f"R_D_star{suffix}"]]
    return fits


def interval_text(value: float, lo: float, hi: float, open_below: bool) -> str:
    """'v [lo, hi]', or what an interval open at one end (R_D* not identified) bounds: '> lo', '< hi'."""
    if hi == np.inf and open_below:
        return "not identified (unbounded)"
    if hi == np.inf:
        return f"> {lo:.3g} (not identified)"
    if open_below:
        return f"< {hi:.3g} (not identified)"
    return f"{value:.3g} [{lo:.3g}, {hi:.3g}]"


def ratio_text(reads: str, lo: float, hi: float) -> str:
    """D_eq/D as read with its interval; a bound whose every draw lies beyond the curve is the bound alone."""
    if lo == hi and lo in (0.0, np.inf):
        return reads
    return f"{reads} [{lo:.3g}, {'∞' if hi == np.inf else f'{hi:.3g}'}]"


def _replicated_settings(table: pd.DataFrame, arm: str) -> int:
    return int(table.loc[table["arm"] == arm, "replicated"].sum()) if len(table) else 0


def _fit_findings(fits: pd.DataFrame, readiness: dict, table: pd.DataFrame, d_arm: str, a_arm: str,
                  objectives: dict) -> list[Finding]:
    """(b) R_D* and (a) usable epochs from each arm's fit: ordered intervals point one way; overlapping intervals
    are within noise when both are closed and not testable when one is open (the grid cannot bound R_D*). A fit
    pools every setting: it counts as replicated when each arm has REPLICATED_SETTINGS replicated cells."""
    fitted = fits.set_index("arm") if len(fits) else pd.DataFrame()
    unfit = {arm: readiness.get(arm) or "not fitted" for arm in (d_arm, a_arm)
             if arm not in fitted.index or not np.isfinite(fitted.loc[arm, "R_D_star"])}
    if unfit:
        why = "; ".join(f"{arm}: {reason}" for arm, reason in unfit.items())
        return [Finding(claim, "fit of the data-constrained law", NOT_TESTABLE, "no fit",
                        f"the runs cannot be fitted ({why})") for claim in ("b", "a")]
    d, a = fitted.loc[d_arm], fitted.loc[a_arm]
    replicated = min(_replicated_settings(table, d_arm), _replicated_settings(table, a_arm)) >= \
        rules.REPLICATED_SETTINGS
    columns = ["arm", "R_D_star", "R_D_star_lo", "R_D_star_hi", "status", "usable_epochs", "usable_epochs_lo",
               "usable_epochs_hi", "r2", "n_runs", "degenerate", "method", "interval", "runs"]
    evidence = fits.loc[fits["arm"].isin([d_arm, a_arm]), [c for c in columns if c in fits]]
    out = []
    for claim, key, label in (("b", "R_D_star", "R_D*"), ("a", "usable_epochs", "usable epochs")):
        lo_d, hi_d, lo_a, hi_a = d[f"{key}_lo"], d[f"{key}_hi"], a[f"{key}_lo"], a[f"{key}_hi"]
        open_end = hi_d == np.inf or hi_a == np.inf or d["R_D_star_lo"] <= 0 or a["R_D_star_lo"] <= 0
        direction = 1 if lo_d > hi_a else -1 if lo_a > hi_d else None if open_end else 0
        verdict, reason = judge([Setting("the fit", direction, replicated)], needed=1)
        if direction is None:
            reason = "the intervals overlap and at least one is open: the grid cannot bound R_D* enough to tell"
        elif direction == 0:
            reason = "the intervals overlap"
        elif not replicated:
            reason = "the intervals are ordered, but the fits rest on single seeds (noise not replicated)"
        paper = PAPER[key]
        inside = [f"{arm} {'in' if row[f'{key}_lo'] <= paper[objectives[arm]] <= row[f'{key}_hi'] else 'out'}side"
                  for arm, row in ((d_arm, d), (a_arm, a))]
        flags = [f"{arm}: {row['degenerate']}" for arm, row in ((d_arm, d), (a_arm, a)) if row.get("degenerate")]
        reason += f"; paper values {', '.join(inside)} the intervals"
        reason += f"; constants not determined ({'; '.join(flags)})" if flags else ""
        decisive = (f"{label}: {d_arm} {interval_text(d[key], lo_d, hi_d, d['R_D_star_lo'] <= 0)}, "
                    f"{a_arm} {interval_text(a[key], lo_a, hi_a, a['R_D_star_lo'] <= 0)}")
        out.append(Finding(claim, "fit of the data-constrained law", verdict, decisive, reason, evidence))
    return out


def _effective_finding(effective: EffectiveData, d_arm: str, a_arm: str) -> Finding:
    """(a) D_eq/D at matched repeated settings beyond DISCRIMINATING_EPOCHS: diffusion's ratio above AR's beyond
    the 95% interval of their log difference points toward the claim."""
    test = "effective data D_eq/D"
    table = effective.table
    keys = ["size", "unique_tokens", "tokens"]
    both = (table[table["arm"] == d_arm].merge(table[table["arm"] == a_arm], on=keys, suffixes=(" d", " a"))
            if len(table) else pd.DataFrame())
    both = both[both["epochs d"] > DISCRIMINATING_EPOCHS] if len(both) else both
    if both.empty:
        return Finding("a", test, NOT_TESTABLE, "no matched setting",
                       f"no setting repeated beyond {DISCRIMINATING_EPOCHS:.3g} epochs (where AR's law, R_D* = 15, "
                       "values repeated data below 90% of fresh) in both arms with a one-epoch curve at its size")
    rows, settings = [], []
    for _, row in both.sort_values(["epochs d", "size"]).iterrows():
        key = (row["size"], row["unique_tokens"], row["tokens"])
        with np.errstate(invalid="ignore"):
            diff = effective.draws[(d_arm, *key)] - effective.draws[(a_arm, *key)]
        undecided = np.isnan(diff).mean() > 0.025
        lo, hi = np.quantile(diff[~np.isnan(diff)], [0.025, 0.975], method="inverted_cdf") if not undecided \
            else (np.nan, np.nan)
        direction = None if undecided else 1 if lo > 0 else -1 if hi < 0 else 0
        label = f"{row['size']}, {row['epochs d']:.3g} epochs"
        settings.append(Setting(label, direction, bool(row["replicated d"] and row["replicated a"])))
        rows.append({"setting": label, "unique_tokens": row["unique_tokens"], "tokens": row["tokens"],
                     f"D_eq/D {d_arm}": ratio_text(row["D_eq/D (reads) d"], row["lo d"], row["hi d"]),
                     f"D_eq/D {a_arm}": ratio_text(row["D_eq/D (reads) a"], row["lo a"], row["hi a"]),
                     "ratio diffusion / AR (95%)": "both beyond their curves" if undecided else
                     f"[{np.exp(lo):.3g}, {np.exp(hi):.3g}]",
                     "expected AR (R_D* 15)": row["expected at R_D* = 15 d"],
                     "expected diffusion (R_D* 500)": row["expected at R_D* = 500 d"],
                     "seeds": f"{row['n_seeds d']} / {row['n_seeds a']}"})
    evidence = pd.DataFrame(rows)
    verdict, reason = judge(settings)
    if verdict == NOT_TESTABLE:
        reason = "every matched loss lies beyond both arms' one-epoch curves: only bounds, which do not decide"
    last = evidence.iloc[-1]
    decisive = f"D_eq/D at {last['setting']}: {d_arm} {last[f'D_eq/D {d_arm}']}, {a_arm} {last[f'D_eq/D {a_arm}']}"
    return Finding("a", test, verdict, decisive, reason, evidence)


def _sweep_finding(table: pd.DataFrame, d_arm: str, a_arm: str) -> Finding:
    """(a) at fixed U and size over ≥ 3 epoch counts: does diffusion keep improving after AR's best epoch count
    (toward the claim), or AR after diffusion's (against)? Changes within an arm only."""
    test = "epoch sweep at fixed U"
    both = table[table["arm"] == d_arm].merge(table[table["arm"] == a_arm], on=["size", "unique_tokens", "tokens"],
                                              suffixes=("_d", "_a"))
    rows, settings = [], []
    for (size, unique), sweep in both.groupby(["size", "unique_tokens"]):
        if len(sweep) < 3 or sweep["epochs_d"].max() <= DISCRIMINATING_EPOCHS:
            continue
        sweep = sweep.sort_values("epochs_d").reset_index(drop=True)
        cell = {s: sweep[[f"loss_{s}", f"se_{s}"]].set_axis(["loss", "se"], axis=1) for s in "da"}

        def keeps_improving(arm: str, after: int) -> Difference | None:
            later = cell[arm].iloc[after + 1:]
            return difference(cell[arm].iloc[after], later.loc[later["loss"].idxmin()]) if len(later) else None

        best = {s: int(cell[s]["loss"].idxmin()) for s in "da"}
        gain_d, gain_a = keeps_improving("d", best["a"]), keeps_improving("a", best["d"])
        d_gains, a_gains = bool(gain_d and gain_d.sign > 0), bool(gain_a and gain_a.sign > 0)
        label = f"U={short_count(unique)}, {size}"
        replicated = bool(sweep["replicated_d"].all() and sweep["replicated_a"].all())
        settings.append(Setting(label, 0 if d_gains == a_gains else 1 if d_gains else -1, replicated))
        rows.append({"setting": label, f"best epochs {a_arm}": sweep["epochs_a"][best["a"]],
                     f"best epochs {d_arm}": sweep["epochs_d"][best["d"]],
                     f"{d_arm} gain after the best of {a_arm}": str(gain_d) if gain_d else "—",
                     f"{a_arm} gain after the best of {d_arm}": str(gain_a) if gain_a else "—",
                     "replicated": replicated})
    if not rows:
        return Finding("a", test, NOT_TESTABLE, "no sweep",
                       f"no (size, U) with ≥ 3 epoch counts reaching beyond {DISCRIMINATING_EPOCHS:.3g} epochs in "
                       "both arms")
    verdict, reason = judge(settings)
    decisive = "; ".join(f"{row['setting']}: best at {row[f'best epochs {a_arm}']:.3g} epochs ({a_arm}), "
                         f"{row[f'best epochs {d_arm}']:.3g} ({d_arm})" for row in rows)
    return Finding("a", test, verdict, decisive, reason, pd.DataFrame(rows))


def _compute_findings(frontiers: pd.DataFrame, fits: pd.DataFrame, d_arm: str, a_arm: str) -> list[Finding]:
    """(c) per U: AR ahead at lower compute and diffusion ahead at higher points toward the claim, the reverse
    order against; AR ahead only below the paper's C_crit cannot decide; AR ahead beyond it, diffusion ahead
    throughout, mixed orders and nothing resolved are within the noise (no crossover resolved)."""
    test = "compute frontiers"
    mine = (frontiers[(frontiers["diffusion"] == d_arm) & (frontiers["ar"] == a_arm)] if len(frontiers)
            else frontiers)
    if mine.empty:
        return [Finding("c", test, NOT_TESTABLE, "no matched runs",
                        "no setting (size, U, tokens) was trained in both arms")]
    settings, parts = [], []
    for unique, group in mine.groupby("unique_tokens"):
        a_ahead = group.loc[group["ahead"] == a_arm, "flops"]
        d_ahead = group.loc[group["ahead"] == d_arm, "flops"]
        c_paper = paper_critical_compute(unique)
        note = ""
        if len(a_ahead) and len(d_ahead):
            direction = 1 if a_ahead.max() < d_ahead.min() else -1 if d_ahead.max() < a_ahead.min() else 0
            note = "" if direction else "the arms swap the lead back and forth along the frontier"
        elif len(a_ahead):
            direction = None if group["flops"].max() < c_paper else 0
            note = ("AR ahead beyond the paper's C_crit, which the ELBO's slack can explain: no crossover "
                    "resolved")
        elif len(d_ahead):
            direction, note = 0, "diffusion ahead at every compute: no crossover resolved (it would lie lower)"
        else:
            direction = 0
        settings.append(Setting(f"U={short_count(unique)}", direction, bool(group["replicated"].all()), note))
        top = group.iloc[-1]
        parts.append(f"U={short_count(unique)}: gap {top['gap']:+.3f} ± {top['noise (±)']:.3f} at "
                     f"C={top['flops']:.2g} (paper C_crit {c_paper:.2g})")
    verdict, reason = judge(settings)
    if verdict == NOT_TESTABLE:
        reason = ("AR is ahead, and every run lies below the paper's critical compute for its U, where the claim "
                  "expects AR ahead")
    out = [Finding("c", test, verdict, "; ".join(parts), reason, mine.reset_index(drop=True))]
    law = fits[fits["arm"].isin([d_arm, a_arm])] if len(fits) else fits
    if len(law) == 2 and set(LAW_COLUMNS) | {"identified"} <= set(law.columns) and law["identified"].all():
        crossings = []
        for unique in sorted(mine["unique_tokens"].unique()):
            c = critical_compute(law, unique_tokens=unique, arms=(a_arm, d_arm))
            crossings.append({"unique_tokens": unique, "crossing (FLOPs)": c if c else np.nan,
                              "paper C_crit(U)": paper_critical_compute(unique)})
        out.append(Finding("c", "fitted laws' crossing", "—", "; ".join(
            f"U={short_count(r['unique_tokens'])}: {r['crossing (FLOPs)']:.2g}" for r in crossings),
            "context only: the crossing has no interval", pd.DataFrame(crossings), decides=False))
    return out


def _reversal_finding(reversal: pd.DataFrame, d_arm: str, a_arm: str) -> Finding:
    """(d) per setting both arms were probed on: diffusion's reverse accuracy − AR's, Newcombe's 95% interval;
    a setting where neither arm answers forward questions cannot decide (nothing learned to reverse)."""
    test = "reverse-question accuracy"
    if reversal.empty:
        return Finding("d", test, NOT_TESTABLE, "no probes", "no QA probes were run")
    keys = ["size", "unique_tokens", "tokens"]
    pooled = reversal.groupby(["arm", *keys, "direction"]).agg(correct=("correct", "sum"), probes=("probes", "sum"),
                                                               runs=("run_id", "nunique"))
    rows, settings = [], []
    matched = reversal.loc[reversal["arm"] == d_arm, keys].merge(reversal.loc[reversal["arm"] == a_arm, keys])
    for key in matched.drop_duplicates().itertuples(index=False):
        need = [(arm, *key, direction) for arm in (d_arm, a_arm) for direction in ("forward", "reverse")]
        if any(k not in pooled.index for k in need):
            continue
        k = {n[0] + " " + n[-1]: int(pooled.loc[n, "correct"]) for n in need}
        n = {m[0] + " " + m[-1]: int(pooled.loc[m, "probes"]) for m in need}
        diff, lo, hi = newcombe(k[f"{d_arm} reverse"], n[f"{d_arm} reverse"], k[f"{a_arm} reverse"],
                                n[f"{a_arm} reverse"])
        learned = k[f"{d_arm} forward"] + k[f"{a_arm} forward"] > 0
        direction = (1 if lo > 0 else -1 if hi < 0 else 0) if learned else None
        label = f"U={short_count(key[1])}, {key[0]}"
        replicated = all(pooled.loc[m, "runs"] > 1 for m in need)
        settings.append(Setting(label, direction, replicated))
        rows.append({"setting": label, **{f"{name}": f"{k[name]}/{n[name]}" for name in k},
                     "reverse difference": diff, "95% lo": lo, "95% hi": hi, "replicated": replicated})
    if not rows:
        return Finding("d", test, NOT_TESTABLE, "no matched probes",
                       "the two arms were not probed forward and in reverse on the same settings")
    verdict, reason = judge(settings)
    if verdict == NOT_TESTABLE:
        reason = "neither arm answers forward questions, so the facts were not learned to be reversed"
    row = rows[-1]
    decisive = (f"{row['setting']}: reverse {d_arm} {row[f'{d_arm} reverse']}, {a_arm} {row[f'{a_arm} reverse']}; "
                f"forward {row[f'{d_arm} forward']}, {row[f'{a_arm} forward']}; difference "
                f"{row['reverse difference']:+.3f} [{row['95% lo']:+.3f}, {row['95% hi']:+.3f}]")
    return Finding("d", test, verdict, decisive, reason, pd.DataFrame(rows))


@dataclass
class Claims:
    """verdicts: one structured `Verdict` per claim and comparison; table: the same as rows (claim, diffusion,
    ar, paper, verdict, decisive, reason, caveat); evidence: one row per test and comparison; and the frames the
    tests read: cells, noise (seed-to-seed, per arm), effective (D_eq/D per cell), penalties, gaps,
    frontiers, reversal, fits."""

    verdicts: list[Verdict]
    table: pd.DataFrame
    evidence: pd.DataFrame
    cells: pd.DataFrame
    noise: pd.DataFrame
    effective: pd.DataFrame
    penalties: pd.DataFrame
    gaps: pd.DataFrame
    frontiers: pd.DataFrame
    reversal: pd.DataFrame
    fits: pd.DataFrame


def _verdict_rows(verdicts: list[Verdict]) -> pd.DataFrame:
    return pd.DataFrame([{"claim": f"({v.claim}) {CLAIMS[v.claim][0]}", "diffusion": v.diffusion, "ar": v.ar,
                          "paper": CLAIMS[v.claim][1], "verdict": v.verdict, "decisive": v.decisive,
                          "reason": v.reason, "caveat": CAVEATS[v.claim]} for v in verdicts])


def judge_claims(runs: pd.DataFrame, qa: pd.DataFrame | None = None, *, spec: dict | None = None,
                 fits: pd.DataFrame | None = None, bootstrap: int = 0, seed: int = 0) -> Claims:
    """The verdicts of a study from its finished runs (frames.runs; rows marked diverged are dropped) and probe
    answers (frames.qa), per comparison (`comparisons`). `fits`: precomputed `fit_arms` output; None fits the
    arms whose runs can be fitted (`bootstrap` draws and `seed` passed on)."""
    qa = qa if qa is not None else pd.DataFrame()
    empty = pd.DataFrame()
    if "diverged" in runs:
        runs = runs[~runs["diverged"].fillna(False).astype(bool)]
    if runs.empty or "final_val_loss" not in runs:
        verdicts = [Verdict(key, "—", "—", NOT_TESTABLE, "—", "no finished runs") for key in CLAIMS]
        return Claims(verdicts, _verdict_rows(verdicts), empty, empty, empty, empty, empty, empty, empty, empty, empty)
    if "flops" not in runs:
        from dlmstudy.analysis.frames import training_flops

        runs = runs.assign(flops=training_flops(runs["params_non_embedding"], runs["tokens"]))
    noise = seed_noise(runs)
    table = cells(runs, noise)
    pairs = comparisons(runs, spec)
    usable = [(d, a) for d, a, problem in pairs if problem is None]
    objectives = dict(zip(runs["arm"], runs["objective"]))
    readiness = fit_readiness(runs)
    if fits is None:
        fits = fit_arms(runs, bootstrap=bootstrap, seed=seed)
    effective = effective_data_ratios(table, seed=seed)
    penalties = repetition_penalties(table)
    gaps = arm_gaps(table, usable)
    frontiers = compute_frontiers(table, gaps)
    reversal = reversal_table(runs, qa)
    verdicts, evidence = [], []
    if not pairs:
        verdicts = [Verdict(key, "—", "—", NOT_TESTABLE, "—", "the study needs a diffusion arm and an AR arm")
                    for key in CLAIMS]
    for d_arm, a_arm, problem in pairs:
        if problem is not None:
            verdicts += [Verdict(key, d_arm, a_arm, NOT_TESTABLE, "—", problem) for key in CLAIMS]
            continue
        findings = (_fit_findings(fits, readiness, table, d_arm, a_arm, objectives)
                    + [_effective_finding(effective, d_arm, a_arm), _sweep_finding(table, d_arm, a_arm)]
                    + _compute_findings(frontiers, fits, d_arm, a_arm) + [_reversal_finding(reversal, d_arm, a_arm)])
        for key in CLAIMS:
            mine = [f for f in findings if f.claim == key]
            verdict, decisive, reason = rules.combine(mine)
            verdicts.append(Verdict(key, d_arm, a_arm, verdict, decisive, reason, {f.test: f.evidence for f in mine}))
        evidence += [{"claim": f.claim, "diffusion": d_arm, "ar": a_arm, "test": f.test, "verdict": f.verdict,
                      "decisive": f.decisive, "reason": f.reason, "decides": f.decides} for f in findings]
    verdicts.sort(key=lambda v: v.claim)
    return Claims(verdicts, _verdict_rows(verdicts), pd.DataFrame(evidence), table, noise.table, effective.table,
                  penalties, gaps, frontiers, reversal, fits)
