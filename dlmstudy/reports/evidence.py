"""The claims in the report: one row per claim and comparison (verdict and decisive number), then the evidence of
every test in its own small section (its verdict, why, and its table), then the numbers the tests share
(noise, effective data, fits) and context."""

from __future__ import annotations

import pandas as pd

from dlmstudy.analysis import claims as claims_mod
from dlmstudy.analysis import scaling
from dlmstudy.analysis.noise import ASSUMED_SEED_SD
from dlmstudy.reports.page import Report, escape, slug

HOW_TO_READ = [
    "- **Verdicts** (rules in `docs/report.md`): *supported* needs replicated evidence beyond the measured noise in "
    "at least two settings; *suggested* points the same way from a single seed or one setting; *inconclusive* is "
    "within the noise or tests disagree; *not testable* means the grid cannot decide (the evidence says why).",
    "- **Loss levels are not comparable across arms**: diffusion losses are ELBO upper bounds on the NLL, AR losses "
    "exact NLL. Claims (a) and (b) use changes within an arm only (effective data, fits); claim (c) compares levels "
    "and is therefore conservative toward diffusion.",
    "- Every loss in a claim is a final validation loss, all on one validation set (see *Runs*); diverged runs are "
    "in none of them.",
]


def claims_table(result: claims_mod.Claims) -> pd.DataFrame:
    """One row per claim and comparison: claim, comparison, verdict, decisive number."""
    table = result.table
    return pd.DataFrame({"claim": table["claim"], "comparison": table["diffusion"] + " vs " + table["ar"],
                         "verdict": table["verdict"], "decisive number": table["decisive"]})


def learning_rate_lines(runs: pd.DataFrame) -> list[str]:
    """A caveat when every arm trained at one learning rate: it was tuned for neither objective."""
    rates = runs["learning_rate"].dropna().unique() if "learning_rate" in runs else []
    if len(rates) != 1 or runs["arm"].nunique() < 2:
        return []
    return [f"- Every arm and size trained at one learning rate ({rates[0]:g}), tuned for none of them: an "
            "arm's losses may reflect the rate as much as the objective (a `tune:` sweep picks one per arm and "
            "size)."]


def fits_shown(fits: pd.DataFrame) -> pd.DataFrame:
    """The fits as a reviewer reads them: R_D* and usable epochs as an interval or the bound the runs give; the
    constants only where they are determined."""
    open_below = fits["R_D_star_lo"] <= 0
    shown = pd.DataFrame({
        "arm": fits["arm"],
        "R_D*": [claims_mod.interval_text(r, lo, hi, ob) for r, lo, hi, ob in
                 zip(fits["R_D_star"], fits["R_D_star_lo"], fits["R_D_star_hi"], open_below)],
        "usable epochs": [claims_mod.interval_text(u, lo, hi, ob) for u, lo, hi, ob in
                          zip(fits["usable_epochs"], fits["usable_epochs_lo"], fits["usable_epochs_hi"], open_below)],
        "status": fits["status"]})
    for column in ("r2", "n_runs", "n_one_epoch", "max_epochs", "method", "interval", "E", "A", "B", "alpha", "beta",
                   "degenerate"):
        if column in fits:
            shown[column] = fits[column]
    return shown


def _evidence_shown(test: str, frame: pd.DataFrame) -> pd.DataFrame:
    """A test's evidence without what its heading already says (the two arms) or lists elsewhere (run ids)."""
    if test == "fit of the data-constrained law":
        return fits_shown(frame)[["arm", "R_D*", "usable epochs", "status", *[c for c in ("r2", "n_runs", "degenerate")
                                                                               if c in frame]]]
    drop = [c for c in ("diffusion", "ar", "runs") if c in frame]
    return frame.drop(columns=drop)


def evidence_sections(report: Report, result: claims_mod.Claims) -> None:
    """Per claim and comparison, each test: its verdict, decisive number and reason, and its evidence table."""
    report.add("### Evidence per test")
    for key, (claim, paper) in claims_mod.CLAIMS.items():
        report.add(f"#### ({key}) {escape(claim)}",
                   f"Papers: {escape(paper)}. Caveat: {claims_mod.CAVEATS[key]}.")
        for verdict in (v for v in result.verdicts if v.claim == key):
            found = result.evidence
            tests = found[(found["claim"] == key) & (found["diffusion"] == verdict.diffusion)
                          & (found["ar"] == verdict.ar)] if len(found) else found
            if tests.empty:
                report.add(f"**{verdict.diffusion} vs {verdict.ar}: {verdict.verdict}.** {escape(verdict.reason)}.")
                continue
            report.add(f"**{verdict.diffusion} vs {verdict.ar}: {verdict.verdict}.**")
            for test in tests.itertuples():
                role = "" if test.decides else " (context, not part of the verdict)"
                report.add(f"*{test.test}*{role}: **{test.verdict}**: {escape(test.reason)}. "
                           f"Decisive number: {escape(test.decisive)}.")
                frame = verdict.evidence.get(test.test, pd.DataFrame())
                if len(frame):
                    name = f"evidence_{key}_{slug(test.test)}_{slug(verdict.diffusion)}-vs-{slug(verdict.ar)}"
                    report.table(frame, name, _evidence_shown(test.test, frame),
                                 missing="none resolved")


