"""Checkpoints and resume: a run killed with SIGKILL continues from its last complete checkpoint and
ends with the same losses and weights as an uninterrupted run; partial checkpoints are never used.

Run as a script (`python tests/test_resume.py OUT PACE`), this file trains the tiny run in OUT,
sleeping PACE seconds after each step so the test can kill it mid-training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainingArguments

from dlmstudy.data.packing import PackedDataset, epoch_order
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
from dlmstudy.training.objectives import MDMObjective
from dlmstudy.training.tracking import SCALARS_FILE, ScalarMirror, read_scalars
from dlmstudy.training.trainer import COMPLETE_MARK, CompleteMarker, DLMTrainer, last_complete_checkpoint

TOKENS = SpecialTokens(vocab_size=64, pad_token_id=0, eos_token_id=1, mask_token_id=2)
L, BATCH, SAVE_STEPS, STEPS = 16, 4, 4, 32  # 32 sequences seen 4 times in batches of 4: 32 optimizer steps


class Pace(TrainerCallback):
    """Sleep after every step (only so the test can kill the run part-way; values are unaffected)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def train_tiny(out: Path, *, pace: float = 0.0) -> DLMTrainer:
    """Train (or resume) the tiny diffusion run in `out`: fixed data order, seeded noise, checkpoints every 4 steps."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in this process and in the subprocess
    try:
        config = build_config("llada", ModelSize(hidden_size=32, num_layers=2, num_heads=4), TOKENS, causal=False)
        model = build_model(config, seed=0)
        chunks = np.random.default_rng(0).integers(3, TOKENS.vocab_size, size=(32, L))
        train_set = PackedDataset(chunks, epoch_order(len(chunks), 4, seed=0))
        objective = MDMObjective(mask_id=TOKENS.mask_token_id, random_length_ratio=0.25, seed=0)
        val_batch = {"input_ids": torch.from_numpy(chunks[:8]), "index": torch.arange(8)}

        def validation(m):
            with torch.no_grad():
                return {"val_loss": float(objective(m, val_batch)[0])}

        args = TrainingArguments(
            output_dir=str(out / "checkpoints"), per_device_train_batch_size=BATCH, learning_rate=3e-3,
            lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=1, save_strategy="steps",
            save_steps=SAVE_STEPS, save_total_limit=2, eval_strategy="steps", eval_steps=6, report_to="none",
            seed=0, remove_unused_columns=False, dataloader_num_workers=0, num_train_epochs=1, use_cpu=True,
            disable_tqdm=True)
        callbacks = [ScalarMirror(out / SCALARS_FILE), CompleteMarker()] + ([Pace(pace)] if pace else [])
        trainer = DLMTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=train_set,
                             objective=objective, tokens_per_step=BATCH * L, validation_fn=validation,
                             callbacks=callbacks)
        resume = last_complete_checkpoint(out / "checkpoints")
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return trainer
    finally:
        torch.set_num_threads(threads)


def step_rows(out: Path, key: str) -> dict[int, dict[str, float]]:
    """Mirrored rows that carry `key`, by step."""
    return {int(r["step"]): r for r in read_scalars(out) if key in r}


def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, __file__, str(killed), "0.15"], stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        first_mark = killed / "checkpoints" / f"checkpoint-{SAVE_STEPS}" / COMPLETE_MARK
        past_it = f'{{"step": {SAVE_STEPS + 2}, "loss"'  # two steps logged after the first complete checkpoint
        deadline = time.time() + 180
        while not (first_mark.exists() and past_it in (killed / SCALARS_FILE).read_text()):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.time() < deadline, "the killed run got no further than its first checkpoint"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    kill_rows = step_rows(killed, "loss")
    resume = last_complete_checkpoint(killed / "checkpoints")
    resume_step = int(resume.name.split("-")[1])
    assert SAVE_STEPS <= resume_step < STEPS
    assert max(kill_rows) > resume_step, "the kill should land between checkpoints"

    reference = train_tiny(tmp_path / "reference")
    resumed = train_tiny(killed)

    ref_rows, res_rows = step_rows(tmp_path / "reference", "loss"), step_rows(killed, "loss")
    assert sorted(res_rows) == list(range(1, STEPS + 1))  # one row per step: no gaps, no duplicates
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "learning_rate", "masked_fraction", "epoch", "tokens_seen"):
            assert res_rows[step][key] == ref_rows[step][key], (step, key)
    assert res_rows[STEPS]["loss"] == ref_rows[STEPS]["loss"]
    assert step_rows(killed, "val_loss") == step_rows(tmp_path / "reference", "val_loss")
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # save_total_limit=2: only the two newest checkpoints survive, both complete
    kept = sorted((killed / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in kept] == [f"checkpoint-{STEPS - SAVE_STEPS}", f"checkpoint-{STEPS}"]
    assert all((p / COMPLETE_MARK).exists() for p in kept)


def test_partial_checkpoint_is_never_taken_for_complete(tmp_path):
    folder = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False), (3, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, folder / f"checkpoint-{step}" / "model.safetensors")
        if complete:
            (folder / f"checkpoint-{step}" / COMPLETE_MARK).touch()
    (folder / "checkpoint-final").mkdir()
    assert last_complete_checkpoint(folder) == folder / "checkpoint-8"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "checkpoint-8", "checkpoint-final"]
    assert last_complete_checkpoint(tmp_path / "missing") is None
    (folder / "checkpoint-4" / COMPLETE_MARK).unlink()
    (folder / "checkpoint-8" / COMPLETE_MARK).unlink()
    assert last_complete_checkpoint(folder) is None
    assert not (folder / "checkpoint-8").exists()


def cut_short(path: Path) -> None:
    """Truncate a file to half its size, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_damaged_checkpoint_falls_back_to_the_complete_one_before_it(tmp_path, damaged):
    """A checkpoint marked complete whose file was cut short later is set aside; the run resumes from the one
    before it and ends with the weights of a run never damaged."""
    out = tmp_path / "run"
    final = {k: v.clone() for k, v in train_tiny(out).model.state_dict().items()}
    newest = out / "checkpoints" / f"checkpoint-{STEPS}"
    cut_short(newest / damaged)
    said = []
    before = out / "checkpoints" / f"checkpoint-{STEPS - SAVE_STEPS}"
    assert last_complete_checkpoint(out / "checkpoints", said.append) == before
    assert len(said) == 1 and damaged in said[0] and "set aside" in said[0]
    (aside,) = (out / "damaged").iterdir()
    assert aside.name.startswith(f"checkpoint-{STEPS}.damaged-") and not newest.exists()
    resumed = train_tiny(out)
    for name, weight in resumed.model.state_dict().items():
        assert torch.equal(weight, final[name]), name


if __name__ == "__main__":
    train_tiny(Path(sys.argv[1]), pace=float(sys.argv[2]))
