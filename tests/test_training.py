"""The shared trainer: LoRA SFT and merge, determinism, gradient accumulation, schedules, optimizer, tracking."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerState, TrainingArguments

from dlmstudy.data.packing import PackedDataset, epoch_order
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
from dlmstudy.models.checkpoints import META_FILE, load_checkpoint, save_checkpoint
from dlmstudy.models.registry import get_arm
from dlmstudy.study.spec import TrackingSpec
from dlmstudy.training.clipping import clip_in_step
from dlmstudy.training.heads import compile_body
from dlmstudy.training.lora import LoraSettings, apply_lora
from dlmstudy.training.merge import merge_lora
from dlmstudy.training.objectives import ARObjective, MDMObjective
from dlmstudy.training.tracking import SCALARS_FILE, ScalarMirror, finish_tracking, read_scalars, start_swanlab
from dlmstudy.training.trainer import DLMTrainer

TOKENS = SpecialTokens(vocab_size=64, pad_token_id=0, eos_token_id=1, mask_token_id=2)
TINY = ModelSize(hidden_size=32, num_layers=2, num_heads=4)
L = 16




def tiny_model(objective: str):
    return build_model(build_config("llada", TINY, TOKENS, causal=objective == "ar"), seed=0)


def arguments(out: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out / "checkpoints"), per_device_train_batch_size=4, learning_rate=3e-3,
                    lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=1, save_strategy="no",
                    report_to="none", seed=0, remove_unused_columns=False, dataloader_num_workers=0,
                    num_train_epochs=1, use_cpu=True, disable_tqdm=True)
    settings.update(overrides)
    return TrainingArguments(**settings)


def pretrain(out: Path, objective, *, n: int = 16, epochs: float = 2, validation: bool = False,
             cuda_graphs: bool = False, **overrides) -> DLMTrainer:
    """Train a tiny model on random tokens in the run's fixed order; scalars go to out/scalars.jsonl."""
    kind = "mdm" if isinstance(objective, MDMObjective) else "ar"
    model = tiny_model(kind)
    chunks = np.random.default_rng(0).integers(3, TOKENS.vocab_size, size=(n, L))
    train_set = PackedDataset(chunks, epoch_order(n, epochs, seed=0))
    val_batch = {"input_ids": torch.from_numpy(chunks[:4]), "index": torch.arange(4)}

    def validation_fn(m):
        with torch.no_grad():
            return {"val_loss": float(objective(m, val_batch)[0])}

    args = arguments(out, **({"eval_strategy": "steps", "eval_steps": 4} if validation else {}), **overrides)
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    trainer = DLMTrainer(model=model, args=args, train_dataset=train_set,
                         eval_dataset=train_set if validation else None, objective=objective, tokens_per_step=batch * L,
                         validation_fn=validation_fn if validation else None, cuda_graphs=cuda_graphs,
                         callbacks=[ScalarMirror(out / SCALARS_FILE)])
    trainer.train()
    return trainer


def loss_rows(out: Path) -> list[dict[str, float]]:
    return [r for r in read_scalars(out) if "loss" in r]


# --- LoRA SFT and merge ------------------------------------------------------------------------------------------


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A 64-word tokenizer (t0 … t63) whose ids match the tiny model's vocabulary."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TOKENS.vocab_size)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", mask_token="t2")


