"""Multi-process training: 2 CPU processes (gloo, launched through the shipped ddp config) reproduce a
single process with the same global batch: the same rows per step, the same losses, the same weights,
for the AR and the MDM objective.

Run as a script, this file is the worker: `python tests/test_distributed.py --out DIR --batch B`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dlmstudy.runners.launch import config_path, launch_command, relaunch, strip_launch_options

STEPS, SEQ_LEN, GLOBAL_BATCH = 3, 16, 8


def train(out: Path, per_device_batch: int, accumulation: int = 1, swap_rows: tuple[int, int] | None = None) -> None:
    """Train tiny AR and MDM models for STEPS steps; rank r writes rows, losses and (rank 0) final weights to `out`.

    `accumulation` micro-batches make each optimizer step; `swap_rows` exchanges the sequences at two positions of
    the order (their positions, hence their diffusion noise, stay)."""
    from transformers import TrainingArguments

    from dlmstudy.data.packing import PackedDataset, epoch_order
    from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
    from dlmstudy.training.objectives import ARObjective, MDMObjective
    from dlmstudy.training.trainer import DLMTrainer

    chunks = np.random.default_rng(0).integers(3, 64, size=(STEPS * GLOBAL_BATCH, SEQ_LEN))
    order = epoch_order(len(chunks), 1, seed=0)
    if swap_rows is not None:
        order[list(swap_rows)] = order[list(reversed(swap_rows))]
    dataset = PackedDataset(chunks, order)
    tokens = SpecialTokens(vocab_size=64, pad_token_id=0, eos_token_id=1, mask_token_id=2)
    # the random-length cut (1% of batches) is decided per device batch, so it is off here (see docs/devices.md)
    objectives = {"ar": ARObjective(), "mdm": MDMObjective(mask_id=2, random_length_ratio=0.0)}
    for name, objective in objectives.items():
        torch.manual_seed(0)
        size = ModelSize(hidden_size=32, num_layers=2, num_heads=4)
        config = build_config("llada", size, tokens, causal=name == "ar")
        model = build_model(config, seed=0)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen: list[dict] = []

        def recording_objective(m, batch, objective=objective, seen=seen):
            loss, metrics = objective(m, batch)
            seen.append({"rows": torch.as_tensor(batch["index"]).tolist(), "loss": loss.item()})
            return loss, metrics

        args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=per_device_batch,
                                 gradient_accumulation_steps=accumulation, max_steps=STEPS, learning_rate=1e-2,
                                 lr_scheduler_type="constant", logging_steps=1,
                                 save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
                                 dataloader_num_workers=0, seed=0, disable_tqdm=True)
        trainer = DLMTrainer(model=model, args=args, train_dataset=dataset, objective=recording_objective,
                             tokens_per_step=per_device_batch * accumulation * args.world_size * SEQ_LEN)
        trainer.train()
        rank = args.process_index
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        final = trainer.model.state_dict()
        moved = max(float((v - initial[k]).abs().max()) for k, v in final.items())
        (out / f"{name}-rank{rank}.json").write_text(json.dumps({"world_size": args.world_size, "steps": seen,
                                                                 "logged": logged, "moved": moved}))
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in final.items()}, out / f"{name}-weights.pt")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two, one, accumulated, off_by_one = (tmp_path / n for n in ("two", "one", "accumulated", "off_by_one"))
    for folder in (two, one, accumulated, off_by_one):
        folder.mkdir()
    worker = [__file__, "--out", str(two), "--batch", str(GLOBAL_BATCH // 2)]
    cmd = launch_command(worker, num_processes=2, device="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train(one, GLOBAL_BATCH)
    train(accumulated, GLOBAL_BATCH // 2, accumulation=2)
    train(off_by_one, GLOBAL_BATCH, swap_rows=(GLOBAL_BATCH - 1, GLOBAL_BATCH))  # a split one row off

    for name in ("ar", "mdm"):
        ranks = [json.loads((two / f"{name}-rank{r}.json").read_text()) for r in range(2)]
        single = json.loads((one / f"{name}-rank0.json").read_text())
        assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
        for step in range(STEPS):
            rows0, rows1 = ranks[0]["steps"][step]["rows"], ranks[1]["steps"][step]["rows"]
            # accelerate shards a sequential sampler by whole per-device batches: rank r takes the r-th slice
            # of each global batch, so the two ranks together see exactly the single process's rows
            assert rows0 == list(range(step * 8, step * 8 + 4)) and rows1 == list(range(step * 8 + 4, step * 8 + 8))
            assert sorted(rows0 + rows1) == single["steps"][step]["rows"]
            # both losses are sums over rows divided by B L: the global loss is the mean of the ranks' losses
            # (for MDM this holds because each row's noise depends on its index only, not on the batch)
            pair = (ranks[0]["steps"][step]["loss"] + ranks[1]["steps"][step]["loss"]) / 2
            assert pair == pytest.approx(single["steps"][step]["loss"], rel=1e-5, abs=1e-6), name
        # the Trainer logs the loss averaged over processes: the user sees the same curve
        assert ranks[0]["logged"] == pytest.approx(single["logged"], rel=1e-5, abs=1e-6), name
        assert single["moved"] > 1e-3  # the optimizer really changed the weights
        w2, w1, wa, wx = (torch.load(f / f"{name}-weights.pt") for f in (two, one, accumulated, off_by_one))
        # Each rank's gradient is the one a micro-batch of its 4 rows gives; DDP averages the two (g0 + g1) / 2, as
        # accumulating the two micro-batches in one process does (g0 / 2 + g1 / 2: halving is exact in floating
        # point): the same arithmetic, so the same weights up to a few units in the last place, on any machine.
        ulp = torch.finfo(torch.float32).eps * max(float(w.abs().max()) for w in w1.values())
        assert max_difference(w2, wa) <= 4 * ulp, name
        # One process with all 8 rows in one batch sums each gradient in another order: its weights differ from
        # the accumulated run's by that rounding alone (measured 1.8e-5 after Adam's normalisation, varying with
        # the machine). The two processes are no further from it than that rounding.
        rounding = max_difference(wa, w1)
        assert max_difference(w2, w1) <= rounding + 4 * ulp, name
        # A batch split one row off moves the weights far more than rounding does: the comparison has power.
        assert max_difference(wx, w1) > 100 * max(rounding, 4 * ulp), name


def test_launch_command_uses_the_shipped_config_and_strips_launcher_options():
    cmd = launch_command(["-m", "dlmstudy.cli", "run", "s.yaml"], num_processes=4, device="npu")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(config_path("multi-npu"))
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-4:] == ["-m", "dlmstudy.cli", "run", "s.yaml"]
    fsdp = launch_command(["x.py"], num_processes=2, config="fsdp2", device="cuda")
    assert fsdp[fsdp.index("--config_file") + 1] == str(config_path("fsdp2"))
    assert strip_launch_options(["run", "s.yaml", "--num_processes", "2", "--launch_config=fsdp2", "--device", "cpu"]) \
        == ["run", "s.yaml", "--device", "cpu"]


def test_shipped_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(config_path(name))) for name in ("ddp", "fsdp2", "zero2", "multi-npu")}
    assert {n: c.distributed_type.value for n, c in kinds.items()} == {
        "ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "multi-npu": "MULTI_NPU"}
    assert kinds["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert kinds["zero2"].deepspeed_config["zero_stage"] == 2
    # precision is the study's choice (TrainingArguments bf16), never forced by a launch config
    assert {c.mixed_precision for c in kinds.values()} == {"no"}


def test_launch_errors_are_one_line_user_errors(tmp_path, monkeypatch):
    from dlmstudy.errors import UserError

    with pytest.raises(UserError, match="launch config 'nope'"):
        config_path("nope")
    with pytest.raises(UserError, match="at least 1"):
        launch_command(["x.py"], num_processes=0)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "deepspeed" else object())
    with pytest.raises(UserError, match=r"dlmstudy\[deepspeed\]"):
        relaunch(["run"], num_processes=2, config="zero2")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, required=True)
    a = parser.parse_args()
    train(a.out, a.batch)


@pytest.mark.slow
def test_dlmstudy_run_on_two_processes_matches_one_process(tmp_path):
    """`dlmstudy run --num_processes 2` (gloo, 8 rows a process) ends where one process with 16 rows ends."""
    import yaml

    from tests.test_study import TINY

    losses = {}
    for procs, batch in ((1, 16), (2, 8)):
        folder = tmp_path / f"p{procs}"
        folder.mkdir()
        raw = {**TINY, "name": "ddp", "arms": ["qwen"], "grid": {"unique_people": [20], "total_tokens": 4096},
               "evaluation": {**TINY["evaluation"], "qa_people": 0, "lm_eval": {"tasks": []}},
               "training": {**TINY["training"], "per_device_train_batch_size": batch}}
        (folder / "spec.yaml").write_text(yaml.safe_dump(raw))
        cmd = [sys.executable, "-m", "dlmstudy.cli", "run", "spec.yaml", "--device", "cpu", "--num_processes", str(procs)]
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (result,) = [json.loads(p.read_text()) for p in (folder / "runs" / "ddp").glob("*/result.json")]
        assert result["tokens_per_step"] == 16 * 32
        losses[procs] = result["final_val_loss"]
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)
