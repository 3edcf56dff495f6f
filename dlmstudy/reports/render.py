"""Turning a study's run folders into reports/<study>/: report.md, report.html, figures/, tables/.

Every number comes from a run folder (via `dlmstudy.analysis.frames`); nothing is retrained. The page opens with
its answer (a summary: the scale, one sentence per claim, the headline figure), then the claims and their
evidence, the figures, and the tables behind them. The same run folders give the same files byte for byte
(seeded resampling, no timestamps, no absolute paths). The report is built in a folder beside its destination
and swapped in whole, so a killed build leaves the previous report as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from dlmstudy.analysis import claims as claims_mod
from dlmstudy.analysis import figures, headline
from dlmstudy.analysis.frames import StudyFrames, load_study
from dlmstudy.atomic import replace_folder, restore_folder
from dlmstudy.errors import UserError
from dlmstudy.reports import evidence, summary
from dlmstudy.reports.answers import side_by_side
from dlmstudy.reports.page import Report, md_table
from dlmstudy.reports.sft_section import sft_section
from dlmstudy.study.comparisons import default_comparisons

REPORT_ENTRIES = {"report.md", "report.html", "figures", "tables"}
RUN_COLUMNS = {
    "run_id": "run", "arm": "arm", "size": "size", "params_total": "params (total)",
    "params_non_embedding": "params (non-emb.)", "unique_tokens": "unique tokens", "epochs": "epochs",
    "tokens": "tokens seen", "flops": "FLOPs (6·N·D)", "learning_rate": "learning rate", "seed": "seed",
    "final_val_loss": "final val. loss", "final_val_loss_stderr": "± MC s.e.", "final_val_set": "final on",
    "best_val_loss": "best val. loss", "best_val_set": "best on", "val_loss_kind": "loss kind",
    "accuracy_forward": "acc. forward", "accuracy_reverse": "acc. reverse", "wall_time_s": "wall time (s)",
}
LIFTED = ("final_val_set", "best_val_set", "learning_rate", "seed")  # said once above the table when one value
THROUGHPUT_VALUES = ["tokens_per_s", "mfu", "peak_memory_gb"]


def _setup(spec: dict) -> list[str]:
    tok = spec.get("tokenizer", {})
    vocab = f", vocabulary {tok.get('vocab_size')}" if tok.get("kind") == "bpe" else f", {tok.get('path')}"
    arms = ", ".join(map(str, spec.get("arms", [])))
    return [f"- Arms: {arms}; one tokenizer for all arms ({tok.get('kind')}{vocab}).",
            f"- Data: `{spec.get('data', {}).get('pretrain', {}).get('source')}`, sequence length "
            f"{spec.get('data', {}).get('max_length')}; every arm sees the same sequences in the same order.",
            "- What differs between arms: the objective (masked diffusion vs next token) and the attention direction "
            "(bidirectional vs causal), plus whatever differs between the backbones (the Qwen2 backbone has q/k/v "
            "biases). Parameter counts are given with and without embeddings."]


def _not_drawn(diverged: pd.DataFrame) -> str:
    """The caption's note on diverged runs, which no figure draws."""
    if diverged.empty:
        return ""
    names = [f"{r.arm} {r.size}, {figures.setting_label(r.unique_tokens, r.epochs)}" for r in diverged.itertuples()]
    return f" Not drawn (diverged): {'; '.join(names)}."


