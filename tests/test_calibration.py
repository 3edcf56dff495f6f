"""`dlmstudy plan --calibrate`: the study's arms and sizes timed on this machine, cached per device, and every run
estimated by them; the shipped H200 records travel as package data."""

from __future__ import annotations

import fnmatch
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from dlmstudy.cli import main
from dlmstudy.runners import calibration
from dlmstudy.runners.device import cpu_name
from dlmstudy.study.estimate import SHIPPED_BENCH, load_bench

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "tokenizer": {"kind": "bpe", "vocab_size": 320}, "data": {"max_length": 32},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "grid": {"unique_tokens": [2048, 8192], "epochs": [1, 3], "pairing": "zip"}}


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLMSTUDY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


def plan_rows(capsys, *extra: str) -> list[dict]:
    assert main(["plan", "tiny.yaml", "--calibrate", "--device", "cpu", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_run_is_timed_by_its_own_arm_and_shape_measured_here(study, capsys):
    rows = plan_rows(capsys)
    cache = calibration.cache_file("cpu")
    records = json.loads(cache.read_text())
    assert cache.parent == study / "cache" / "calibration" and len(records) == 2  # one shape per arm
    speed = {r["arm"]: r["tokens_per_s"] for r in records}
    for row in rows:
        assert row["bench_record"].startswith(f"{cpu_name()} calibration-{row['arm']}-d32 {row['arm']} (fast)")
        assert row["est_seconds"] == pytest.approx(row["total_tokens"] / speed[row["arm"]])  # the same shape
        assert row["est_total_seconds"] > row["est_seconds"] > 0
    assert {r["batch"] for r in records} == {16}  # the run's batch: 16 x 32 tokens is within a CPU step's budget


def test_a_second_plan_measures_nothing_and_a_damaged_cache_is_measured_again(study, capsys, monkeypatch):
    first = plan_rows(capsys)
    measure = calibration._measure
    monkeypatch.setattr(calibration, "_measure", lambda *a, **k: pytest.fail("measured again"))
    assert plan_rows(capsys) == first
    cache = calibration.cache_file("cpu")
    cache.write_text("{not json")
    monkeypatch.setattr(calibration, "_measure", measure)
    assert [r["est_seconds"] > 0 for r in plan_rows(capsys)] == [True] * 4
    assert cache.with_name(cache.name + ".damaged").read_text() == "{not json"


def test_calibrate_and_bench_are_alternatives(study, capsys):
    assert main(["plan", "tiny.yaml", "--calibrate", "--bench", "x.json"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dlmstudy: error: --calibrate times the runs on this machine and --bench by a file: give one of them")


def test_the_shipped_h200_records_are_package_data():
    assert SHIPPED_BENCH.is_file() and load_bench(SHIPPED_BENCH)
    package = Path(str(resources.files("dlmstudy")))
    relative = Path(str(SHIPPED_BENCH)).relative_to(package).as_posix()
    globs = re.search(r'dlmstudy = \[(.*)\]', (REPO / "pyproject.toml").read_text()).group(1)
    assert any(fnmatch.fnmatch(relative, g.strip().strip('"')) for g in globs.split(","))


def test_a_cpu_step_stays_within_its_token_budget_and_an_arm_prefers_its_own_record(study):
    from dlmstudy.runners.planning import plan_study
    from dlmstudy.study.estimate import BenchRecord, closest_record
    from dlmstudy.study.spec import parse_spec

    spec = parse_spec({**TINY, "data": {"max_length": 1024}, "training": {"per_device_train_batch_size": 16}})
    run = plan_study(spec).runs[0]
    assert calibration.calibration_batch(run, "cpu") == calibration.CPU_TOKENS_PER_STEP // 1024
    assert calibration.calibration_batch(run, "cuda") == 16
    mine, other = (BenchRecord("CPU", "c", arm, "mdm", "fast", 2, 1024, speed, 4e8) for arm, speed in
                   (("llada", 1e3), ("qwen-mdm", 2e3)))
    pick = closest_record([other, mine], objective="mdm", flops_per_token=4e8, seq_len=1024, batch=2, mode="fast",
                          arm="llada")
    assert pick is mine
