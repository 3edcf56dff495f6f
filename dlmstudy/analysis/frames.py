"""Reading a study's run folders back into tidy pandas frames (partial studies work)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dlmstudy.training.tracking import read_scalars


@dataclass
class StudyFrames:
    """runs: one row per finished run (result.json); scalars: every logged scalar with its run;
    qa: every probe answer; planned: the runs the study index lists; missing: planned ids without result."""

    name: str
    runs: pd.DataFrame
    scalars: pd.DataFrame
    qa: pd.DataFrame
    planned: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    spec: dict = field(default_factory=dict)


def load_study(folder: str | Path) -> StudyFrames:
    """Read `runs/<study>/`: study.json (the plan), each run's result.json, scalars.jsonl and eval/."""
    folder = Path(folder)
    index_path = folder / "study.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"name": folder.name, "runs": []}
    results, scalars, qa = [], [], []
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_")):
        result_path = run_dir / "result.json"
        if not result_path.exists():
            continue
        result = json.loads(result_path.read_text())
        results.append(result)
        for row in read_scalars(run_dir):
            scalars.append({"run_id": result["run_id"], **row})
        samples = run_dir / "eval" / "qa_samples.jsonl"
        if samples.exists():
            qa += [{"run_id": result["run_id"], "arm": result["arm"], **json.loads(line)}
                   for line in samples.read_text().splitlines() if line.strip()]
    runs = pd.DataFrame(results)
    planned = pd.DataFrame(index["runs"])
    done = set(runs["run_id"]) if len(runs) else set()
    missing = [r["run_id"] for r in index["runs"] if r["run_id"] not in done]
    scal = pd.DataFrame(scalars)
    if len(scal) and len(runs):
        scal = scal.merge(runs[["run_id", "arm", "unique_tokens", "epochs"]], on="run_id", how="left")
    return StudyFrames(index.get("name", folder.name), runs, scal, pd.DataFrame(qa), planned, missing,
                       index.get("spec", {}))
