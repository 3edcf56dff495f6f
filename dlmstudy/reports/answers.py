"""Answers side by side: the same held-out questions with each arm's answer in one row, so a reader sees what the
numbers mean (an SFT'd model that answers only EOS shows as empty answers, not just as F1 = 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

EMPTY = "(empty answer)"


def sft_answers(folder: Path, planned: pd.DataFrame) -> pd.DataFrame:
    """The study's SFT runs' answers to the held-out probes (`<sft run>/eval/qa_samples.jsonl`): run_id, arm,
    sft_epochs, question, expected, answer; empty when no SFT run saved them."""
    rows = []
    sft = planned[planned["stage"] == "sft"] if "stage" in planned else planned.iloc[0:0]
    for run in sft.itertuples():
        samples = folder / run.run_id / "eval" / "qa_samples.jsonl"
        if not samples.is_file():
            continue
        for line in samples.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            rows.append({"run_id": run.run_id, "arm": run.arm, "sft_epochs": getattr(run, "sft_epochs", 1),
                         "question": row.get("question"), "expected": row.get("expected"),
                         "answer": row.get("text", row.get("answer"))})
    return pd.DataFrame(rows)


def side_by_side(answers: pd.DataFrame, run_order: list[str], questions: int = 5) -> pd.DataFrame:
    """The first `questions` questions (in the first run's order) with their expected answer and one column per
    arm: the answer of that arm's first run in `run_order` (the study's plan order; others after, by id)."""
    if answers.empty:
        return pd.DataFrame()
    rank = {run_id: i for i, run_id in enumerate(run_order)}
    runs = (answers.drop_duplicates("run_id")
            .assign(rank=lambda f: f["run_id"].map(rank).fillna(len(rank)))
            .sort_values(["rank", "run_id"]).drop_duplicates("arm").sort_values("arm"))
    first = answers[answers["run_id"] == runs.iloc[0]["run_id"]]
    table = first.drop_duplicates("question")[["question", "expected"]].head(questions).reset_index(drop=True)
    for run in runs.itertuples():
        own = answers[answers["run_id"] == run.run_id].drop_duplicates("question").set_index("question")["answer"]
        table[run.arm] = [EMPTY if isinstance(a, str) and not a.strip() else a for a in table["question"].map(own)]
    return table
