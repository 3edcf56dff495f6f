"""Reading a study's run folders back into tidy pandas frames (partial studies work).

What is read, every file optional except a finished run's result.json:

    runs/<study>/study.json                       the plan: name, spec, planned runs
    runs/<study>/<run>/run.json                   the resolved config (model size, seed)
    runs/<study>/<run>/result.json                written last: the run is finished (`stage: tune`: a
                                                  learning-rate sweep's run)
    runs/<study>/<run>/scalars.jsonl              the scalar mirror (else the SwanLab log is used)
    runs/<study>/<run>/swanlog/run-*/*.swanlab    SwanLab offline log
    runs/<study>/<run>/eval/qa_samples.jsonl      probe answers
    runs/<study>/<run>/eval/**/*.json             lm_eval results (files with a "results" mapping)
    runs/<study>/<run>/eval/sampler_grid.csv      sampler grid: steps, block_length, [threshold, compiled, batch_size,]
                                                  accuracy, tokens_per_s, [same_answers, accuracy_diff_se]
    runs/<study>/<sft run>/eval/qa_samples.jsonl  an SFT run's answers to the held-out probes after its last epoch
    runs/<study>/<sft run>/eval/decode_grid.csv   an SFT run's answers per decoding setting (answer_f1, empty_answers)
    runs/<study>/<run>/sft/<name>/                SFT of that run's checkpoint (see `read_sft`)
    runs/<study>/sft/<name>/                      SFT of a model not pretrained in this study
    runs/<study>/bench*.json, runs/<study>/bench/*.json   `dlmstudy bench --json` records

A file that cannot be parsed is skipped and named in `StudyFrames.notes`. Diverged runs (`divergence`) and
tune runs are kept apart from `runs`, so no fit, frontier, cell or claim sees them; every run's best
validation loss is the minimum over evaluations on one set (`validation_sets`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dlmstudy.analysis import swanlab_reader
from dlmstudy.analysis.divergence import divergence
from dlmstudy.analysis.validation_sets import best_loss, validation_sets

SAMPLER_COLUMNS = ("steps", "block_length", "accuracy", "tokens_per_s")
BENCH_COLUMNS = ("device", "arm", "tokens_per_s")
# result.json fields that older or partial results may lack; filled with NaN so every reader can rely on them.
OPTIONAL_RESULT_COLUMNS = ("final_val_loss", "final_val_loss_stderr", "best_val_loss", "accuracy_forward",
                           "accuracy_reverse", "val_loss_kind")


def training_flops(params_non_embedding, tokens):
    """Training compute C = 6·N·D (Kaplan et al.): N non-embedding parameters (neither the input embedding
    nor the output head), D tokens trained on, repeats included."""
    return 6.0 * np.asarray(params_non_embedding, dtype=float) * np.asarray(tokens, dtype=float)


@dataclass
class StudyFrames:
    """Tidy frames of one study folder; every frame may be empty.

    runs: one row per finished run that did not diverge (result.json, its size, seed and learning rate, whether
    and where it diverged, its best loss on one validation set and the sets' labels `best_val_set`,
    `final_val_set`, and `flops`); diverged: the same for diverged runs; tune: the same for the learning-rate
    sweeps' runs (`stage: tune`); planned: the plan;
    missing: ids of planned or started runs without a result; missing_runs: the same with their plan and a
    `status`; scalars: logged scalars per run and
    step (`source`: mirror or swanlab); swanlab: the decoded SwanLab logs (run_id, step, key, value); qa: probe
    answers; lm_eval: one row per run, task and metric; sampler_grid: one row per run and sampler setting;
    sft / sft_scalars: SFT results per epoch and SFT training curves; sft_runs: one row per finished SFT run
    (result.json, its variant as `variant`); sft_answers: their probe answers (run_id, arm, sft_epochs, variant,
    question, expected, answer); decode_grid: SFT runs' decode grids; bench: throughput records;
    sources: per run, what was found; notes: files that could not be read."""

    name: str
    runs: pd.DataFrame
    scalars: pd.DataFrame
    qa: pd.DataFrame
    planned: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    missing_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    swanlab: pd.DataFrame = field(default_factory=pd.DataFrame)
    lm_eval: pd.DataFrame = field(default_factory=pd.DataFrame)
    sampler_grid: pd.DataFrame = field(default_factory=pd.DataFrame)
    sft: pd.DataFrame = field(default_factory=pd.DataFrame)
    sft_scalars: pd.DataFrame = field(default_factory=pd.DataFrame)
    sft_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    sft_answers: pd.DataFrame = field(default_factory=pd.DataFrame)
    decode_grid: pd.DataFrame = field(default_factory=pd.DataFrame)
    bench: pd.DataFrame = field(default_factory=pd.DataFrame)
    sources: pd.DataFrame = field(default_factory=pd.DataFrame)
    diverged: pd.DataFrame = field(default_factory=pd.DataFrame)
    tune: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"`{path}` skipped: {err}")
        return None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            notes.append(f"`{path}` line {number} skipped: not JSON")
    return rows


def read_lm_eval(path: Path) -> list[dict]:
    """Rows (task, metric, filter, value, stderr, n) of one lm_eval results JSON; [] if it holds none."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        return []
    n_samples = data.get("n-samples", {})
    rows = []
    for task, metrics in data["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            rows.append({"task": task, "metric": metric, "filter": filt or "none", "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else np.nan,
                         "n": n_samples.get(task, {}).get("effective", np.nan), "file": str(path)})
    return rows


