"""docs/from-the-tutorial.md, row by row: every table row (a tutorial command or setting -> its dlmstudy
equivalent) has a check here that the equivalent does what the row says. A row without a check fails."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from dlmstudy.cli import build_parser
from dlmstudy.errors import UserError
from dlmstudy.study.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "from-the-tutorial.md"
TUTORIAL = REPO / "studies" / "tutorial.yaml"
TINY = {"name": "tiny", "tokenizer": {"kind": "bpe", "vocab_size": 320}, "data": {"max_length": 32},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "grid": {"unique_tokens": [2048], "epochs": [3]}}


def rows() -> list[str]:
    """The first cell of every body row of the guide's tables."""
    lines = GUIDE.read_text().splitlines()
    return [line.strip().strip("|").split(" | ")[0].strip() for i, line in enumerate(lines)
            if line.startswith("| ") and not line.startswith("| ---")
            and not (i + 1 < len(lines) and lines[i + 1].startswith("| ---"))]


def spec(**sections) -> object:
    return parse_spec({**TINY, **sections})


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def tutorial_plan():
    from dlmstudy.runners.planning import plan_study

    return plan_study(load_spec(TUTORIAL))


def tiny_run(**training):
    from dlmstudy.runners.planning import plan_study
    from dlmstudy.runners.run import default_arguments

    run = plan_study(spec(training=training)).runs[0]
    return run, default_arguments(run.config, run.total_tokens // run.config["max_length"], "cpu")


# --- 1. Environment -------------------------------------------------------------------------------------------------

def check_install(tmp_path, monkeypatch):
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dlmstudy = "dlmstudy.cli:main"' in pyproject
    assert re.search(r"^study:", (REPO / "Makefile").read_text(), re.M)


def check_torch_npu_wheel(tmp_path, monkeypatch):
    assert 'npu = ["torch-npu==2.13.0"]' in (REPO / "pyproject.toml").read_text()


def check_import_torch_npu(tmp_path, monkeypatch):
    from dlmstudy.runners.device import resolve_device

    monkeypatch.setitem(sys.modules, "torch_npu", None)  # absent: dlmstudy imports it itself and says so
    with pytest.raises(UserError, match="device 'npu' needs torch_npu"):
        resolve_device("npu")


def check_visible_devices(tmp_path, monkeypatch):
    import torch

    from dlmstudy.runners import device

    monkeypatch.setattr(device, "_import_torch_npu", lambda: None)
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError, match="ASCEND_RT_VISIBLE_DEVICES=0,1"):
        device.resolve_device("npu")


# --- 2. Data --------------------------------------------------------------------------------------------------------

def check_dataset_args(tmp_path, monkeypatch):
    assert spec(data={"pretrain": {"source": "./c4[train:1000_000,test:1000]"}}).data.pretrain.source.endswith("]")


def check_text_field(tmp_path, monkeypatch):
    source = {"source": "./c4.jsonl", "text_field": "content"}
    assert spec(data={"pretrain": source}).data.pretrain.text_field == "content"


