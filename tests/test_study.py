"""End to end on a tiny built-in study: runs, skip of finished runs, resume after a kill, report."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from dlmstudy.analysis.frames import load_study
from dlmstudy.reports.render import build_report
from dlmstudy.runners import queue
from dlmstudy.study.spec import parse_spec

TINY = {
    "name": "tiny", "seed": 0, "device": "cpu",
    "tracking": {"report_to": "swanlab", "mode": "offline"},
    "tokenizer": {"kind": "bpe", "vocab_size": 320},
    "data": {"pretrain": {"source": "builtin:biographies", "people": 80}, "validation_tokens": 256, "max_length": 32},
    "arms": ["llada", "qwen", "qwen-ar-reg"],
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    "grid": {"unique_people": [20, 60], "total_tokens": 2048},
    "training": {"per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_batches": 1},
    "evaluation": {"mc_num": 2, "qa_people": 2, "steps": 4, "gen_length": 4, "block_length": 4, "batch_size": 16,
                   "sampler_grid": {"steps": [4, 2], "block_length": [4, 2], "batch_size": [3, 64]},
                   "lm_eval": {"tasks": ["bio_qa_forward", "bio_mc"], "limit": 2}},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    spec = parse_spec({**TINY, "runs_dir": str(root / "runs"), "reports_dir": str(root / "reports")})
    results = queue.run_queue(spec, progress=lambda m: None)
    return spec, root, results


@pytest.mark.slow
def test_every_run_finishes_with_result_and_contracted_files(finished):
    spec, root, results = finished
    assert len(results) == 6 and {r["arm"] for r in results} == {"llada", "qwen", "qwen-ar-reg"}
    tokens = {r["tokens"] for r in results}
    assert tokens == {2048}, "both data settings spend the same total tokens"
    for r in results:
        run = root / "runs" / "tiny" / r["run_id"]
        for name in ("run.json", "result.json", "scalars.jsonl", "checkpoint/dlmstudy.json", "eval/qa_samples.jsonl"):
            assert (run / name).exists(), name
        assert not (run / "checkpoints").exists(), "intermediate checkpoints are removed once the run is done"
        assert r["val_loss_kind"] == ("exact NLL" if r["objective"] == "ar" else "ELBO (upper bound on NLL)")
        assert r["params_total"] > r["params_non_embedding"] > 0
        assert r["probe_dtype"] == "float32"  # CPU trains in fp32; bf16 runs decode their probes in bf16
        assert list((run / "swanlog").glob("run-*/*.swanlab")), "SwanLab offline log written"
        scalars = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
        assert any("val_loss" in s for s in scalars) and any("loss" in s for s in scalars)
        grid = pd.read_csv(run / "eval" / "sampler_grid.csv")
        settings = {(r.steps, r.block_length) for r in grid.itertuples()}
        if r["objective"] == "ar":  # one token per step, gen_length steps
            assert settings == {(4, 1)}
        else:  # every (steps, block length) pair here splits evenly over the blocks
            assert settings == {(4, 4), (4, 2), (2, 4), (2, 2)}
        assert grid["accuracy"].between(0, 1).all() and (grid["tokens_per_s"] > 0).all()
        assert sorted(set(grid["batch_size"])) == [3, 64] and len(grid) == 2 * len(settings)
        for _, rows in grid.groupby("batch_size"):  # the plain sampler with the most steps, compared with itself
            reference = rows.iloc[0]
            assert reference["same_answers"] == 1.0 and reference["accuracy_diff_se"] == 0.0
        assert grid["same_answers"].between(0, 1).all()


@pytest.mark.slow
def test_both_arms_of_a_setting_see_identical_batches(finished):
    spec, root, results = finished
    by_setting = {}
    for r in results:
        cfg = json.loads((root / "runs" / "tiny" / r["run_id"] / "run.json").read_text())
        by_setting.setdefault(cfg["unique_tokens"], []).append(cfg)
    for cfgs in by_setting.values():
        keys = ("unique_tokens", "epochs", "total_tokens", "data_fingerprint", "data_seed", "max_length")
        assert all(c[k] == cfgs[0][k] for c in cfgs for k in keys)
        same = [c["training"] for c in cfgs if c["arm"] in ("llada", "qwen")]
        assert len(same) == 2 and same[0] == same[1], "the headline arms share every training argument"


@pytest.mark.slow
def test_regularised_ar_control_trains_with_its_overrides(finished):
    spec, root, results = finished
    for r in results:
        cfg = json.loads((root / "runs" / "tiny" / r["run_id"] / "run.json").read_text())
        regularised = r["arm"] == "qwen-ar-reg"
        assert cfg["size"]["dropout"] == (0.1 if regularised else 0.0)
        assert cfg["training"].get("weight_decay", 0.0) == (0.1 if regularised else 0.0)
    qwen = {r["unique_tokens"]: r["params_non_embedding"] for r in results if r["arm"] == "qwen"}
    assert all(r["params_non_embedding"] == qwen[r["unique_tokens"]] for r in results if r["arm"] == "qwen-ar-reg")


@pytest.mark.slow
def test_lm_eval_runs_offline_on_the_built_in_tasks_for_each_arm(finished):
    spec, root, results = finished
    for r in results:
        assert set(r["lm_eval"]) == {"bio_qa_forward", "bio_mc"}, r["arm"]
        assert 0.0 <= r["lm_eval"]["bio_mc"]["acc,none"] <= 1.0
        run = root / "runs" / "tiny" / r["run_id"] / "eval" / "lm_eval"
        assert (run / "results.json").exists() and list(run.glob("samples_*.jsonl"))


@pytest.mark.slow
def test_second_invocation_skips_finished_runs(finished, monkeypatch):
    spec, root, _ = finished
    monkeypatch.setattr("dlmstudy.runners.run.execute_run", lambda *a, **k: pytest.fail("a finished run was retrained"))
    said = []
    results = queue.run_queue(spec, progress=said.append)
    assert len(results) == 6
    assert sum("finished earlier, skipped" in m for m in said) == 6


@pytest.mark.slow
def test_report_holds_run_table_figures_and_claim_section(finished):
    spec, root, _ = finished
    out = build_report(root / "runs" / "tiny", root / "reports" / "tiny")
    text = out.read_text()
    assert "## Runs" in text and "non-emb" in text
    assert (out.parent / "report.html").exists() and (out.parent / "figures" / "loss_vs_tokens.png").exists()
    assert (out.parent / "tables" / "runs.csv").exists()
    assert "## Summary" in text and "## Claims" in text
    frames = load_study(root / "runs" / "tiny")
    assert not frames.missing and len(frames.runs) == 6


@pytest.mark.slow
def test_killed_study_resumes_and_finishes(tmp_path):
    spec_path = tmp_path / "tiny.yaml"
    raw = {**TINY, "name": "killed", "grid": {"unique_people": [20], "total_tokens": 4096}, "arms": ["llada"],
           "training": {**TINY["training"], "save_steps": 2}}
    spec_path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "dlmstudy.cli", "run", str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "runs" / "killed").glob("*/checkpoints/*/COMPLETE")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "runs" / "killed").glob("*/checkpoints/*/COMPLETE")), "no checkpoint before the kill"
    assert not list((tmp_path / "runs" / "killed").glob("*/result.json"))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from checkpoint-" in done.stdout
    assert len(list((tmp_path / "runs" / "killed").glob("*/result.json"))) == 1
