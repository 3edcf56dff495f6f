"""The SFT part of the report: the metrics both arms share over epochs, each arm's own objective apart, each SFT
run after its last epoch, and held-out questions with both arms' answers side by side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dlmstudy.analysis import sft_figures
from dlmstudy.analysis.frames import StudyFrames
from dlmstudy.reports.answers import side_by_side
from dlmstudy.reports.page import Report, md_table

DIAGNOSTIC_COLUMNS = {"run_id": "SFT run", "arm": "arm", "sft_epochs": "epochs", "variant": "variant",
                      "padding": "padding", "loss_norm": "loss norm", "seed": "seed", "answer_f1": "answer F1",
                      "empty_answers": "empty answers", "answer_tokens": "answer tokens", "content_nll": "content NLL",
                      "first_token_rank": "first-token rank", "p_end_offset0": "P(end) at offset 0",
                      "p_end_first16": "P(end), first 16"}
DECODE_KEYS = ["arm", "variant", "gen_length", "block_length", "end_tokens"]
LAST_COLUMNS = {"arm": "arm", "sft": "SFT run", "parent": "from", "epoch": "after epoch",
                "answer_nll": "answer NLL", "answer_f1": "answer F1", "accuracy": "exact match",
                "val_loss": "own SFT loss"}


def last_evaluations(results: pd.DataFrame) -> pd.DataFrame:
    """Each SFT run's evaluation after its last epoch."""
    evals = sft_figures.evaluations(results)
    if evals.empty:
        return evals
    run = evals["run_id"].fillna(evals["arm"] + "/" + evals["sft"]) if "run_id" in evals else evals["arm"] + "/" + \
        evals["sft"]
    last = evals.assign(run=run).sort_values(["run", "epoch"]).groupby("run", sort=False).tail(1)
    return last.sort_values(["arm", "epoch", "run"]).reset_index(drop=True)


def sft_section(report: Report, frames: StudyFrames, folder: Path) -> None:
    """## Supervised fine-tuning, when the study has SFT results."""
    answers = frames.sft_answers
    if not (len(frames.sft) or len(frames.sft_scalars) or len(answers)):
        return
    report.add("## Supervised fine-tuning",
               "Evaluations on held-out rows after every SFT epoch. What the arms share is scored on the same answers: "
               "`answer NLL` on the same answer tokens (exact NLL for AR, the ELBO upper bound for diffusion; runs "
               "made before it existed lack it), `answer F1` (SQuAD token F1 of the whole answer) and `exact match` "
               "(of the answer's first line). Each arm's own SFT loss is not comparable across arms: a diffusion "
               "arm's also scores the EOS padding LLaDA trains on.")
    report.figure(sft_figures.sft_shared(frames.sft, report.figures / "sft.png"), "SFT metrics both arms share",
                  "What both arms share, after each SFT epoch: look at whether an arm's answers improve with epochs; "
                  "no intervals were recorded for these numbers.", heading="### What both arms share")
    report.figure(sft_figures.sft_own_objectives(frames.sft_scalars, frames.sft, report.figures / "sft_objectives.png"),
                  "Each arm's own SFT objective",
                  "Each arm on its own panel (its own objective, not comparable across arms): training loss and the "
                  "validation loss after each epoch; look for a validation loss that stops falling.",
                  heading="### Each arm's own objective")
    last = last_evaluations(frames.sft)
    if len(last):
        report.add("### Each SFT run after its last epoch")
        shown = last[[c for c in LAST_COLUMNS if c in last]].rename(columns=LAST_COLUMNS)
        report.table(frames.sft, "sft", shown, missing={"answer NLL": "not recorded by this run",
                                                        "from": "a model from elsewhere"})
    if len(frames.sft_runs):
        _diagnostics(report, frames.sft_runs)
    if len(frames.decode_grid):
        _decode_grid(report, frames.decode_grid)
    if len(frames.sft_scalars):
        frames.sft_scalars.to_csv(report.out / "tables" / "sft_scalars.csv", index=False)
    report.add("### Held-out questions, both arms' answers")
    planned = list(frames.planned["run_id"]) if "run_id" in frames.planned else []
    if answers.empty:
        report.add("No SFT run of this study saved its answers (`eval/qa_samples.jsonl` in the SFT run's folder), so "
                   "there are none to show side by side.")
        return
    answers.to_csv(report.out / "tables" / "sft_answers.csv", index=False)
    for epochs, group in answers.groupby("sft_epochs", sort=True):
        report.add(f"After {epochs:g} SFT epoch{'s' if epochs != 1 else ''} (each arm's first such run; every answer "
                   "in `tables/sft_answers.csv`):", "")
        report.add(md_table(side_by_side(group, planned), missing="not asked"))



def _diagnostics(report: Report, runs: pd.DataFrame) -> None:
    """Each SFT run's answers and the teacher-forced diagnostics that tell the causes of empty answers apart."""
    report.add("### Why answers are empty or not: diagnostics per SFT run",
               "`empty answers`: share of probes answered with nothing. On the held-out rows (docs/training.md, "
               "\"EOS after SFT\"): `content NLL` is the answer's NLL before its end tokens (diffusion: the ELBO upper "
               "bound, given the answer's length), `first-token rank` the median rank of the reference first answer "
               "token (1: the model's top choice; diffusion: on an all-mask canvas of 64), `P(end)` the probability "
               "of an end token at the first answer position and over the first 16.")
    shown = runs[[c for c in DIAGNOSTIC_COLUMNS if c in runs]].rename(columns=DIAGNOSTIC_COLUMNS)
    report.table(runs, "sft_runs", shown, missing={"variant": "the spec's", "padding": "does not apply",
                                                  "loss norm": "does not apply"})


def _decode_grid(report: Report, grid: pd.DataFrame) -> None:
    """Each decoding setting's answers after SFT, averaged over the runs of an arm and variant."""
    values = [c for c in ("answer_f1", "empty_answers", "answer_tokens", "accuracy") if c in grid]
    keys = [c for c in DECODE_KEYS if c in grid]
    summary = grid.groupby(keys, dropna=False)[values].agg(["mean", "count"])
    summary.columns = [f"{v}_{stat}" if stat == "mean" else "runs" for v, stat in summary.columns]
    summary = summary.loc[:, ~summary.columns.duplicated()].reset_index()
    report.add("### Decoding after SFT",
               "Each SFT run's probes decoded once per setting; means over the runs of an arm and variant (AR arms: "
               "block length 1). `end_tokens`: LLaDA's end-token options (docs/sampling.md).")
    report.table(grid, "decode_grid", summary, missing={"variant": "the spec's"})