def _headline(report: Report, result: claims_mod.Claims, diverged: pd.DataFrame) -> None:
    """The summary's figure: effective data against epochs where the runs give it, else final loss."""
    sizes = figures.size_order(result.cells, "params")
    path = headline.effective_data_vs_epochs(result.effective, sizes, report.figures / "headline.png")
    if path is not None:
        report.figure(path, "Effective data against epochs",
                      "Each arm's D_eq/D (what a repeated token was worth in fresh tokens) against epochs at fixed U, "
                      "with 95% intervals; black lines: the papers' laws (dashed AR, R_D\\* = 15; dotted diffusion, "
                      "R_D\\* = 500). Look at which line each arm's points follow." + _not_drawn(diverged))
        return
    by, _ = figures.fixed_u_lines(result.cells)
    fixed = "fixed U" if by == "unique_tokens" else "fixed total tokens (fewer unique tokens at more epochs)"
    report.figure(headline.loss_vs_epochs_marked(result.cells, report.figures / "headline.png"),
                  "Final loss against epochs",
                  f"Each arm's final validation loss against epochs at {fixed}, ±1.96 s.e.; black lines: the papers' "
                  "usable epochs (dashed ≈ 4 for AR, dotted ≈ 100 for diffusion). Look at where each arm's loss "
                  "stops falling; levels are not comparable across arms (ELBO vs exact NLL)." + _not_drawn(diverged))


def _header(report: Report, frames: StudyFrames, folder: Path, result: claims_mod.Claims, listed: bool) -> None:
    runs_dir = (frames.spec or {}).get("runs_dir") or "runs"
    counts = summary.stage_counts(frames)
    report.add(f"# Study report: {frames.name}",
               f"Rebuild with `dlmstudy report {runs_dir}/{folder.name}`: nothing is retrained, and the same run "
               "folders give this page byte for byte.", "",
               f"- **Runs**: {summary.runs_line(counts)}"
               + (" (see *Diverged runs*)" if counts["pretrain"]["diverged"] or counts["tune"]["diverged"] else "")
               + (" (see *Missing runs*)" if len(frames.missing) else "") + ".",
               f"- **Comparisons**: {summary.comparisons_line(result.verdicts, listed)}.")
    report.add("## Summary", f"**Scale**: {summary.scale_line(result.cells, result.noise)}", "",
               *summary.claim_sentences(result.verdicts))
    _headline(report, result, frames.diverged)


def _claims(report: Report, result: claims_mod.Claims, runs: pd.DataFrame) -> None:
    report.add("## Claims")
    report.table(result.table, "claims", evidence.claims_table(result))
    report.add(*evidence.HOW_TO_READ, *evidence.learning_rate_lines(runs),
               f"- The claims separate the arms only beyond {claims_mod.DISCRIMINATING_EPOCHS:.3g} epochs, where AR's "
               "law (R_D\\* = 15) values repeated data below 90% of fresh; the paper's critical compute is "
               "C_crit(U) = 2.12e15·(U/1e6)^2.174 FLOPs, with C = 6·N·D here (N non-embedding parameters).")
    if len(result.evidence):
        result.evidence.to_csv(report.out / "tables" / "claims_evidence.csv", index=False)
    evidence.evidence_sections(report, result)


def _figures(report: Report, frames: StudyFrames, result: claims_mod.Claims) -> None:
    runs, fig_dir, gone = frames.runs, report.figures, _not_drawn(frames.diverged)
    scalars = (frames.scalars[frames.scalars["run_id"].isin(runs["run_id"])] if len(runs) and len(frames.scalars)
               else pd.DataFrame())
    drawn = [
        (figures.loss_vs_tokens(scalars, fig_dir / "loss_vs_tokens.png"), "Validation loss against tokens seen",
         "One panel per data setting (U unique tokens, R epochs): look for curves that turn upward, a model "
         "overfitting its repeated data; diffusion bands are ±1.96 Monte-Carlo s.e." + gone),
        (figures.loss_vs_epochs(result.cells, runs, fig_dir / "loss_vs_epochs.png"),
         "Final and best validation loss against epochs",
         "Final loss (±1.96 s.e.) and the best during training against epochs, stars at each AR line's lowest: "
         "look at where each arm stops improving and how far its final loss rises past its best." + gone),
        (figures.loss_vs_flops(result.cells, runs, fig_dir / "loss_vs_flops.png"),
         "Final validation loss against training compute",
         "C = 6·N·D (N non-embedding parameters); lines are each arm's Pareto frontier: look at whether the "
         "frontiers cross (claim c), remembering that diffusion's ELBO is an upper bound." + gone),
        (figures.params_epochs_heatmap(runs, frames.diverged, fig_dir / "params_epochs.png"),
         "Final validation loss over model size and epochs",
         "One colour scale for every panel: look at whether a larger model or more epochs lowers each arm's loss; "
         "a cell says when its run diverged or was not run."),
        (figures.accuracy_by_arm(result.reversal, fig_dir / "accuracy.png"),
         "Question answering: exact match per arm and direction",
         "Wilson 95% intervals: look at the reverse questions, where claim (d) expects diffusion ahead."),
    ]
    if any(path is not None for path, _, _ in drawn):
        report.add("## Figures")
        for path, title, caption in drawn:
            report.figure(path, title, caption, heading=f"### {title}")


