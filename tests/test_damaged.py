"""Damaged files in a study: a result.json that cannot be read is set aside (renamed, reported) and its run trained
again, never fatal; a run resumed from its final checkpoint keeps its true training time and throughput."""

import json

import pytest

from dlmstudy.analysis.frames import load_study
from dlmstudy.runners import queue
from dlmstudy.study.spec import parse_spec
from dlmstudy.training.clock import CLOCK_FILE
from tests.test_study import TINY

ONE_RUN = {**TINY, "arms": ["qwen"], "grid": {"unique_people": [20], "total_tokens": 2048},
           "evaluation": {**TINY["evaluation"], "qa_people": 0, "sampler_grid": {}, "lm_eval": {"tasks": []}}}


def study(root, name: str):
    return parse_spec({**ONE_RUN, "name": name, "runs_dir": str(root / "runs"), "reports_dir": str(root / "reports")})


def cut_short(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut short", "not an object", "another run's", "final checkpoint cut short"])
def test_a_damaged_result_is_set_aside_and_its_run_trained_again(tmp_path, damage):
    spec = study(tmp_path, "damaged")
    (first,) = queue.run_queue(spec, progress=lambda m: None)
    path = tmp_path / "runs" / "damaged" / first["run_id"] / "result.json"
    if damage == "final checkpoint cut short":  # what SFT, eval and generate read
        cut_short(path.parent / "checkpoint" / "model.safetensors")
        damaged = path.parent / "checkpoint"
    else:
        text = path.read_text()
        path.write_text({"cut short": text[: len(text) // 2], "not an object": "[]",
                         "another run's": json.dumps({**first, "run_id": "qwen_u1k_r1_other"})}[damage])
        damaged = path
    said = []
    (again,) = queue.run_queue(spec, progress=said.append)
    (aside,) = path.parent.glob(f"{damaged.name}.damaged-*")
    assert list(path.parent.glob("result.json.damaged-*")), "the result of the damaged run is set aside too"
    assert any(f"{damaged}: damaged" in m and aside.name in m for m in said), said
    assert any("training on" in m for m in said), "the run was trained again"
    assert json.loads(path.read_text())["run_id"] == first["run_id"] == again["run_id"]
    assert again["final_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-5)
    frames = load_study(tmp_path / "runs" / "damaged")
    assert len(frames.runs) == 1 and not frames.missing


@pytest.mark.slow
def test_damaged_data_caches_are_set_aside_and_built_again(tmp_path, capsys):
    spec = study(tmp_path, "caches")
    (first,) = queue.run_queue(spec, progress=lambda m: None)
    cache = tmp_path / "runs" / "caches" / "_cache"
    (tokens,) = cache.glob("train-*/tokens.bin")
    (tokenizer,) = cache.glob("tokenizer-*/tokenizer.json")
    cut_short(tokens)
    cut_short(tokenizer)
    capsys.readouterr()
    (again,) = queue.run_queue(spec, progress=print)
    said = capsys.readouterr().out
    assert f"{tokens.parent}: damaged (tokens.bin holds" in said and f"{tokenizer.parent}: damaged" in said
    assert "finished earlier, skipped" in said and again == first
    assert list(cache.glob("train-*.damaged-*")) and list(cache.glob("tokenizer-*.damaged-*"))
    assert tokens.stat().st_size > 0 and json.loads(tokenizer.read_text())


class Killed(Exception):
    """Stands in for a kill between the end of training and the result."""


@pytest.mark.slow
def test_a_run_resumed_from_its_final_checkpoint_keeps_its_training_time(tmp_path, monkeypatch):
    spec = study(tmp_path, "resumed")

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr("dlmstudy.runners.run.save_checkpoint", killed)
        with pytest.raises(Killed):
            queue.run_queue(spec, progress=lambda m: None)
    (run_dir,) = [p for p in (tmp_path / "runs" / "resumed").iterdir() if (p / "run.json").exists()]
    final = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    clock = json.loads((final / CLOCK_FILE).read_text())
    assert clock["segments"] == 1 and clock["train_seconds"] > 0
    said = []
    (result,) = queue.run_queue(spec, progress=said.append)
    assert any(f"resuming from {final.name}" in m for m in said), said
    assert result["steps"] == clock["step"] and result["train_segments"] == 2
    assert result["train_runtime_s"] >= clock["train_seconds"]
    assert result["train_tokens_per_s"] == pytest.approx(result["steps"] * result["tokens_per_step"]
                                                         / result["train_runtime_s"])