def check_streaming(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown key 'data.streaming'"):
        spec(data={"streaming": False})


def check_num_proc(tmp_path, monkeypatch):
    assert spec(data={"num_proc": 8}).data.num_proc == 8


def check_drop_tail(tmp_path, monkeypatch):
    assert spec(data={"drop_tail": True}).data.drop_tail
    with pytest.raises(UserError, match="drop_tail: false is not supported"):
        spec(data={"drop_tail": False})


def check_max_length(tmp_path, monkeypatch):
    assert spec(data={"max_length": 1024}).data.max_length == 1024


def check_insert_eos(tmp_path, monkeypatch):
    assert spec(data={"insert_eos": False}).data.insert_eos is False


def check_load_preprocessed_pretraining(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown key 'data.load_preprocessed_data'"):
        spec(data={"load_preprocessed_data": True})


def check_random_length_ratio(tmp_path, monkeypatch):
    assert spec(training={"random_length_ratio": 0.01}).training.random_length_ratio == 0.01


# --- 3. Training ----------------------------------------------------------------------------------------------------

def check_pretraining_configs(tmp_path, monkeypatch):
    study = load_spec(TUTORIAL)
    assert study.arms == ["llada", "qwen"] and study.model.hidden_size == 448 and study.grid.epochs == [2, 10]


def check_sft_configs(tmp_path, monkeypatch):
    assert set(load_spec(TUTORIAL).sft.base) == {"llada", "qwen"}


def check_import_dllm(tmp_path, monkeypatch):
    from dlmstudy.study.dllm_import import import_dllm

    (tmp_path / "pt.yaml").write_text(yaml.safe_dump({"model_name_or_path": "llada-100M", "max_steps": 10,
                                                      "learning_rate": 3.0e-4, "output_dir": "out"}))
    imported = import_dllm(tmp_path / "pt.yaml")
    assert imported.spec["training"] == {"learning_rate": 3.0e-4} and len(imported.lines) >= 4


def check_launch_configs(tmp_path, monkeypatch):
    assert {p.name for p in (REPO / "dlmstudy" / "configs").glob("*.yaml")} >= {
        "ddp.yaml", "fsdp2.yaml", "zero2.yaml", "multi-npu.yaml"}
    assert parse("run", "--launch_config", "multi-npu").launch_config == "multi-npu"


def check_pretraining_scripts(tmp_path, monkeypatch):
    from dlmstudy.runners.queue import select

    plan = tutorial_plan()
    assert select(plan.runs, ["stage=pretrain"]) == plan.runs and len(plan.runs) == 4
    assert [r.arm.name for r in select(plan.runs, ["arm=llada"])] == ["llada", "llada"]


def check_sft_scripts(tmp_path, monkeypatch):
    from dlmstudy.runners.queue import select

    plan = tutorial_plan()
    assert select(plan.sft_runs, ["stage=sft"]) == plan.sft_runs and not select(plan.runs, ["stage=sft"])


def check_examples(tmp_path, monkeypatch):
    from dlmstudy.runners.run import execute_run
    from dlmstudy.runners.sft import execute_sft_run
    from dlmstudy.training.registry import build_objective
    from dlmstudy.training.trainer import DLMTrainer

    assert execute_run and execute_sft_run and DLMTrainer
    assert {type(build_objective(k, seed=0, **({"mask_id": 3} if k == "mdm" else {}))).__name__
            for k in ("ar", "mdm")} == {"ARObjective", "MDMObjective"}


def check_training_arguments(tmp_path, monkeypatch):
    _, arguments = tiny_run(learning_rate=3.0e-4, warmup_steps=2000, per_device_train_batch_size=2,
                            gradient_accumulation_steps=8)
    assert (arguments["learning_rate"], arguments["warmup_steps"], arguments["per_device_train_batch_size"],
            arguments["gradient_accumulation_steps"]) == (3.0e-4, 2000, 2, 8)


def check_run_length(tmp_path, monkeypatch):
    from dlmstudy.runners.run import optimizer_steps

    run, arguments = tiny_run(per_device_train_batch_size=4)
    assert run.total_tokens == 3 * 2048 and arguments["num_train_epochs"] == 1  # epochs live in the data order
    assert optimizer_steps(arguments, run.total_tokens // 32) == 3 * 2048 // 32 // 4


def check_eval_steps(tmp_path, monkeypatch):
    _, arguments = tiny_run(eval_every=200)
    assert arguments["eval_steps"] == 200 and arguments["eval_strategy"] == "steps"


def check_logging_and_saving(tmp_path, monkeypatch):
    _, arguments = tiny_run(logging_steps=7, save_steps=9, save_total_limit=3)
    assert (arguments["logging_steps"], arguments["save_steps"], arguments["save_total_limit"]) == (7, 9, 3)


def check_run_folders(tmp_path, monkeypatch):
    run, _ = tiny_run()
    assert run.dir == Path("runs") / "tiny" / run.run_id and run.run_id.startswith("llada_u2.05k_r3")


def check_model_name_or_path(tmp_path, monkeypatch):
    study = load_spec(TUTORIAL)
    assert study.arms == ["llada", "qwen"] and (study.model.num_layers, study.model.num_heads) == (6, 7)


def check_sft_base(tmp_path, monkeypatch):
    plan = tutorial_plan()
    assert {r.arm.name: str(r.base) for r in plan.sft_runs} == {"llada": "models/LLaDA-8B-Base",
                                                              "qwen": "models/Qwen2.5-7B"}


def check_lora_keys(tmp_path, monkeypatch):
    sft = spec(sft={"lora": True, "target_modules": "all-linear", "r": 32, "lora_alpha": 64, "lora_dropout": 0.05}).sft
    assert (sft.lora, sft.target_modules, sft.r, sft.lora_alpha, sft.lora_dropout) == (True, "all-linear", 32, 64, 0.05)


def check_sft_source(tmp_path, monkeypatch):
    assert spec(sft={"source": "./alpaca[train:2000,test:200]"}).sft.source == "./alpaca[train:2000,test:200]"


def check_sft_lengths(tmp_path, monkeypatch):
    sft = spec(sft={"max_length": 1024, "load_preprocessed_data": True}).sft
    assert sft.max_length == 1024 and sft.load_preprocessed_data


def check_sft_epochs(tmp_path, monkeypatch):
    assert [r.epochs for r in tutorial_plan().sft_runs] == [3, 3]


def check_sft_arguments(tmp_path, monkeypatch):
    sft = spec(sft={"learning_rate": 3.0e-4, "warmup_ratio": 0.1, "per_device_train_batch_size": 2,
                    "gradient_accumulation_steps": 8}).sft
    assert sft.arguments == {"learning_rate": 3.0e-4, "warmup_steps": 0.1, "per_device_train_batch_size": 2,
                             "gradient_accumulation_steps": 8}


def check_sft_outputs(tmp_path, monkeypatch):
    import inspect

    from dlmstudy.runners import sft

    assert all(r.run_id.startswith(f"sft-{r.arm.name}_e3_") for r in tutorial_plan().sft_runs)
    source = inspect.getsource(sft.execute_sft_run)
    assert 'run.dir / "adapter"' in source and 'run.dir / "checkpoint"' in source


# --- SwanLab --------------------------------------------------------------------------------------------------------

def check_report_to_swanlab(tmp_path, monkeypatch):
    from transformers.integrations import SwanLabCallback, get_reporting_integration_callbacks

    from dlmstudy.study.spec import TrackingSpec

    assert TrackingSpec().report_to == "swanlab"
    assert get_reporting_integration_callbacks(["swanlab"]) == [SwanLabCallback]  # what fit() reports through


def check_swanlab_project(tmp_path, monkeypatch):
    from dlmstudy.study.spec import TrackingSpec
    from dlmstudy.training.tracking import swanlab_settings

    monkeypatch.setenv("SWANLAB_PROJECT", "llada-swanlab")
    monkeypatch.setenv("SWANLAB_MODE", "cloud")
    assert swanlab_settings(TrackingSpec()) == ("llada-swanlab", "online")


def check_swanlab_online(tmp_path, monkeypatch):
    from dlmstudy.study.spec import TrackingSpec
    from dlmstudy.training.tracking import check_tracking

    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not logged in to SwanLab; run `swanlab login`"):
        check_tracking(TrackingSpec(mode="online"))
    check_tracking(TrackingSpec(mode="offline"))


def check_swanlab_resume(tmp_path, monkeypatch):
    from dlmstudy.training.tracking import previous_run_id

    for name in ("run-20260101_000000-first1", "run-20260102_000000-first1"):
        (tmp_path / name).mkdir()
    assert previous_run_id(tmp_path) == "first1" and previous_run_id(tmp_path / "none") is None


def check_report(tmp_path, monkeypatch):
    from dlmstudy.reports.render import build_report

    assert build_report and parse("report", "runs/tutorial").runs_dir == "runs/tutorial"


# --- 4. Testing the models ------------------------------------------------------------------------------------------

def check_merge(tmp_path, monkeypatch):
    a = parse("merge-lora", "--lora_path", "a", "--base_model_path", "b", "--merge_path", "m")
    assert (a.lora_path, a.base_model_path, a.merge_path) == ("a", "b", "m")


def check_chat(tmp_path, monkeypatch):
    a = parse("chat", "--model_name_or_path", "M", "--steps", "128", "--max_length", "128", "--block_length", "32")
    assert (a.steps, a.max_length, a.block_length) == (128, 128, 32)


def check_generate(tmp_path, monkeypatch):
    a = parse("generate", "--model_name_or_path", "M", "--prompt", "一行白鹭上青天的上一句是什么？", "--show_steps")
    assert a.prompt.startswith("一行白鹭") and a.show_steps


def check_block_size(tmp_path, monkeypatch):
    assert parse("chat", "--model_name_or_path", "M", "--block_size", "32").block_length == 32


def check_max_new_tokens(tmp_path, monkeypatch):
    assert parse("chat", "--model_name_or_path", "M", "--max_new_tokens", "256").max_length == 256


def check_lm_eval_cli(tmp_path, monkeypatch):
    from dlmstudy.evaluation import lm_eval_cli

    assert callable(lm_eval_cli.main)
    assert 'dlmstudy-lm-eval = "dlmstudy.evaluation.lm_eval_cli:main"' in (REPO / "pyproject.toml").read_text()


def check_model_llada(tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model

    from dlmstudy.evaluation.lm_eval_models import DiffusionLM

    assert get_model("llada") is DiffusionLM and parse("eval", "--tasks", "t", "--model", "llada").model == "llada"


def check_tutorial_model_args(tmp_path, monkeypatch):
    from dlmstudy.evaluation.lm_eval_models import DiffusionEvalArgs, _model_args, split_model_args

    raw = split_model_args("is_check_greedy=False,mc_num=1,max_length=1024,steps=256,block_size=64,cfg=0.0")
    args = _model_args(raw, DiffusionEvalArgs, "llada")
    assert (args.check_greedy, args.mc_num, args.max_length, args.steps, args.block_length, args.cfg_scale) == (
        False, 1, 1024, 256, 64, 0.0)


def check_max_batch_size(tmp_path, monkeypatch):
    from dlmstudy.evaluation.harness import _merge_batch
    from dlmstudy.evaluation.lm_eval_models import _batch_size

    assert parse("eval", "--tasks", "t", "--max_batch_size", "4").max_batch_size == 4
    assert _batch_size(_merge_batch({}, None, 4), 32)["batch_size"] == 4


def check_hub_tasks_online(tmp_path, monkeypatch):
    from dlmstudy.evaluation import hub

    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert hub.offline_reason(False) is None and parse("eval", "--tasks", "cmmlu", "--offline").offline


def check_lm_eval_flags(tmp_path, monkeypatch):
    a = parse("eval", "--tasks", "t", "--num_fewshot", "5", "--gen_kwargs", "temperature=0", "--limit", "10")
    assert (a.num_fewshot, a.gen_kwargs, a.limit) == (5, "temperature=0", 10.0)


def check_output_flags(tmp_path, monkeypatch):
    a = parse("eval", "--tasks", "t", "--apply_chat_template", "--output_path", "DIR", "--log_samples")
    assert a.apply_chat_template and a.output_path == "DIR" and a.log_samples


def check_measured_8b(tmp_path, monkeypatch):
    """The 8B table's peak memory, tokens/s and MFU are those of the H200 record it cites."""
    records = json.loads((REPO / "docs" / "bench" / "h200-2026-12-04-lora-sft-8b.json").read_text())
    table = [line.strip().strip("|").split(" | ") for line in GUIDE.read_text().splitlines()
             if line.startswith(("| LLaDA-8B |", "| Qwen2.5-7B |"))]
    assert len(table) == 2
    for cells in table:
        config = {"LLaDA-8B": "llada-8b", "Qwen2.5-7B": "qwen2.5-7b"}[cells[0].strip()]
        off, on = (next(r for r in records if r["config"] == config and r["gradient_checkpointing"] == gc)
                   for gc in (False, True))
        assert cells[2].strip() == f"{off['peak_memory_gb']:.1f} / {on['peak_memory_gb']:.1f}"
        assert cells[3].strip() == f"{off['tokens_per_s']:,.0f} / {on['tokens_per_s']:,.0f}"
        assert cells[4].strip() == f"{100 * off['mfu']:.1f}% / {100 * on['mfu']:.1f}%"


CHECKS = {
    "pip install -r requirements.txt": check_install,
    "pip install torch==2.9.0": check_torch_npu_wheel,
    "`import torch_npu` in the code": check_import_torch_npu,
    "ASCEND_RT_VISIBLE_DEVICES=0": check_visible_devices,
    "c4-en-shuffled": check_dataset_args,
    "`text_field: text`": check_text_field,
    "`streaming: false`": check_streaming,
    "`num_proc: 8`": check_num_proc,
    "`drop_tail: true`": check_drop_tail,
    "`max_length: 1024`": check_max_length,
    "`insert_eos: true`": check_insert_eos,
    "`load_preprocessed_data: true`": check_load_preprocessed_pretraining,
    "`random_length_ratio: 0.01`": check_random_length_ratio,
    "`configs/llada-100M-pt-npu.yaml`, `configs/qwen2.5-100M-pt-npu.yaml`": check_pretraining_configs,
    "`configs/llada-8b-sft-npu.yaml`": check_sft_configs,
    "one of those YAMLs as it is": check_import_dllm,
    "`configs/ddp.yaml`": check_launch_configs,
    "train-llada-pt-multinpu.sh": check_pretraining_scripts,
    "train-llada-sft-multinpu.sh": check_sft_scripts,
    "`examples/llada/pt.py`": check_examples,
    "`learning_rate: 3.0e-4`, `warmup_steps: 2000`": check_training_arguments,
    "`max_steps: 10` / `num_train_epochs`": check_run_length,
    "`eval_strategy: steps`, `eval_steps: 200`": check_eval_steps,
    "`logging_steps`, `save_steps`, `save_total_limit`": check_logging_and_saving,
    "`output_dir`, `run_name`": check_run_folders,
    "`model_name_or_path: .../llada-100M`": check_model_name_or_path,
    "`model_name_or_path: .../llada-8b`": check_sft_base,
    "`lora: true`": check_lora_keys,
    "alpaca-zh-gpt": check_sft_source,
    "`max_length: 1024`, `load_preprocessed_data`": check_sft_lengths,
    "`num_train_epochs` (\"2-3 epochs\")": check_sft_epochs,
    "`learning_rate`, `warmup_ratio`": check_sft_arguments,
    "`output_dir/checkpoint-final`": check_sft_outputs,
    "`report_to: swanlab`": check_report_to_swanlab,
    "(`SWANLAB_PROJECT`)": check_swanlab_project,
    "logged in, online": check_swanlab_online,
    "training resumed from a checkpoint": check_swanlab_resume,
    "comparing curves in the SwanLab UI": check_report,
    "examples/llada/merge.py": check_merge,
    "examples/llada/chat.py": check_chat,
    "examples/llada/generate.py": check_generate,
    "`block_size`, dllm's name": check_block_size,
    "examples/qwen/chat.py": check_max_new_tokens,
    "dllm/pipelines/llada/eval.py ARGS": check_lm_eval_cli,
    "`--model llada`": check_model_llada,
    "`--model_args \"pretrained=": check_tutorial_model_args,
    "`--max_batch_size 4`": check_max_batch_size,
    "`--tasks cmmlu`": check_hub_tasks_online,
    "`--num_fewshot`, `--gen_kwargs`, `--limit`": check_lm_eval_flags,
    "`--apply_chat_template --output_path DIR --log_samples`": check_output_flags,
    "LLaDA-8B": check_measured_8b,
    "Qwen2.5-7B": check_measured_8b,
}


def check_of(row: str):
    """The one check whose key the row contains (the longest key, so `max_length: 1024` and its SFT row differ)."""
    keys = [k for k in CHECKS if k in row]
    return CHECKS[max(keys, key=len)] if keys else None


def test_every_row_has_exactly_one_check_and_every_check_a_row():
    found = {row: check_of(row) for row in rows()}
    assert [row for row, check in found.items() if check is None] == []
    assert len(found) == len(rows())  # no row twice
    assert set(CHECKS.values()) == set(found.values())


@pytest.mark.parametrize("row", rows(), ids=lambda r: re.sub(r"\W+", "-", r)[:40].strip("-"))
def test_row(row, tmp_path, monkeypatch):
    check = check_of(row)
    assert check is not None, f"no check for the row {row!r}: add one to CHECKS"
    monkeypatch.chdir(tmp_path)
    check(tmp_path, monkeypatch)
