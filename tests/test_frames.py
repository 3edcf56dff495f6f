"""Reading run folders back: a diverged run is kept apart from every number (old records that lack the field, and
the trainer's own record), "best" is the minimum over evaluations on one validation set, tune runs are apart."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dlmstudy.analysis.claims import judge_claims
from dlmstudy.analysis.frames import load_study
from dlmstudy.reports.render import build_report

SPEC = {"name": "toy", "arms": ["llada", "qwen"], "data": {"validation_tokens": 512, "max_length": 32}}
ARMS = {"llada": ("mdm", "ELBO (upper bound on NLL)"), "qwen": ("ar", "exact NLL")}


def write_run(folder: Path, name: str, arm: str, *, epochs: float = 1.0, final: float = 3.2, val=(5.0, 4.0, 3.5),
              train_loss=(6.0, 5.0, 4.0), config: dict | None = None, **result) -> str:
    """A finished run folder: run.json, scalars.jsonl (training rows, then evaluation rows) and result.json."""
    objective, kind = ARMS[arm]
    run = folder / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": name, "arm": arm, "seed": 0, "max_length": 32,
                                              "size": {"hidden_size": 32, "num_layers": 2}, **(config or {})}))
    rows = [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(train_loss)]
    rows += [{"step": 10 * (i + 1), "val_loss": loss, "val_loss_stderr": 0.0} for i, loss in enumerate(val)]
    (run / "scalars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    unique = 4096 / epochs
    (run / "result.json").write_text(json.dumps({
        "run_id": name, "arm": arm, "backbone": arm, "objective": objective, "params_total": 20000,
        "params_non_embedding": 12000, "unique_tokens": unique, "epochs": epochs, "tokens": 4096,
        "val_loss_kind": kind, "final_val_loss": final, "final_val_loss_stderr": 0.0,
        "best_val_loss": min([*val, final]), **result}))
    return name


def study(tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "toy"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"name": "toy", "spec": SPEC, "runs": []}))
    return folder


def test_a_diverged_run_is_listed_apart_and_enters_no_number(tmp_path):
    folder = study(tmp_path)
    write_run(folder, "qwen_ok", "qwen", final=3.0)
    write_run(folder, "llada_ok", "llada", final=3.5)
    # Recorded before result.json said so: training loss collapsed to 0.0, then validation NaN, final NaN.
    write_run(folder, "llada_old_blowup", "llada", epochs=4.0, final=float("nan"), train_loss=(6.0, 5.0, 0.0, 0.0),
              val=(5.0, 4.5, float("nan"), float("nan")))
    # The trainer's divergence stop: the final loss is that of the last good checkpoint, but the run diverged.
    write_run(folder, "qwen_stopped", "qwen", epochs=4.0, final=3.4, diverged=True, diverged_step=20,
              diverged_reason="gradient norm nan")
    # Restarted at a lower learning rate after a blow-up and then finished: its record says it did not diverge.
    write_run(folder, "llada_restarted", "llada", epochs=4.0, final=3.3, val=(5.0, float("nan"), 3.9),
              diverged=False, diverged_step=None, restarts=[{"step": 10}])
    frames = load_study(folder)
    assert set(frames.runs["run_id"]) == {"qwen_ok", "llada_ok", "llada_restarted"}
    assert frames.missing == []
    diverged = frames.diverged.set_index("run_id")
    assert set(diverged.index) == {"llada_old_blowup", "qwen_stopped"}
    assert diverged.loc["llada_old_blowup", "diverged_step"] == 30
    assert diverged.loc["llada_old_blowup", "diverged_reason"] == \
        "training loss 0 (collapsed) from step 30; validation loss nan from step 30"
    assert diverged.loc["qwen_stopped", "diverged_step"] == 20
    assert diverged.loc["qwen_stopped", "diverged_reason"] == "gradient norm nan"
    # Nothing downstream sees them, even when handed every row.
    result = judge_claims(pd.concat([frames.runs, frames.diverged]), fits=pd.DataFrame())
    used = ", ".join(result.cells["runs"])
    assert "llada_old_blowup" not in used and "qwen_stopped" not in used and "llada_restarted" in used
    report = build_report(folder, tmp_path / "report", bootstrap=0).read_text()
    section = report.split("## Diverged runs")[1].split("\n## ")[0]
    assert "llada_old_blowup" in section and "qwen_stopped" in section and "gradient norm nan" in section
    assert "llada_restarted" not in section
    assert "pretraining: 3 finished, 2 diverged, 0 missing" in report


@pytest.mark.parametrize(("config", "result", "best", "best_set", "final_set"), [
    # Recorded before validation_sequences: during training the first 1 x 4 of 16 sequences, at the end all 16.
    ({"objective_settings": {"eval_batches": 1}, "training": {"per_device_train_batch_size": 4}}, {}, 3.5,
     "first 4 of 16 sequences (during training)", "all 16 sequences (final)"),
    # eval_batches 0: every evaluation scored all 16, so the final loss is one more point on the same set.
    ({"objective_settings": {"eval_batches": 0}}, {}, 3.2, "16 sequences (every evaluation)",
     "16 sequences (every evaluation)"),
    # The trainer's record: one set for every evaluation.
    ({}, {"validation_sequences": 8}, 3.2, "8 sequences (every evaluation)", "8 sequences (every evaluation)"),
    # Nothing recorded: the evaluations during training only, never mixed with the final one.
    ({}, {}, 3.5, "evaluations during training (set not recorded)", "all 16 sequences (final)"),
])
def test_best_is_the_minimum_over_evaluations_on_one_validation_set(tmp_path, config, result, best, best_set,
                                                                    final_set):
    folder = study(tmp_path)
    write_run(folder, "qwen_run", "qwen", final=3.2, val=(5.0, 4.0, 3.5), config=config, **result)
    run = load_study(folder).runs.iloc[0]
    assert run["best_val_loss"] == best  # result.json's best_val_loss (3.2) mixes the two sets when they differ
    assert run["best_val_set"] == best_set and run["final_val_set"] == final_set


def test_tune_runs_are_kept_apart_and_their_winner_is_reported(tmp_path):
    folder = study(tmp_path)
    write_run(folder, "qwen_run", "qwen", final=3.2, learning_rate=1e-3)
    for name, lr, final, diverged in (("qwen_tune_a", 1e-3, 3.6, False), ("qwen_tune_b", 3e-3, 3.4, False),
                                      ("qwen_tune_c", 1e-2, float("nan"), True)):
        write_run(folder, name, "qwen", final=final, stage="tune", learning_rate=lr, diverged=diverged,
                  diverged_step=20 if diverged else None, diverged_reason="training loss nan" if diverged else None)
    frames = load_study(folder)
    assert list(frames.runs["run_id"]) == ["qwen_run"] and frames.diverged.empty and frames.missing == []
    assert sorted(frames.tune["run_id"]) == ["qwen_tune_a", "qwen_tune_b", "qwen_tune_c"]
    build_report(folder, tmp_path / "report", bootstrap=0)
    tune = pd.read_csv(tmp_path / "report" / "tables" / "tune.csv").set_index("run_id")
    assert tune["winner"].tolist() == [False, True, False]
    assert np.isnan(tune.loc["qwen_tune_c", "final_val_loss"]) and tune.loc["qwen_tune_c", "diverged"]
