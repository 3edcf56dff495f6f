"""The verdict rules and the claims they judge, on synthetic runs: supported needs replicated evidence beyond the
measured noise in two settings, a single seed can at most suggest, settings or tests that disagree are
inconclusive, a grid that cannot decide is not testable; effective data by hand; the measured noise floor; the
comparisons a spec lists; the fit, compute and reversal tests."""

import math

import numpy as np
import pandas as pd
import pytest

from dlmstudy.analysis.claims import comparisons, judge_claims, newcombe, wilson
from dlmstudy.analysis.effective_data import effective_data_ratios, equivalent_tokens
from dlmstudy.analysis.noise import ASSUMED_SEED_SD, cells, seed_noise
from dlmstudy.analysis.verdicts import (CONTRADICTED, CONTRADICTION_SUGGESTED, INCONCLUSIVE, NOT_TESTABLE, SUGGESTED,
                                        SUPPORTED, Finding, Setting, combine, judge)

ARMS = {"llada": ("mdm", "ELBO (upper bound on NLL)"), "qwen": ("ar", "exact NLL")}


def run(arm, unique, epochs, loss, *, stderr=0.0, params=1e6, seed=0):
    """One finished run as frames.runs holds it."""
    objective, kind = ARMS[arm]
    tokens = unique * epochs
    return {"run_id": f"{arm}_u{unique:g}_r{epochs:g}_n{params:g}_s{seed}", "arm": arm, "backbone": arm,
            "objective": objective, "params_non_embedding": params, "unique_tokens": unique, "tokens": tokens,
            "epochs": epochs, "final_val_loss": loss, "final_val_loss_stderr": stderr, "best_val_loss": loss,
            "val_loss_kind": kind, "size": f"n{params:g}", "seed": seed, "learning_rate": 1e-3,
            "flops": 6 * params * tokens}


def verdict(result, claim: str, diffusion: str = "llada", ar: str = "qwen") -> str:
    (found,) = [v for v in result.verdicts if (v.claim, v.diffusion, v.ar) == (claim, diffusion, ar)]
    return found.verdict


# --- the rules -------------------------------------------------------------------------------------------------

def test_supported_needs_replicated_evidence_in_two_settings():
    assert judge([Setting("a", 1, True), Setting("b", 1, True)])[0] == SUPPORTED
    assert judge([Setting("a", -1, True), Setting("b", -1, True), Setting("c", 0, False)])[0] == CONTRADICTED
    verdict_one, why_one = judge([Setting("a", 1, True), Setting("b", 1, False)])  # one replicated setting
    assert verdict_one == SUGGESTED and "1 replicated setting" in why_one
    verdict_single, why_single = judge([Setting("a", 1, False), Setting("b", 1, False), Setting("c", 1, False)])
    assert verdict_single == SUGGESTED and "single seed" in why_single  # a single seed at most suggests
    assert judge([Setting("a", -1, False)])[0] == CONTRADICTION_SUGGESTED


def test_disagreement_and_noise_are_inconclusive_and_an_undecidable_grid_is_not_testable():
    verdict_split, why = judge([Setting("a", 1, True), Setting("b", 1, True), Setting("c", -1, True)])
    assert verdict_split == INCONCLUSIVE and "disagree" in why
    assert judge([Setting("a", 0, True), Setting("b", 0, True)]) == (INCONCLUSIVE,
                                                                     "a: within the noise; b: within the noise")
    assert judge([Setting("a", None, True)])[0] == NOT_TESTABLE
    assert judge([Setting("a", None, False), Setting("b", 1, True)], needed=1)[0] == SUPPORTED


def test_a_claim_combines_its_tests():
    def finding(verdict, decides=True):
        return Finding("a", f"test {verdict}", verdict, f"number of {verdict}", "why", decides=decides)

    assert combine([finding(SUPPORTED), finding(SUGGESTED)])[:2] == (SUPPORTED, f"number of {SUPPORTED}")
    assert combine([finding(SUGGESTED), finding(INCONCLUSIVE), finding(NOT_TESTABLE)])[0] == SUGGESTED
    assert combine([finding(SUPPORTED), finding(CONTRADICTION_SUGGESTED)])[0] == INCONCLUSIVE  # tests disagree
    assert combine([finding(NOT_TESTABLE), finding(SUPPORTED, decides=False)])[0] == NOT_TESTABLE


# --- noise and effective data ------------------------------------------------------------------------------------

