"""Runs in parallel processes through submitit: local workers and Slurm (against stand-in Slurm commands).

Each run here is a process that imports torch, so these tests take tens of seconds each on a small
machine; the runs themselves are tiny.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import fake_slurm
from dlmstudy.cli import main
from dlmstudy.runners import queue
from dlmstudy.runners.job import read_job_record
from dlmstudy.runners.progress import StudyProgress
from dlmstudy.runners.scheduler import LocalBackend, LocalDevices, SlurmBackend, execute_study, runs_per_device
from dlmstudy.runners.status import study_states
from dlmstudy.runners.study import prepare_data
from dlmstudy.study.spec import ClusterSpec, parse_spec

TINY = {
    "name": "par", "seed": 0, "device": "cpu", "tracking": {"report_to": "none"},
    "tokenizer": {"kind": "bpe", "vocab_size": 320},
    "data": {"pretrain": {"source": "builtin:biographies", "people": 80}, "validation_tokens": 256, "max_length": 32},
    "arms": ["llada", "qwen"],
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    "grid": {"unique_people": [40], "total_tokens": 8192},
    "training": {"per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_batches": 1, "save_steps": 2},
    "evaluation": {"mc_num": 1, "qa_people": 0, "batch_size": 16},
}


def tiny_spec(root: Path, **changes) -> dict:
    return {**TINY, "runs_dir": str(root / "runs"), "reports_dir": str(root / "reports"), **changes}


@pytest.fixture
def one_thread(monkeypatch):
    """Worker processes on one thread each, as this test process (the same reduction order, the same losses)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def first_checkpoint(study: Path, deadline_s: float = 300) -> Path:
    """The folder of the first run that has a complete checkpoint (waits for it)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        found = sorted(study.glob("*/checkpoints/*/COMPLETE"))
        if found:
            return found[0].parents[2]
        time.sleep(0.05)
    raise AssertionError(f"no run of {study} saved a checkpoint in {deadline_s} s")


@pytest.mark.slow
def test_two_workers_overlap_and_match_one_process(tmp_path, one_thread):
    reference = parse_spec(tiny_spec(tmp_path / "ref"))
    expected = {r["run_id"]: r for r in queue.run_queue(reference, progress=lambda m: None)}
    spec = parse_spec(tiny_spec(tmp_path / "par"))
    said = []
    outcome = execute_study(spec, LocalBackend(spec, device="cpu", workers=2), progress=said.append)
    assert not outcome.failed and len(outcome.finished) == 2
    got = {r["run_id"]: r for r in outcome.finished}
    assert got.keys() == expected.keys()
    for run_id, result in got.items():
        assert result["final_val_loss"] == expected[run_id]["final_val_loss"]
        assert result["best_val_loss"] == expected[run_id]["best_val_loss"]
    records = [read_job_record(tmp_path / "par" / "runs" / "par" / run_id) for run_id in got]
    assert all(r["state"] == "finished" and r["executor"] == "local" for r in records)
    # both were started as processes before either ended (when each began to train depends on the machine's load)
    assert max(r["submitted_at"] for r in records) < min(r["ended_at"] for r in records), "the runs did not overlap"
    finished = [line for line in said if ": done, " in line]
    assert len(finished) == 2 and finished[-1].startswith("[2/2 runs, 16.4k/16.4k tokens")


@pytest.mark.slow
def test_failed_and_killed_runs_leave_the_others_and_resume(tmp_path, one_thread):
    raw = tiny_spec(tmp_path, arms=["qwen"], grid={"unique_people": [20, 30, 40], "total_tokens": 16384})
    spec_path = tmp_path / "par.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    runs, _ = queue.study_runs(spec, prepare_data(spec, progress=lambda m: None))
    broken, killed, other = runs
    (broken.dir / "run.json").mkdir(parents=True)  # the run cannot write its record: it fails
    proc = subprocess.Popen([sys.executable, "-m", "dlmstudy.cli", "run", str(spec_path), "--workers", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first_checkpoint(tmp_path / "runs" / "par") == killed.dir
    pid, _ = (killed.dir / ".lock").read_text().split()
    os.kill(int(pid), signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert f"{broken.run_id}: FAILED (IsADirectoryError" in out and f"{killed.run_id}: FAILED (" in out
    assert f"{other.run_id}: done, exact NLL" in out
    states = {r.run_id: r for r in study_states(spec)}
    assert [states[r.run_id].state for r in runs] == ["failed", "failed", "done"]
    assert "resumes from checkpoint-" in states[killed.run_id].detail

    (broken.dir / "run.json").rmdir()
    outcome = execute_study(spec, LocalBackend(spec, device="cpu", workers=2), progress=lambda m: None)
    assert not outcome.failed and len(outcome.finished) == 3
    assert "resuming from checkpoint-" in Path(read_job_record(killed.dir)["log"]).read_text()
    assert {r.state for r in study_states(spec)} == {"done"}


@pytest.mark.slow
def test_slurm_jobs_requeue_after_timeout_and_preemption_and_resume(tmp_path, monkeypatch, one_thread):
    fake_slurm.install(tmp_path / "bin", tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    spec = parse_spec(tiny_spec(tmp_path, grid={"unique_people": [40], "total_tokens": 32768}))
    backend = SlurmBackend(spec, ClusterSpec(partition="debug", time="1:00:00", gpus_per_run=0))
    backend.poll_s = 0.5
    interrupted = {}

    def interrupt_each_once():  # as submitit's job._interrupt: a timeout is USR2, a preemption SIGTERM then USR2
        study = tmp_path / "runs" / "par"
        for how in ("timeout", "preemption"):
            while True:
                found = [p.parents[2] for p in study.glob("*/checkpoints/*/COMPLETE")
                         if p.parents[2] not in interrupted]
                if found:
                    break
                time.sleep(0.05)
            job_id = read_job_record(found[0])["job_id"]
            for sig in (["SIGTERM"] if how == "preemption" else []) + ["USR2"]:
                subprocess.run(["scancel", job_id, "--signal", sig], check=True)
            interrupted[found[0]] = (how, job_id)

    thread = threading.Thread(target=interrupt_each_once, daemon=True)
    thread.start()
    outcome = execute_study(spec, backend, progress=lambda m: None)
    assert not outcome.failed and len(outcome.finished) == 2
    assert len(interrupted) == 2
    for run_dir, (how, job_id) in interrupted.items():
        assert job_id.split("_")[1] in "01"  # both runs went as one array
        assert fake_slurm.job_state(tmp_path / "slurm", job_id)["runs"] == 2, how
        log = Path(read_job_record(run_dir)["log"]).read_text()
        assert "resuming from checkpoint-" in log, how
        assert (run_dir / "result.json").exists()
    script = next((tmp_path / "runs" / "par" / "_jobs").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --time=60" in script and "--array=0-1%2" in script
    assert "#SBATCH --signal=USR2@120" in script
    states = study_states(spec)
    assert {r.state for r in states} == {"done"} and all(r.job_id in [j for _, j in interrupted.values()]
                                                         for r in states)


def test_status_names_every_state(tmp_path, monkeypatch, capsys):
    fake_slurm.install(tmp_path / "bin", tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    raw = tiny_spec(tmp_path, grid={"unique_people": [20, 30, 40, 50], "total_tokens": 4096}, arms=["qwen"],
                    sft={"source": "builtin:biographies", "epochs": [1], "max_length": 32})
    spec_path = tmp_path / "par.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    runs, sft_runs = queue.study_runs(spec, prepare_data(spec, progress=lambda m: None))
    done, diverged, queued, running = runs
    for run, flag in ((done, False), (diverged, True)):
        run.dir.mkdir(parents=True)
        (run.dir / "result.json").write_text(json.dumps({"run_id": run.run_id, "diverged": flag,
                                                         "val_loss_kind": "exact NLL",
                                                         "final_val_loss": 2.5 if not flag else float("nan")}))
    for run, key, state in ((queued, "7_0", "PENDING"), (running, "7_1", "RUNNING")):
        (tmp_path / "slurm" / f"{key}.json").write_text(json.dumps({"state": state}))
        run.dir.mkdir(parents=True)
        (run.dir / "job.json").write_text(json.dumps({"executor": "slurm", "job_id": key, "state": None,
                                                      "folder": str(tmp_path / "jobs" / key)}))
    assert main(["status", str(spec_path)]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:-1]}
    assert [rows[r.run_id][3] for r in runs] == ["done", "diverged", "queued", "running"]
    assert rows[queued.run_id][4] == "7_0" and rows[running.run_id][4] == "7_1"
    assert rows[sft_runs[0].run_id][3] == "waiting"
    assert "1 done, 1 diverged, 1 running, 1 queued, 1 waiting (of 5 runs)" in table

    backend = SlurmBackend(spec, ClusterSpec())  # a second `run --slurm` follows the live jobs, submits the rest
    assert backend.attach(queued).job_id == "7_0" and backend.attach(running).job_id == "7_1"
    assert backend.attach(done) is None and backend.attach(sft_runs[0]) is None

    (tmp_path / "slurm" / "7_0.json").write_text(json.dumps({"state": "FAILED"}))
    assert main(["status", str(spec_path), "--json"]) == 0
    states = {r["run_id"]: r["state"] for r in json.loads(capsys.readouterr().out)}
    assert states[queued.run_id] == "failed"
    assert backend.attach(queued) is None


def test_devices_hold_k_runs_each_and_n_in_all():
    small = type("R", (), {"params": type("P", (), {"non_embedding": 3_000_000})()})()
    big = type("R", (), {"params": type("P", (), {"non_embedding": 500_000_000})()})()
    assert runs_per_device(small, None) > runs_per_device(big, None) == 1
    assert runs_per_device(big, 3) == 3
    slots = LocalDevices("cuda", [0, 1], workers=5, runs_per_device=2)
    placed = [slots.place(small) for _ in range(5)]
    assert [p.device for p in placed[:4]] == [0, 1, 0, 1] and placed[4] is None  # 2 devices x 2 runs
    slots.free(placed[1])
    assert slots.place(small).device == 1
    cpu = LocalDevices("cpu", [None], workers=3, runs_per_device=None)
    assert [cpu.place(big) is not None for _ in range(4)] == [True, True, True, False]


def test_eta_starts_from_the_plan_and_follows_measured_runs():
    study = StudyProgress(tokens={"a": 100, "b": 100, "c": 100, "sft": 0},
                          estimates={"a": 10.0, "b": 10.0, "c": 20.0, "sft": None})
    for r in ("a", "b"):
        study.started(r, at=0.0)
    assert study.eta(now=0.0) == pytest.approx((10 + 10 + 20 + 40 / 3) / 2)  # SFT: the mean estimate
    study.finished("a", seconds=30.0)  # three times slower than planned (sharing a device, say)
    study.started("c", at=30.0)
    assert study.correction() == pytest.approx(3.0)
    assert study.eta(now=30.0) == pytest.approx((0 + 60 + 40) / 2)  # b: 30 planned x3 - 30 s run; c: 60; sft 40
    assert study.line().startswith("[1/4 runs, 100/300 tokens, ETA")


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "2", "--devices", "0"], "--devices names accelerators"),
    (["--workers", "2", "--slurm"], "choose one"),
    (["--slurm"], "no srun on PATH"),
    (["--slurm", "--slurm_time", "soon"], "--slurm_time 'soon'"),
])
def test_scheduling_mistakes_are_one_line(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    spec_path = tmp_path / "par.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp_path)))
    assert main(["run", str(spec_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