def read_sampler_grid(path: Path) -> pd.DataFrame:
    """A sampler-grid table; `threshold` is NaN where parallel decoding was off."""
    grid = pd.read_csv(path)
    absent = [c for c in SAMPLER_COLUMNS if c not in grid]
    if absent:
        raise ValueError(f"missing column(s) {', '.join(absent)}")
    if "threshold" not in grid:
        grid["threshold"] = np.nan
    return grid


_EPOCH_DIR = re.compile(r"epoch[-_]?(\d+(?:\.\d+)?)$")


def read_sft(folder: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """One SFT folder: per-epoch results and the training curve.

    Results: every `result.json` below the folder (a dict or a list of dicts) and `results.jsonl`; the epoch
    comes from the row's `epoch`, else from an `epoch-N` folder name. Curve: `scalars.jsonl`."""
    results = []
    for path in sorted(folder.rglob("result.json")):
        data = _read_json(path, notes)
        for row in data if isinstance(data, list) else [data] if isinstance(data, dict) else []:
            match = _EPOCH_DIR.search(path.parent.name)
            if "epoch" not in row and match:
                row = {**row, "epoch": float(match.group(1))}
            results.append(row)
    if (folder / "results.jsonl").exists():
        results += _read_jsonl(folder / "results.jsonl", notes)
    results = [r for r in results if isinstance(r.get("epoch"), (int, float))]
    curve = _read_jsonl(folder / "scalars.jsonl", notes) if (folder / "scalars.jsonl").exists() else []
    return results, curve


def read_bench(folder: Path, notes: list[str]) -> pd.DataFrame:
    """Throughput records from `bench*.json` in the study folder and `bench/*.json`: a list of records, a dict
    with a `records` list, or one record; records need device, arm and tokens_per_s."""
    records = []
    for path in sorted([*folder.glob("bench*.json"), *folder.glob("bench/*.json")]):
        data = _read_json(path, notes)
        data = data.get("records", data) if isinstance(data, dict) else data
        for row in data if isinstance(data, list) else [data]:
            if isinstance(row, dict) and all(c in row for c in BENCH_COLUMNS):
                records.append({**row, "file": path.name})
            else:
                notes.append(f"`{path}`: a record without {', '.join(BENCH_COLUMNS)} skipped")
    return pd.DataFrame(records)


def _size_label(config: dict) -> str:
    size = config.get("size") or {}
    if "hidden_size" in size and "num_layers" in size:
        return f"d{size['hidden_size']}×{size['num_layers']}"
    return ""


def _run_status(run_dir: Path) -> str:
    if not run_dir.is_dir():
        return "not started"
    if (run_dir / "result.json").exists():
        return "result.json unreadable"
    scalars = run_dir / "scalars.jsonl"
    steps = len(scalars.read_text().splitlines()) if scalars.exists() else 0
    return f"started, no result ({steps} logged rows)" if steps else "started, no result"


def _swanlab_agreement(mirror: pd.DataFrame, long: pd.DataFrame) -> float:
    """Largest |mirror − SwanLab| over the (step, key) pairs both hold: a check that the two sources agree."""
    if mirror.empty or long.empty:
        return np.nan
    mirrored = mirror.melt(id_vars="step", var_name="key", value_name="mirror").dropna()
    both = mirrored.merge(long, on=["step", "key"])
    return float((both["mirror"] - both["value"]).abs().max()) if len(both) else np.nan


def _run_row(result: dict, config: dict, spec: dict, logged: list[dict]) -> dict:
    """A finished run's row: its result.json, with its size, seed and learning rate (result.json, else run.json),
    whether and where it diverged, and its best loss on one validation set with the sets' labels."""
    gone = divergence(result, logged)
    sets = validation_sets(result, config, spec)
    during = [row["val_loss"] for row in logged if "val_loss" in row]
    nan = float("nan")
    return {**result, "seed": result.get("seed", config.get("seed", nan)), "size": _size_label(config),
            "learning_rate": result.get("learning_rate", (config.get("training") or {}).get("learning_rate", nan)),
            "diverged": gone is not None, "diverged_step": gone.step if gone else None,
            "diverged_reason": gone.reason if gone else None,
            "best_val_loss": best_loss(sets, during, result.get("final_val_loss", nan),
                                       result.get("best_val_loss", nan)),
            "best_val_set": sets.best_label, "final_val_set": sets.final_label}


def _read_run(run_dir: Path, result: dict, notes: list[str], spec: dict) -> dict[str, list]:
    """Everything one finished run folder holds, as lists of rows (or frames) per StudyFrames field."""
    run_id, arm = result["run_id"], result.get("arm")
    tag = {"run_id": run_id, "arm": arm}
    config = _read_json(run_dir / "run.json", notes) if (run_dir / "run.json").exists() else None
    config = config if isinstance(config, dict) else {}
    rows = _read_jsonl(run_dir / "scalars.jsonl", notes) if (run_dir / "scalars.jsonl").exists() else []
    mirror = pd.DataFrame(rows)
    long = pd.DataFrame()
    if (run_dir / "swanlog").is_dir():
        try:
            long = swanlab_reader.read_swanlab_run(run_dir)
        except (OSError, ValueError) as err:
            notes.append(f"`{run_dir / 'swanlog'}` skipped: {err}")
    if not rows and len(long):
        rows = [{"step": step, **dict(zip(group["key"], group["value"]))} for step, group in long.groupby("step")]
    out = {"runs": [_run_row(result, config, spec, rows)]}
    logged = mirror.assign(source="mirror") if len(mirror) else swanlab_reader.wide(long).assign(source="swanlab")
    out["scalars"] = [logged.assign(run_id=run_id)] if len(logged) else []
    out["swanlab"] = [long.assign(run_id=run_id)] if len(long) else []
    samples = run_dir / "eval" / "qa_samples.jsonl"
    out["qa"] = [{**tag, **row} for row in (_read_jsonl(samples, notes) if samples.exists() else [])]
    out["lm_eval"] = []
    for path in sorted((run_dir / "eval").rglob("*.json")) if (run_dir / "eval").is_dir() else []:
        try:
            out["lm_eval"] += [{**tag, **row} for row in read_lm_eval(path)]
        except (OSError, ValueError) as err:
            notes.append(f"`{path}` skipped: {err}")
    out["sampler_grid"] = []
    if (run_dir / "eval" / "sampler_grid.csv").exists():
        try:
            out["sampler_grid"] = [read_sampler_grid(run_dir / "eval" / "sampler_grid.csv").assign(**tag)]
        except (OSError, ValueError) as err:
            notes.append(f"`{run_dir / 'eval' / 'sampler_grid.csv'}` skipped: {err}")
    out["sft"], out["sft_scalars"] = [], []
    for sft_dir in sorted(p for p in (run_dir / "sft").glob("*") if p.is_dir()):
        rows, curve = read_sft(sft_dir, notes)
        out["sft"] += [{**tag, "sft": sft_dir.name, **row} for row in rows]
        out["sft_scalars"] += [{**tag, "sft": sft_dir.name, **row} for row in curve]
    out["sources"] = [{**tag, "scalar rows (mirror)": len(mirror), "SwanLab scalars": len(long),
                       "mirror vs SwanLab max |diff|": _swanlab_agreement(mirror, long), "QA probes": len(out["qa"]),
                       "lm_eval tasks": len({row["task"] for row in out["lm_eval"]}),
                       "sampler grid rows": sum(len(g) for g in out["sampler_grid"]),
                       "SFT": ", ".join(sorted({row["sft"] for row in out["sft"] + out["sft_scalars"]}))}]
    return out


def _read_sft_run(run_dir: Path, result: dict, notes: list[str]) -> dict[str, list]:
    """A study's own SFT run folder: its evaluations after every epoch and its training curve.

    The trainer sees the k SFT epochs as one pass, so its logged `epoch` (0..1) is scaled by k."""
    k = result.get("sft_epochs", 1)
    curve = _read_jsonl(run_dir / "scalars.jsonl", notes) if (run_dir / "scalars.jsonl").exists() else []
    curve = [{**row, "epoch": row.get("epoch", np.nan) * k} for row in curve]
    tag = {"run_id": result["run_id"], "arm": result["arm"], "sft": f"{k} epoch{'s' if k > 1 else ''}",
           "parent": result.get("parent")}
    evals = [{**tag, **row} for row in curve if "val_loss" in row]
    variant = ", ".join(f"{key} {value}" for key, value in (result.get("variant") or {}).items())
    own = {"run_id": result["run_id"], "arm": result["arm"], "sft_epochs": k, "variant": variant}
    samples = run_dir / "eval" / "qa_samples.jsonl"
    answers = [{**own, "question": row.get("question"), "expected": row.get("expected"),
                "answer": row.get("text", row.get("answer"))}
               for row in (_read_jsonl(samples, notes) if samples.exists() else [])]
    grid = []
    if (run_dir / "eval" / "decode_grid.csv").exists():
        try:
            grid = [pd.read_csv(run_dir / "eval" / "decode_grid.csv").assign(**own)]
        except (OSError, ValueError) as err:
            notes.append(f"`{run_dir / 'eval' / 'decode_grid.csv'}` skipped: {err}")
    flat = {key: value for key, value in result.items() if not isinstance(value, dict)}
    decoding = {f"decoding_{k}": v for k, v in (result.get("decoding") or {}).items()}
    return {"sft": evals, "sft_scalars": [{**tag, **row} for row in curve], "sft_answers": answers,
            "decode_grid": grid, "sft_runs": [{**flat, "variant": variant, **decoding}]}


def _frame(parts: list) -> pd.DataFrame:
    """Rows (dicts) or frames gathered from all runs as one frame."""
    if parts and isinstance(parts[0], pd.DataFrame):
        return pd.concat(parts, ignore_index=True)
    return pd.DataFrame(parts)


def load_study(folder: str | Path) -> StudyFrames:
    """Read `runs/<study>/` (layout in the module docstring) into a StudyFrames; missing pieces stay empty."""
    folder = Path(folder)
    notes: list[str] = []
    index = _read_json(folder / "study.json", notes) if (folder / "study.json").exists() else None
    index = index if isinstance(index, dict) else {"name": folder.name, "runs": []}
    run_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_")
                      and ((p / "run.json").exists() or (p / "result.json").exists()))
    parts: dict[str, list] = {}
    sft_done: set[str] = set()
    for run_dir in run_dirs:
        result = _read_json(run_dir / "result.json", notes) if (run_dir / "result.json").exists() else None
        if isinstance(result, dict) and result.get("stage") == "sft":
            sft_done.add(result["run_id"])
            for key, rows in _read_sft_run(run_dir, result, notes).items():
                parts.setdefault(key, []).extend(rows)
        elif isinstance(result, dict) and "run_id" in result:
            for key, rows in _read_run(run_dir, result, notes, index.get("spec") or {}).items():
                parts.setdefault(key, []).extend(rows)
    for sft_dir in sorted(p for p in (folder / "sft").glob("*") if p.is_dir()):  # SFT of models from elsewhere
        rows, curve = read_sft(sft_dir, notes)
        for key, source in (("sft", rows), ("sft_scalars", curve)):
            parts.setdefault(key, []).extend({"run_id": None, "arm": row.get("arm", sft_dir.name), "sft": sft_dir.name,
                                              **row} for row in source)
    frames = {key: _frame(rows) for key, rows in parts.items()}

    runs = frames.pop("runs", pd.DataFrame())
    if len(runs):
        runs = runs.assign(**{c: np.nan for c in OPTIONAL_RESULT_COLUMNS if c not in runs})
        runs["backbone"] = runs["backbone"].fillna(runs["arm"]) if "backbone" in runs else runs["arm"]
        runs["flops"] = training_flops(runs["params_non_embedding"], runs["tokens"])
    done = (set(runs["run_id"]) if len(runs) else set()) | sft_done
    tune, diverged = pd.DataFrame(), pd.DataFrame()
    if len(runs):
        is_tune = runs["stage"].eq("tune") if "stage" in runs else pd.Series(False, index=runs.index)
        tune = runs[is_tune].reset_index(drop=True)
        runs = runs[~is_tune]
        diverged = runs[runs["diverged"]].reset_index(drop=True)
        runs = runs[~runs["diverged"]].reset_index(drop=True)
    planned_ids = {row["run_id"] for row in index.get("runs", [])}
    missing_runs = pd.DataFrame([{**row, "status": _run_status(folder / row["run_id"])}
                                 for row in index.get("runs", []) if row["run_id"] not in done]
                                + [{"run_id": p.name, "status": _run_status(p)} for p in run_dirs
                                   if p.name not in done and p.name not in planned_ids])
    scalars = frames.pop("scalars", pd.DataFrame())
    if len(scalars):
        keys = ["run_id", "arm", "unique_tokens", "epochs", "size", "params_non_embedding", "objective", "best_val_set"]
        finished = pd.concat([runs, diverged, tune], ignore_index=True)
        scalars = scalars.merge(finished[[k for k in keys if k in finished]], on="run_id", how="left")
    if not swanlab_reader.swanlab_available() and any((p / "swanlog").is_dir() for p in run_dirs):
        notes.append("SwanLab logs present but not decoded (swanlab is not installed): the scalar mirror was used")
    qa = frames.pop("qa", pd.DataFrame())
    return StudyFrames(name=index.get("name", folder.name), runs=runs, scalars=scalars, qa=qa,
                       planned=pd.DataFrame(index.get("runs", [])), missing=list(missing_runs.get("run_id", [])),
                       spec=index.get("spec", {}), missing_runs=missing_runs, bench=read_bench(folder, notes),
                       notes=notes, diverged=diverged, tune=tune, **frames)