def test_the_noise_floor_is_the_pooled_seed_spread_of_replicated_cells():
    runs = pd.DataFrame([run("qwen", 1e5, 1.0, loss, seed=s) for s, loss in enumerate((3.0, 3.1, 3.2))]
                        + [run("qwen", 4e5, 1.0, loss, seed=s) for s, loss in enumerate((2.5, 2.6))]
                        + [run("qwen", 1.6e6, 1.0, 2.0), run("llada", 1e5, 1.0, 4.0)])
    noise = seed_noise(runs)
    by_hand = math.sqrt((0.01 + 0.0 + 0.01 + 0.0025 + 0.0025) / (2 + 1))  # squared deviations / Σ(n − 1)
    assert noise.sd("qwen") == pytest.approx((by_hand, "measured: 2 replicated cell(s) of qwen"))
    assert noise.sd("llada") == pytest.approx((by_hand, "measured: 2 replicated cell(s) of all arms"))
    table = cells(runs, noise).set_index(["arm", "unique_tokens"])
    assert table.loc[("qwen", 1e5), "se"] == pytest.approx(by_hand / math.sqrt(3))
    assert table.loc[("qwen", 1.6e6), "se"] == pytest.approx(by_hand)  # a single seed gets the measured floor
    assert not table.loc[("qwen", 1.6e6), "replicated"] and table.loc[("qwen", 1.6e6), "measured"]
    lone = seed_noise(pd.DataFrame([run("qwen", 1e5, 1.0, 3.0)]))
    assert lone.sd("qwen") == (ASSUMED_SEED_SD, f"assumed {ASSUMED_SEED_SD} (no replicated cell)")


def test_effective_data_by_hand():
    # One-epoch curve: 4.0 nats at 1,000 fresh tokens, 3.0 at 4,000. A loss of 3.5 is reached halfway in log D, at
    # D_eq = √(1000 · 4000) = 2000 tokens; trained on 8000 (2000 unique × 4 epochs), D_eq/D = 0.25.
    assert equivalent_tokens(np.array([1000.0, 4000.0]), np.array([4.0, 3.0]), 3.5)[0] == pytest.approx(2000.0)
    assert equivalent_tokens(np.array([1000.0, 4000.0]), np.array([4.0, 3.0]), [2.5, 4.5]).tolist() == [np.inf, 0.0]
    runs = pd.DataFrame([run("qwen", 1000, 1.0, 4.0), run("qwen", 4000, 1.0, 3.0), run("qwen", 2000, 4.0, 3.5),
                         run("qwen", 500, 16.0, 2.5), run("qwen", 250, 32.0, 4.5)])
    table = effective_data_ratios(cells(runs), draws=2000).table.set_index("epochs")
    assert table.loc[4.0, "D_eq/D"] == pytest.approx(0.25)
    assert table.loc[4.0, "lo"] < 0.25 < table.loc[4.0, "hi"]
    assert table.loc[4.0, "expected at R_D* = 15"] == pytest.approx((2000 + 2000 * 15 * -np.expm1(-3 / 15)) / 8000)
    assert table.loc[16.0, "D_eq/D (reads)"] == "> 0.5"  # better than the curve's best: a lower bound only
    assert table.loc[32.0, "D_eq/D (reads)"] == "< 0.125"
    again = effective_data_ratios(cells(runs), draws=2000).table
    pd.testing.assert_frame_equal(effective_data_ratios(cells(runs), draws=2000).table, again, check_exact=True)


def value_study(ratio_d, ratio_a, *, seeds=1, spread=0.005):
    """Two sizes; per arm a one-epoch curve L = 8 − 0.3·ln D and a 16-epoch cell whose loss is the curve's at
    D_eq = ratio × D; each cell `seeds` times with losses spread by ±`spread`."""
    rows = []
    for params in (1e6, 4e6):
        for arm, ratio in (("llada", ratio_d), ("qwen", ratio_a)):
            offset = 1.0 if arm == "llada" else 0.0  # levels differ across arms; ratios do not care
            settings = [(d, 1.0, 8 + offset - 0.3 * math.log(d)) for d in (1e5, 4e5, 1.6e6)]
            settings.append((1e5, 16.0, 8 + offset - 0.3 * math.log(ratio * 1.6e6)))
            for unique, epochs, loss in settings:
                for s in range(seeds):
                    shift = spread * (s - (seeds - 1) / 2)
                    rows.append(run(arm, unique, epochs, loss + shift, params=params, seed=s))
    return pd.DataFrame(rows)