def _qa(report: Report, frames: StudyFrames, result: claims_mod.Claims) -> None:
    """Probe accuracy per run and direction, and a few probes with each arm's answer side by side."""
    if result.reversal.empty:
        return
    report.add("## Question answering", "Exact-match accuracy per run and question direction with Wilson 95% "
               "intervals (`ci_lo`, `ci_hi`).")
    shown = result.reversal.assign(ci_lo=result.reversal["ci_lo"].clip(0, 1), ci_hi=result.reversal["ci_hi"].clip(0, 1))
    report.table(result.reversal, "qa_accuracy", shown)  # shown clipped to [0, 1]: Wilson ends in float rounding
    qa = frames.qa[frames.qa["run_id"].isin(frames.runs["run_id"])]
    order = list(frames.planned["run_id"]) if "run_id" in frames.planned else []
    for direction, group in qa.groupby("direction", sort=True) if "direction" in qa else []:
        table = side_by_side(group, order, questions=4)
        if len(table):
            report.add(f"The first {direction} probes, each arm's answer (its first run in the plan):", "",
                       md_table(table, missing="not asked"))


def _runs(report: Report, runs: pd.DataFrame) -> None:
    """Finished runs: values every run shares said once above the table, the rest one row per run."""
    cols = [c for c in RUN_COLUMNS if c in runs]
    shared = [c for c in LIFTED if c in cols and runs[c].nunique(dropna=False) == 1 and len(runs) > 1]
    probed = [c for c in ("accuracy_forward", "accuracy_reverse") if c in runs and runs[c].notna().any()]
    shown_cols = [c for c in cols if c not in shared and (c in probed or not c.startswith("accuracy_"))]
    lines = ["Finished runs that did not diverge; \"best\" is the lowest loss over evaluations on one set."]
    if shared:
        lines.append("Every run: " + "; ".join(f"{RUN_COLUMNS[c]} {_value(runs[c].iloc[0])}"
                                              for c in shared) + ".")
    if not probed:
        lines.append("No run was probed with questions (no accuracy columns).")
    report.add("## Runs", " ".join(lines))
    report.table(runs, "runs", runs[shown_cols].rename(columns=RUN_COLUMNS),
                 missing={"acc. forward": "not probed", "acc. reverse": "not probed",
                          "final val. loss": "no final evaluation", "best val. loss": "no evaluation",
                          "± MC s.e.": "not recorded"})


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _diverged(report: Report, diverged: pd.DataFrame) -> None:
    """Diverged runs under their own heading, with the step and the reason; they are in no number above."""
    report.add("## Diverged runs", "These runs blew up during training. They are in no cell, fit, frontier, "
               "figure or claim; their settings count as not run.")
    cols = {"run_id": "run", "arm": "arm", "size": "size", "unique_tokens": "unique tokens", "epochs": "epochs",
            "learning_rate": "learning rate", "diverged_step": "step", "diverged_reason": "reason",
            "best_val_loss": "best val. loss before", "best_val_set": "best on"}
    report.table(diverged, "diverged", diverged[[c for c in cols if c in diverged]].rename(columns=cols),
                 missing={"best val. loss before": "no evaluation before it diverged", "step": "not recorded"})


