"""Answers side by side: the same held-out questions with each arm's answer in one row, so a reader sees what the
numbers mean (an SFT'd model that answers only EOS shows as empty answers, not just as F1 = 0)."""

from __future__ import annotations

import pandas as pd

EMPTY = "(empty answer)"


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