def sft_rows(n: int) -> list[dict[str, torch.Tensor]]:
    """SFT rows built by hand: prompt, answer, EOS padding to L (trained on, as LLaDA does)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        prompt_len, answer_len = 3 + i % 4, 4 + i % 3
        ids = torch.full((L,), TOKENS.eos_token_id)
        ids[: prompt_len + answer_len] = torch.randint(3, TOKENS.vocab_size, (prompt_len + answer_len,), generator=g)
        rows.append({"input_ids": ids, "loss_mask": (torch.arange(L) >= prompt_len).long(), "index": torch.tensor(i)})
    return rows


def test_lora_sft_then_merge_gives_the_adapter_model_logits_without_peft(tmp_path, monkeypatch):
    base = tiny_model("mdm")
    save_checkpoint(tmp_path / "base", base, word_tokenizer(), get_arm("llada-mdm"))
    probe = torch.randint(3, TOKENS.vocab_size, (2, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(probe).logits

    model = apply_lora(base, r=4, lora_alpha=8, lora_dropout=0.05)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    trainer = DLMTrainer(model=model, args=arguments(tmp_path, learning_rate=1e-2, max_steps=6),
                         train_dataset=sft_rows(12), objective=MDMObjective(mask_id=TOKENS.mask_token_id),
                         tokens_per_step=4 * L)
    trainer.train()
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=probe).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapters learned something

    merged = merge_lora(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists()
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    assert (merged / META_FILE).read_text() == (tmp_path / "base" / META_FILE).read_text()
    monkeypatch.setitem(sys.modules, "peft", None)  # any `import peft` while loading would fail
    loaded, tokenizer, arm = load_checkpoint(merged)
    assert arm.name == "llada-mdm" and tokenizer.mask_token_id == TOKENS.mask_token_id
    assert loaded.config.is_causal is False
    with torch.no_grad():
        merged_logits = loaded(probe).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)


def test_merge_refuses_bad_paths(tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(UserError, match="not a LoRA adapter"):
        merge_lora(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        merge_lora(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    with pytest.raises(UserError, match="must differ"):
        merge_lora(tmp_path / "adapter", tmp_path / "base", tmp_path / "base")


def test_lora_settings_are_checked():
    assert LoraSettings() == LoraSettings(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear")
    for bad in ({"r": 0}, {"lora_alpha": 0}, {"lora_dropout": 1.0}, {"target_modules": ()}):
        with pytest.raises(UserError):
            LoraSettings(**bad)


# --- Determinism, gradient accumulation, schedule, optimizer ------------------------------------------------------


def test_same_seed_same_losses_and_every_scalar_logged(tmp_path):
    objective = MDMObjective(mask_id=TOKENS.mask_token_id, random_length_ratio=0.2, seed=0)
    pretrain(tmp_path / "a", objective, validation=True)
    torch.manual_seed(99)  # the global RNG state before a run does not matter
    pretrain(tmp_path / "b", objective, validation=True)
    pretrain(tmp_path / "c", MDMObjective(mask_id=TOKENS.mask_token_id, random_length_ratio=0.2, seed=1))
    a, b, c = (loss_rows(tmp_path / x) for x in "abc")
    assert len(a) == 8
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["loss"] for r in a] != [r["loss"] for r in c]  # another noise seed, other losses
    logged = set().union(*(r.keys() for r in read_scalars(tmp_path / "a")))
    assert {"loss", "learning_rate", "grad_norm", "tokens_seen", "epoch", "tokens_per_s", "masked_fraction",
            "val_loss"} <= logged
    assert [r["tokens_seen"] for r in a] == [4 * L * s for s in range(1, 9)]
    assert all(0 < r["masked_fraction"] < 1 for r in a)
    val = [r for r in read_scalars(tmp_path / "a") if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8]


@pytest.mark.parametrize("kind", ["ar", "mdm"])
def test_gradient_accumulation_matches_the_larger_batch(tmp_path, kind):
    """GA 2 x batch 4 gives the losses, grad norms and weights of GA 1 x batch 8 (per-row noise, mean losses)."""
    objective = ARObjective() if kind == "ar" else MDMObjective(mask_id=TOKENS.mask_token_id, random_length_ratio=0.0)
    big = pretrain(tmp_path / "big", objective, per_device_train_batch_size=8)
    acc = pretrain(tmp_path / "acc", objective, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    big_rows, acc_rows = loss_rows(tmp_path / "big"), loss_rows(tmp_path / "acc")
    assert len(big_rows) == len(acc_rows) == 4
    for r, s in zip(big_rows, acc_rows):
        for key in ("loss", "grad_norm", "learning_rate", "tokens_seen"):
            assert s[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), key
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_ratio_then_decay(tmp_path, schedule):
    """warmup_steps 0.25 (a ratio, as transformers 5 reads a float < 1) of 8 steps: 2 warmup steps, then decay."""
    pretrain(tmp_path, ARObjective(), lr_scheduler_type=schedule, warmup_steps=0.25, learning_rate=1e-2)
    lrs = [r["learning_rate"] for r in loss_rows(tmp_path)]  # the rate each optimizer step used
    total, warmup = 8, 2

    def expected(s: int) -> float:
        if s < warmup:
            return s / warmup
        progress = (s - warmup) / (total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress

    assert lrs == pytest.approx([1e-2 * expected(s) for s in range(total)], abs=1e-9)


def test_default_optimizer_is_fused_adamw(tmp_path):
    """transformers 5 defaults `optim` to adamw_torch_fused when torch >= 2.8, on every device."""
    trainer = DLMTrainer(model=tiny_model("ar"), args=arguments(tmp_path), train_dataset=[], objective=ARObjective(),
                         tokens_per_step=1)
    assert trainer.args.optim == "adamw_torch_fused"
    assert trainer.create_optimizer().defaults["fused"] is True


def test_clipping_inside_the_fused_step_trains_as_the_trainers_own_clipping(tmp_path, monkeypatch):
    """The fused AdamW clips inside its step (clipping.py); unfused AdamW through the Trainer's clip_grad_norm_:
    same losses, logged grad norms and weights."""
    import dlmstudy.training.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "clip_in_step", lambda *a: calls.append(1) or clip_in_step(*a))
    kw = {"max_grad_norm": 0.05, "learning_rate": 1e-2, "adam_epsilon": 1e-3}  # eps: Adam's update feels the clipping
    fused = pretrain(tmp_path / "fused", ARObjective(), optim="adamw_torch_fused", **kw)
    assert len(calls) == 8
    plain = pretrain(tmp_path / "plain", ARObjective(), optim="adamw_torch", **kw)
    free = pretrain(tmp_path / "free", ARObjective(), optim="adamw_torch_fused", **{**kw, "max_grad_norm": 0})
    rows, ref = loss_rows(tmp_path / "fused"), loss_rows(tmp_path / "plain")
    for r, s in zip(ref, rows):
        for key in ("loss", "grad_norm"):
            assert s[key] == pytest.approx(r[key], rel=1e-5), key
    for (name, p), q, u in zip(plain.model.named_parameters(), fused.model.parameters(), free.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.allclose(u, p, rtol=1e-3) for p, u in zip(plain.model.parameters(), free.model.parameters()))


@pytest.mark.parametrize("kind", ["ar", "mdm"])
def test_fast_head_inside_the_trainer_runs_in_the_mixed_precision_dtype(tmp_path, kind, monkeypatch):
    """With bf16 on, the fast head's matmuls run in bf16 as the plain head's do (accelerate autocasts only
    model.forward; a loss that runs the head itself must be autocast too), and the losses agree."""
    from dlmstudy.training import heads
    dtypes, chunked = [], heads._chunked
    monkeypatch.setattr(heads, "_chunked", lambda *a, dtype, **k: dtypes.append(dtype) or chunked(*a, dtype=dtype, **k))
    fast, plain = ((heads.FastARObjective(chunk=8), ARObjective()) if kind == "ar" else
                   (heads.FastMDMObjective(mask_id=TOKENS.mask_token_id, chunk=8),
                    MDMObjective(mask_id=TOKENS.mask_token_id)))
    pretrain(tmp_path / "fast", fast, n=8, epochs=1, bf16=True)
    pretrain(tmp_path / "plain", plain, n=8, epochs=1, bf16=True)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    for f, p in zip(loss_rows(tmp_path / "fast"), loss_rows(tmp_path / "plain")):
        assert f["loss"] == pytest.approx(p["loss"], rel=2e-2)


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_graphed_training_marks_each_step_and_validation(tmp_path, monkeypatch, graphs):
    """With CUDA-graphed layers every training step and validation pass starts a new graph step (so the graphs may
    overwrite the last step's outputs); without them the Trainer never calls into the graph machinery."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = pretrain(tmp_path, ARObjective(), n=16, epochs=1, validation=True, cuda_graphs=graphs)
    steps = trainer.state.global_step
    validations = sum("val_loss" in r for r in read_scalars(tmp_path))
    assert steps == 4 and validations == 1
    assert len(marks) == (steps + validations if graphs else 0)


def test_the_trained_model_computes_in_its_own_dtype_after_mixed_precision_training(tmp_path, monkeypatch):
    """bf16 training wraps model.forward in autocast, and `training.compile` compiles the decoder; what the study
    evaluates must compute as the reloaded checkpoint does (fp32 weights, fp32 compute, eager)."""
    trainer = pretrain(tmp_path, ARObjective(), n=8, epochs=1, bf16=True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # compile_body's bookkeeping without compiling
    decoder = trainer.model.get_decoder()
    compile_body(trainer.model)
    assert "forward" in decoder.__dict__
    x = torch.randint(3, TOKENS.vocab_size, (2, 8))
    reloaded = tiny_model("ar")
    reloaded.load_state_dict(trainer.model.state_dict())
    with torch.no_grad():
        expected = reloaded(x).logits
        assert not torch.equal(trainer.model(x).logits, expected)  # the wrapper computes in bf16
        assert torch.equal(trainer.final_model()(x).logits, expected)
    assert "forward" not in decoder.__dict__


def test_the_objective_gets_each_batchs_index_on_the_host(tmp_path):
    """The noise is seeded from the rows' indices on the host: the Trainer must not move them to the device (on a
    GPU that would cost a device sync per step), and the rows come in the run's order."""
    seen = []
    objective = MDMObjective(mask_id=TOKENS.mask_token_id)

    def recording(model, batch):
        seen.append(batch["index"])
        return objective(model, batch)

    trainer = pretrain(tmp_path, objective, n=8, epochs=1)
    trainer.objective = recording
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    assert seen == [list(range(trainer.args.per_device_train_batch_size))]


# --- Tracking -----------------------------------------------------------------------------------------------------


def test_mirror_drops_rows_newer_than_the_resume_step(tmp_path):
    path = tmp_path / SCALARS_FILE
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)] + [{"step": 6, "val_loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mirror = ScalarMirror(path)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    mirror.on_train_begin(args, TrainerState(global_step=6), None)
    kept = [(r["step"], "val_loss" in r) for r in read_scalars(tmp_path)]
    assert kept == [(s, False) for s in range(1, 7)] + [(6, True)]
    mirror.on_log(args, TrainerState(global_step=7), None, logs={"loss": 0.25, "note": "text is skipped"})
    assert read_scalars(tmp_path)[-1] == {"step": 7, "loss": 0.25}


def test_swanlab_offline_writes_its_files_without_login(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / "save"))
    monkeypatch.setenv("SWANLAB_PROJECT", "breaks-init")  # start_swanlab must clear it
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    start_swanlab(TrackingSpec(project="tiny"), name="run-0", logdir=tmp_path / "swanlog",
                  config={"seed": 0, "arm": "llada-mdm"})
    try:
        mirror = ScalarMirror(tmp_path / SCALARS_FILE)
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        for step in (1, 2):
            mirror.on_log(args, TrainerState(global_step=step), None, logs={"loss": 1.0 / step, "learning_rate": 1e-3})
    finally:
        finish_tracking()
    [folder] = (tmp_path / "swanlog").glob("run-*")
    assert list(folder.glob("run-*.swanlab")) and (folder / "files" / "config.yaml").exists()
    assert "llada-mdm" in (folder / "files" / "config.yaml").read_text()
    assert [r["step"] for r in read_scalars(tmp_path)] == [1, 2]