def _tune(report: Report, tune: pd.DataFrame) -> None:
    """The learning-rate sweeps: each candidate's final loss and the winner per arm and size."""
    tune = tune.assign(winner=False)
    healthy = tune[~tune["diverged"]].dropna(subset=["final_val_loss"])
    for _, group in healthy.groupby(["arm", "size"]):
        tune.loc[group.sort_values(["final_val_loss", "learning_rate"]).index[0], "winner"] = True
    cols = {"arm": "arm", "size": "size", "learning_rate": "learning rate", "tokens": "tokens",
            "final_val_loss": "final val. loss", "final_val_set": "on", "diverged": "diverged",
            "diverged_step": "diverged at step", "winner": "winner", "run_id": "run"}
    tune = tune.sort_values(["arm", "size", "learning_rate"])
    report.add("## Learning-rate sweeps", "Per arm and size, each candidate learning rate on a fraction of the "
               "tokens; the study's runs of that arm and size use the winner (lowest final validation loss; a "
               "diverged candidate never wins). Sweep runs are in no number of the claims.")
    report.table(tune, "tune", tune[[c for c in cols if c in tune]].rename(columns=cols),
                 missing={"final val. loss": "diverged before its final evaluation", "diverged at step": "did not"})


def _throughput(bench: pd.DataFrame) -> pd.DataFrame:
    """Bench records ordered device, arm, other settings, then tokens/s, MFU, peak memory."""
    values = [c for c in THROUGHPUT_VALUES if c in bench]
    keys = ["device", "arm"] + [c for c in bench.columns if c not in ("device", "arm", "file", *values)
                                and not pd.api.types.is_float_dtype(bench[c])]
    return bench[keys + values].sort_values(keys[:2])


def _sampler(report: Report, frames: StudyFrames) -> None:
    grid, fig_dir = frames.sampler_grid, report.figures
    report.add("## Sampler grids", "Accuracy and tokens/s over sampling steps × block length (and confidence "
               "threshold for parallel decoding; 'off' = fixed schedule).")
    report.table(grid, "sampler_grid", missing={"threshold": "off"})
    report.figure(figures.sampler_heatmaps(grid, "accuracy", fig_dir / "sampler_accuracy.png", frames.runs),
                  "Sampler grid: accuracy", "Accuracy per steps × block length, one colour scale for every panel: "
                  "look for the fewest steps that keep the accuracy of the most.", heading="### Sampler grid: accuracy")
    report.figure(figures.sampler_heatmaps(grid, "tokens_per_s", fig_dir / "sampler_speed.png", frames.runs),
                  "Sampler grid: tokens/s", "Tokens/s per steps × block length on one log colour scale for every "
                  "panel: look at what fewer steps or a threshold buy.", heading="### Sampler grid: tokens/s")
    report.figure(figures.sampler_tradeoff(grid, fig_dir / "sampler_tradeoff.png", frames.runs),
                  "Sampler speed against accuracy",
                  "Speed-up over each run's plain sampler (no threshold, eager, the most steps) against the accuracy "
                  "difference measured probe by probe with its 95% interval: a bar crossing 0 is equal within noise.",
                  heading="### Sampler speed against accuracy")


def _relative(text: str, folder: Path, shown: str) -> str:
    """A path or note with the study folder as the report names it (no absolute paths in the output)."""
    return text.replace(str(folder.resolve()), shown).replace(str(folder), shown)