def _noise_lines(noise: pd.DataFrame) -> list[str]:
    """What the noise floor is: measured from replicates, or assumed (and what that caps)."""
    measured = noise[noise["dof"] > 0] if len(noise) else noise
    if measured.empty:
        return [f"No setting was run with several seeds, so the seed-to-seed noise is not measured: an assumed "
                f"{ASSUMED_SEED_SD} nats/token standard deviation stands in for it, and no verdict can be stronger "
                "than \"suggested\"."]
    return ["Seed-to-seed standard deviation pooled over the replicated cells (cells: arm × size × U × tokens × "
            "learning rate); a cell's standard error combines it with the ELBO's Monte-Carlo error. Single-seed "
            "settings use it too, but alone they can at most \"suggest\"."]


def supporting_sections(report: Report, result: claims_mod.Claims, runs: pd.DataFrame) -> None:
    """The numbers several tests share: seed noise, effective data, the law's fits; then context tables."""
    if runs.empty:
        return
    report.add("## Numbers behind the claims")
    if len(result.noise):
        report.add("### Noise from replicates", *_noise_lines(result.noise))
        if result.noise["dof"].gt(0).any():
            report.table(result.noise, "seed_noise", missing="no replicated cell")
    if len(result.effective):
        report.add("### Effective data: what repeated tokens were worth",
                   "D_eq/D per repeated-data cell: the fresh tokens D_eq at which the arm's own one-epoch curve "
                   "(same size) reaches the cell's loss, over the tokens D it trained on, with its 95% interval "
                   "(every loss drawn from its noise). '> x' / '< x': the loss lies beyond the curve's ends, a "
                   "bound only. The last two columns are what the papers' R_D\\* (15 and 500) would give.")
        eff = result.effective
        shown = pd.DataFrame({
            "arm": eff["arm"], "size": eff["size"], "U": eff["unique_tokens"], "epochs": eff["epochs"],
            "loss": eff["loss"], "D_eq/D": eff["D_eq/D (reads)"],
            "95%": [claims_mod.ratio_text("", lo, hi).strip() or "beyond the curve"
                    for lo, hi in zip(eff["lo"], eff["hi"])],
            "seeds": eff["n_seeds"], "papers, R_D* 15": eff["expected at R_D* = 15"],
            "papers, R_D* 500": eff["expected at R_D* = 500"]})
        report.table(eff, "effective_data", shown)
    if len(result.fits):
        report.add("### Fit of the data-constrained law (Muennighoff et al.)",
                   "Per arm: R_D\\* from its profile likelihood (the other constants refitted at every R\\*) with "
                   f"its {scaling.LEVEL:.0%} interval, or the bound the runs give when they cannot bound it both "
                   "ways (not identified); usable epochs (repeated data worth ≥ 90% of fresh); R² on loss; the "
                   "fitted constants where they are determined (the `degenerate` column says why one is not).")
        degenerate = {c: "not determined" for c in ("E", "A", "B", "alpha", "beta")}
        report.table(result.fits, "fits", fits_shown(result.fits), missing={**degenerate, "degenerate": "none"})
        report.add("Runs each fit used:", "", *[f"- {row.arm}: {row.runs}" for row in result.fits.itertuples()])
    elif len(runs):
        reasons = claims_mod.fit_readiness(runs)
        report.add("### Fit of the data-constrained law", "Not fitted: " + "; ".join(
            f"{arm}: {reason or 'ready, but no fit was made'}" for arm, reason in reasons.items()) + ".")
    if len(result.penalties):
        report.add("### Repetition at equal total tokens (context)",
                   "Loss change in nats when a token budget is spent on repeated instead of fresh data (within each "
                   "arm). Context only: claim (a) compares effective data, not nats, since the arms' losses fall "
                   "at different rates with data.")
        shown = result.penalties.drop(columns=[c for c in ("objective",) if c in result.penalties])
        report.table(result.penalties, "repetition", shown)
    if len(result.gaps):
        report.add("### Arms at matched settings (context)",
                   "Diffusion ELBO minus AR NLL at the same size, U and tokens (negative: diffusion ahead, which the "
                   "ELBO bound makes conservative). Claim (c) reads these along the compute frontier (its evidence "
                   "above; every frontier in `tables/compute_frontiers.csv`).")
        gaps = result.gaps
        shown = gaps[["diffusion", "ar", "size", "unique_tokens", "epochs", "loss diffusion (ELBO)", "loss AR (NLL)",
                      "gap", "noise (±)", "ahead"]].rename(columns={"unique_tokens": "U"})
        report.table(gaps, "arm_gaps", shown)
    if len(result.frontiers):
        result.frontiers.to_csv(report.out / "tables" / "compute_frontiers.csv", index=False)

