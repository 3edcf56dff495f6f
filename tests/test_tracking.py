"""SwanLab as the tutorial uses it: transformers' integration into a run dlmstudy opens (offline, or online after a
login), the tutorial's environment variables, final metrics logged, a resumed run continuing its experiment, and
the offline readback for the swanlab versions pyproject allows."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import swanlab
import yaml

from dlmstudy.analysis import swanlab_reader
from dlmstudy.analysis.frames import load_study
from dlmstudy.cli import main
from dlmstudy.errors import UserError
from dlmstudy.study.spec import TrackingSpec
from dlmstudy.training.tracking import check_tracking, finish_tracking, start_swanlab, swanlab_settings

REPO = Path(__file__).resolve().parents[1]
FIXTURES = sorted((REPO / "tests" / "data" / "swanlab").glob("written-by-*.swanlab"))
TINY = {"name": "tiny", "tokenizer": {"kind": "bpe", "vocab_size": 320},
        "data": {"max_length": 32, "validation_tokens": 512, "pretrain": {"people": 40}},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}, "arms": ["qwen"],
        "grid": {"unique_tokens": [2048], "epochs": [1]},
        "training": {"per_device_train_batch_size": 8, "eval_every": 2},
        "evaluation": {"qa_people": 4, "steps": 4, "gen_length": 4, "block_length": 4}}


@pytest.fixture
def swanlab_env(tmp_path, monkeypatch):
    """No SwanLab login and no SWANLAB_* settings from the machine running the tests."""
    for var in [v for v in os.environ if v.startswith("SWANLAB_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab-home"))  # no saved key
    monkeypatch.chdir(tmp_path)
    return tmp_path


def logs(folder: Path) -> list[Path]:
    return sorted(folder.glob("run-*/run-*.swanlab"), key=lambda p: p.parent.name)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_logs_of_the_supported_swanlab_versions_decode_under_the_trainers_names(path):
    long = swanlab_reader.read_swanlab_file(path)
    assert long.groupby("key").size().to_dict() == {"loss": 10, "learning_rate": 10, "val_loss": 2,
                                                    "train_runtime": 1, "final/final_val_loss": 1}
    wide = swanlab_reader.wide(long).set_index("step")
    assert list(wide.columns) == ["learning_rate", "loss", "train_runtime", "val_loss"]
    assert wide.loc[5, "val_loss"] == pytest.approx(5.0) and wide.loc[10, "loss"] == pytest.approx(4.0)
    assert swanlab_reader.run_info(path) == {"project": "fixture", "name": "qwen_u2k_r1",
                                             "id": swanlab_reader.run_info(path)["id"]}


def test_the_allowed_swanlab_range_is_the_tested_one(monkeypatch):
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"swanlab>=0\.10,<0\.11"', pyproject)
    assert swanlab_reader.SUPPORTED == ("0.10.",) and {p.stem for p in FIXTURES} == {
        "written-by-0.10.0", "written-by-0.10.3"}  # both ends of the range
    assert swanlab_reader.swanlab_available()
    monkeypatch.setattr(swanlab, "__version__", "0.11.0")
    assert not swanlab_reader.swanlab_available() and swanlab_reader.read_swanlab_file(FIXTURES[0]).empty


def test_project_and_mode_come_from_the_spec_else_the_tutorials_environment(swanlab_env, monkeypatch):
    assert swanlab_settings(TrackingSpec()) == ("dlmstudy", "offline")
    monkeypatch.setenv("SWANLAB_PROJ_NAME", "older-name")
    assert swanlab_settings(TrackingSpec()) == ("older-name", "offline")
    monkeypatch.setenv("SWANLAB_PROJECT", "llada-tutorial")
    monkeypatch.setenv("SWANLAB_MODE", "cloud")
    assert swanlab_settings(TrackingSpec()) == ("llada-tutorial", "online")
    assert swanlab_settings(TrackingSpec(project="mine", mode="offline")) == ("mine", "offline")
    assert swanlab_settings(TrackingSpec(mode="cloud")) == ("llada-tutorial", "online")


def test_online_without_a_login_is_one_line_before_any_training(swanlab_env, monkeypatch, capsys):
    (swanlab_env / "s.yaml").write_text(yaml.safe_dump({**TINY, "tracking": {"mode": "online"}}))
    assert main(["run", "s.yaml", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dlmstudy: error: tracking.mode online: not logged in to SwanLab; run `swanlab login` (or set "
        "SWANLAB_API_KEY), or use tracking.mode offline and `swanlab sync` the logs later"]
    assert not (swanlab_env / "runs").exists()
    monkeypatch.setenv("SWANLAB_API_KEY", "x" * 21)
    check_tracking(TrackingSpec(mode="online"))  # a key is there: swanlab logs in when the run starts


def test_a_resumed_run_continues_its_experiment_and_logs_its_final_metrics(swanlab_env, monkeypatch):
    monkeypatch.setenv("SWANLAB_PROJECT", "llada-tutorial")  # the tutorial's way of naming the project
    folder = swanlab_env / "swanlog"
    ids = []
    for final in ({}, {"final_val_loss": 2.5, "lm_eval": {"bio_mc": {"acc,none": 0.5}}, "diverged": False}):
        run = start_swanlab(TrackingSpec(), name="llada_u2k_r1", logdir=folder, config={"lr": 1e-3})
        ids.append(run.id)
        swanlab.log({"train/loss": 3.0}, step=len(ids))
        finish_tracking(final)
    assert ids[0] == ids[1] and len(logs(folder)) == 2
    assert [swanlab_reader.run_info(p) for p in logs(folder)] == [
        {"project": "llada-tutorial", "name": "llada_u2k_r1", "id": ids[0]}] * 2
    final = swanlab_reader.read_swanlab_file(logs(folder)[1]).set_index("key")["value"]
    assert final["final/final_val_loss"] == 2.5 and final["final/lm_eval/bio_mc/acc,none"] == 0.5
    assert "final/diverged" not in final
    assert os.environ["SWANLAB_PROJECT"] == "llada-tutorial"  # hidden from swanlab.init only
    finish_tracking({"x": 1.0})  # no open run: nothing to do


def test_a_studys_swanlab_run_gets_the_trainers_logs_and_the_final_evaluation(swanlab_env):
    (swanlab_env / "s.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["run", "s.yaml", "--device", "cpu"]) == 0
    (run,) = (swanlab_env / "runs" / "tiny").glob("qwen_*")
    (path,) = logs(run / "swanlog")
    keys = set(swanlab_reader.read_swanlab_file(path)["key"])
    assert {"loss", "val_loss", "learning_rate", "final/final_val_loss", "final/accuracy_forward"} <= keys
    assert "swanlab" not in sys.modules or not swanlab.has_run()  # closed after the final evaluation
    sources = load_study(swanlab_env / "runs" / "tiny").sources.iloc[0]
    assert sources["SwanLab scalars"] > 0 and sources["mirror vs SwanLab max |diff|"] == pytest.approx(0, abs=1e-6)


def test_swanlab_init_failing_online_is_one_line(swanlab_env, monkeypatch):
    monkeypatch.setenv("SWANLAB_API_KEY", "x" * 21)

    def refuse(**kwargs):
        raise ConnectionError("api.swanlab.cn: Name or service not known\nmore detail")

    monkeypatch.setattr(swanlab, "init", refuse)
    with pytest.raises(UserError, match=r"^SwanLab could not start in mode online \(api.swanlab.cn: Name or service "
                                        r"not known\); check the network"):
        start_swanlab(TrackingSpec(mode="online"), name="r", logdir=swanlab_env / "swanlog", config={})