def _write(folder: Path, out: Path, bootstrap: int) -> Path:
    """Every file of the report, into `out`."""
    frames = load_study(folder)
    report = Report(out)
    runs, spec = frames.runs, frames.spec or {}
    listed = bool(spec.get("comparisons"))
    if not listed and spec.get("arms"):
        known = dict(zip(runs["arm"], runs["objective"])) if len(runs) else {}
        spec = {**spec, "comparisons": default_comparisons([str(a) for a in spec["arms"]], known)}
    result = claims_mod.judge_claims(runs, frames.qa, spec=spec, bootstrap=bootstrap)
    shown = f"{(frames.spec or {}).get('runs_dir') or 'runs'}/{folder.name}"

    _header(report, frames, folder, result, listed)
    _claims(report, result, runs)
    _figures(report, frames, result)
    evidence.supporting_sections(report, result, runs)
    _qa(report, frames, result)
    sft_section(report, frames, folder)
    if len(frames.sampler_grid):
        _sampler(report, frames)
    if len(frames.lm_eval):
        lm_eval = frames.lm_eval.assign(file=[_relative(f, folder, shown) for f in frames.lm_eval["file"]])
        report.add("## lm_eval results", "Each task's metrics as lm_eval reported them (stderr from lm_eval).")
        report.table(lm_eval, "lm_eval", lm_eval.drop(columns=["file"]), missing={"stderr": "not reported",
                                                                                  "n": "not reported"})
    if len(frames.bench):
        report.add("## Throughput", "From `dlmstudy bench --json` records stored as `bench*.json` in the study folder.")
        report.table(frames.bench, "throughput", _throughput(frames.bench), missing="not measured")
    if len(runs):
        _runs(report, runs)
    if len(frames.diverged):
        _diverged(report, frames.diverged)
    if len(frames.tune):
        _tune(report, frames.tune)
    if len(frames.missing):
        report.add("## Missing runs", "Planned or started but without a result (run the study again to finish them); "
                   "the numbers above use the finished runs only.")
        report.table(frames.missing_runs, "missing", missing="does not apply")
    if frames.spec:
        report.add("## Set-up", *_setup(frames.spec))
    if len(frames.scalars):
        frames.scalars.to_csv(out / "tables" / "scalars.csv", index=False)
    if len(frames.swanlab):
        frames.swanlab.to_csv(out / "tables" / "swanlab_scalars.csv", index=False)
    if len(frames.sources):
        report.add("## Data read", "What each finished run folder held (the SwanLab column compares the decoded "
                   "offline log with the scalar mirror).")
        report.table(frames.sources, "sources", missing={"mirror vs SwanLab max |diff|": "no SwanLab log",
                                                         "SFT": "none"})
    if frames.notes:
        report.add("Skipped while reading:", "", *[f"- {_relative(note, folder, shown)}" for note in frames.notes])
    return report.write(f"dlmstudy: {frames.name}")


def _check_destination(out: Path) -> None:
    """A report replaces its folder whole: refuse one that holds anything a report does not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a folder; give the report a folder of its own")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_ENTRIES)
        if foreign:
            raise UserError(f"{out}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which a "
                            "report does not write; a rebuild replaces the folder whole, so give an empty folder or "
                            "a report's own")


def _stale_builds(out: Path) -> list[Path]:
    """Build folders of this destination left by killed builds (their process is gone)."""
    stale = []
    for path in out.parent.glob(f".{out.name}.building-*"):
        pid = path.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.append(path)
        except (ValueError, PermissionError):
            continue
    return stale


def build_report(study_folder: str | Path, out_dir: str | Path, *, bootstrap: int = 200) -> Path:
    """Write report.md, report.html, figures/*.png and tables/*.csv for one study folder into `out_dir`, replacing
    what was there in one step; returns report.md. A build killed or failing midway leaves the previous report
    whole."""
    folder, out = Path(study_folder), Path(out_dir)
    restore_folder(out)
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_builds(out):
        shutil.rmtree(stale, ignore_errors=True)
    building = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        _write(folder, building, bootstrap)
        replace_folder(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out / "report.md"