def test_repetition_claim_compares_effective_data_and_follows_the_replication_rule():
    replicated = judge_claims(value_study(0.9, 0.2, seeds=3))
    assert verdict(replicated, "a") == SUPPORTED
    assert "D_eq/D" in replicated.table.loc[0, "decisive"] and replicated.noise["dof"].gt(0).all()
    single = judge_claims(value_study(0.9, 0.2))
    assert verdict(single, "a") == SUGGESTED and "single seed" in single.table.loc[0, "reason"]
    assert verdict(judge_claims(value_study(0.2, 0.9, seeds=3)), "a") == CONTRADICTED
    # The arms value repeats alike (the paper's 0.66 vs 0.65): within the noise, whatever the nats say.
    assert verdict(judge_claims(value_study(0.66, 0.65, seeds=3)), "a") == INCONCLUSIVE


def test_repetition_claim_is_not_testable_below_the_discriminating_epochs():
    runs = value_study(0.9, 0.2).assign(epochs=lambda f: f["epochs"].where(f["epochs"] == 1.0, 4.0))
    runs["unique_tokens"] = runs["tokens"] / runs["epochs"]
    result = judge_claims(runs)
    assert verdict(result, "a") == NOT_TESTABLE
    assert "beyond 5.08 epochs" in result.table.loc[0, "reason"]


# --- comparisons ----------------------------------------------------------------------------------------------------

def test_comparisons_come_from_the_spec_and_no_pair_is_dropped():
    runs = pd.DataFrame([run("qwen", 1e5, 4.0, 3.0), run("llada", 1e5, 4.0, 3.5)])
    assert comparisons(runs) == [("llada", "qwen", None)]
    listed = comparisons(runs, {"comparisons": [["qwen", "llada"], {"diffusion": "llada", "ar": "qwen-ar-reg"},
                                                "llada vs llada", 7]})
    assert listed[0] == ("llada", "qwen", None)  # ordered diffusion first
    assert listed[1] == ("llada", "qwen-ar-reg", "no finished (non-diverged) runs of qwen-ar-reg")
    assert "not a diffusion and an AR arm" in listed[2][2] and "does not name two arms" in listed[3][2]
    result = judge_claims(runs, spec={"comparisons": [["llada", "qwen"], ["llada", "qwen-ar-reg"]]},
                          fits=pd.DataFrame())
    assert len(result.verdicts) == 8 and len(result.table) == 8
    assert verdict(result, "b", "llada", "qwen-ar-reg") == NOT_TESTABLE


# --- the other claims --------------------------------------------------------------------------------------------

def fits_frame(mdm, ar):
    """A fit_arms-like frame: (R_D*, lo, hi) per arm."""
    rows = []
    for arm, (r, lo, hi) in (("llada", mdm), ("qwen", ar)):
        rows.append({"arm": arm, "R_D_star": r, "R_D_star_lo": lo, "R_D_star_hi": hi, "usable_epochs": r / 3,
                     "usable_epochs_lo": lo / 3, "usable_epochs_hi": hi / 3, "r2": 0.99, "method": "full",
                     "status": "identified", "identified": hi < np.inf and lo > 0, "n_runs": 10, "degenerate": "",
                     "interval": "profile F(1, 4)", "runs": ""})
    return pd.DataFrame(rows)


def test_fit_claims_compare_intervals_and_an_open_interval_cannot_decide():
    single = value_study(0.9, 0.2)
    assert verdict(judge_claims(single, fits=fits_frame((400, 200, 900), (15, 10, 25))), "b") == SUGGESTED
    replicated = value_study(0.9, 0.2, seeds=2)
    assert verdict(judge_claims(replicated, fits=fits_frame((400, 200, 900), (15, 10, 25))), "b") == SUPPORTED
    assert verdict(judge_claims(replicated, fits=fits_frame((10, 5, 20), (400, 200, 900))), "b") == CONTRADICTED
    assert verdict(judge_claims(single, fits=fits_frame((60, 20, 300), (15, 8, 40))), "b") == INCONCLUSIVE
    open_ended = judge_claims(single, fits=fits_frame((60, 20, np.inf), (15, 8, 40)))
    assert verdict(open_ended, "b") == NOT_TESTABLE and "cannot bound" in open_ended.table.loc[1, "reason"]
    assert verdict(judge_claims(single, fits=fits_frame((400, 200, np.inf), (15, 8, 40))), "b") == SUGGESTED
    bare = fits_frame((400, 200, 900), (15, 10, 25))[["arm", "R_D_star", "R_D_star_lo", "R_D_star_hi", "usable_epochs",
                                                      "usable_epochs_lo", "usable_epochs_hi", "r2", "method"]]
    assert verdict(judge_claims(single, fits=bare), "b") == SUGGESTED  # a fits frame of its own, fewer columns
    unfitted = judge_claims(single)
    assert verdict(unfitted, "b") == NOT_TESTABLE and "epoch count(s)" in unfitted.table.loc[1, "reason"]


def compute_study(ar_losses, mdm_losses, sizes=(1e7, 1e8, 1e9), unique=1e5, seeds=1):
    """Both arms at one U and epoch count, growing model size (so compute) with the given losses."""
    return pd.DataFrame([run(arm, unique, 4.0, loss + 0.001 * s, params=n, seed=s)
                         for arm, losses in (("qwen", ar_losses), ("llada", mdm_losses))
                         for n, loss in zip(sizes, losses) for s in range(seeds)])


def test_critical_compute_claim_compares_compute_frontiers():
    crossover = judge_claims(compute_study([3.0, 2.8, 2.7], [3.3, 2.9, 2.5]), fits=pd.DataFrame())
    assert verdict(crossover, "c") == SUGGESTED  # one U, one seed
    assert crossover.frontiers["ahead"].tolist() == ["qwen", "qwen", "llada"]
    two_u = pd.concat([compute_study([3.0, 2.8, 2.7], [3.3, 2.9, 2.5], unique=u, seeds=2) for u in (1e5, 2e5)])
    assert verdict(judge_claims(two_u, fits=pd.DataFrame()), "c") == SUPPORTED
    reversed_order = judge_claims(compute_study([3.3, 2.9, 2.5], [3.0, 2.8, 2.7]), fits=pd.DataFrame())
    assert verdict(reversed_order, "c") == CONTRADICTION_SUGGESTED
    # AR ahead everywhere: not testable while every run lies below the paper's C_crit(U = 1e5) ≈ 1.4e13 FLOPs...
    ar_ahead = ([3.0, 2.9, 2.8], [3.3, 3.2, 3.1])
    small = judge_claims(compute_study(*ar_ahead, sizes=(1e3, 2e3, 4e3)), fits=pd.DataFrame())
    assert verdict(small, "c") == NOT_TESTABLE
    # ...and never "contradicted" past it, since AR ahead of an ELBO upper bound does not show AR ahead of the NLL.
    beyond = judge_claims(compute_study(*ar_ahead), fits=pd.DataFrame())
    assert verdict(beyond, "c") == INCONCLUSIVE and "ELBO" in beyond.table.loc[2, "reason"]


def qa_rows(run_id, arm, direction, correct, total):
    return [{"run_id": run_id, "arm": arm, "direction": direction, "correct": i < correct} for i in range(total)]


def reversal_case(mdm_reverse, ar_reverse, forward=30, total=40):
    runs = pd.DataFrame([run("qwen", 1e5, 4.0, 3.0), run("llada", 1e5, 4.0, 3.5)])
    ids = dict(zip(runs["arm"], runs["run_id"]))
    qa = pd.DataFrame(qa_rows(ids["llada"], "llada", "reverse", mdm_reverse, total)
                      + qa_rows(ids["qwen"], "qwen", "reverse", ar_reverse, total)
                      + qa_rows(ids["llada"], "llada", "forward", forward, total)
                      + qa_rows(ids["qwen"], "qwen", "forward", forward, total))
    return judge_claims(runs, qa, fits=pd.DataFrame())


def test_reversal_claim_uses_binomial_intervals():
    assert verdict(reversal_case(25, 2), "d") == SUGGESTED  # one setting, one seed per arm
    assert verdict(reversal_case(2, 25), "d") == CONTRADICTION_SUGGESTED
    assert verdict(reversal_case(5, 4), "d") == INCONCLUSIVE
    assert verdict(reversal_case(0, 0, forward=0), "d") == NOT_TESTABLE  # nothing learned, nothing to reverse
    runs = pd.DataFrame([run("qwen", 1e5, 4.0, 3.0), run("llada", 1e5, 4.0, 3.5)])
    assert verdict(judge_claims(runs, fits=pd.DataFrame()), "d") == NOT_TESTABLE


def test_wilson_and_newcombe_intervals():
    assert wilson(0, 10) == pytest.approx((0.0, 0.0, 0.2775), abs=1e-4)
    assert wilson(81, 263) == pytest.approx((0.3080, 0.2553, 0.3662), abs=1e-4)  # Newcombe (1998), example
    assert newcombe(56, 70, 48, 80) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)  # Newcombe (1998), (a)


def test_no_runs_and_no_pair():
    assert {v.verdict for v in judge_claims(pd.DataFrame()).verdicts} == {NOT_TESTABLE}
    only_ar = judge_claims(pd.DataFrame([run("qwen", 1e5, 1.0, 3.0)]), fits=pd.DataFrame())
    assert {v.verdict for v in only_ar.verdicts} == {NOT_TESTABLE}
    assert "diffusion arm and an AR arm" in only_ar.table.loc[0, "reason"]
