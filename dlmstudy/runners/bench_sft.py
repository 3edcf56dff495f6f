"""`dlmstudy bench --measure sft`: LoRA SFT at the tutorial's settings, with peak memory, tokens/s and MFU.

One timed step is one micro-batch of the SFT Trainer's loop: the arm's SFT objective with the fast head
(`FastMDMObjective` on masked answer tokens, `FastARObjective` on answer tokens), bf16 autocast on
accelerators, backward, and every `accumulation` micro-batches gradient clipping at 1.0 and a fused AdamW
step on the adapters. The frozen base is bf16; adapters and optimizer state are fp32. Rows are random
tokens of the full sequence length, the first quarter the prompt: every row as long as `max_length`
allows, so memory and step time are the worst case of a real batch. MFU counts the FLOPs really done
(`bench.lora_flops`), not 6 N per token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from dlmstudy.data.sft import SFTCollator
from dlmstudy.models.backbones import build_config, build_model, unwrap_model
from dlmstudy.models.checkpoints import arm_for
from dlmstudy.models.params import config_from_json, count_model
from dlmstudy.models.random_init import random_model
from dlmstudy.models.registry import Arm
from dlmstudy.runners.bench import BenchConfig, _record, _timed, lora_flops, mfu
from dlmstudy.runners.device import autocast, peak_memory, reset_peak_memory
from dlmstudy.training.clipping import clip_grad_norm
from dlmstudy.training.heads import output_head
from dlmstudy.training.lora import LoraSettings, apply_lora, enable_gradient_checkpointing
from dlmstudy.training.objectives import IGNORE
from dlmstudy.training.registry import build_objective
from dlmstudy.training.trainer import host_index

SFT_BATCH = 2  # the tutorial's per_device_train_batch_size
EPOCH_ROWS = 2000  # the tutorial's alpaca-zh-gpt[train:2000]
PROMPT_FRACTION = 0.25


def _built(arm: Arm, cfg: BenchConfig, device: str) -> torch.nn.Module:
    config = build_config(arm.backbone, cfg.size, cfg.tokens, causal=arm.causal)
    return build_model(config, seed=0).to(device=device, dtype=torch.bfloat16)


def sft_models(cfg: BenchConfig, arms: list[Arm], device: str) -> list[tuple[Callable[[], torch.nn.Module], Arm]]:
    """(bf16 model factory, arm): a config.json's own model and arm (LLaDA as LLaDA, Qwen2 as Qwen2 AR), its weights
    drawn on the device as `dlmstudy init-model` draws them; a named setting once per arm at its shape."""
    if cfg.source is not None:
        return [(lambda: random_model(cfg.source, device=device, dtype=torch.bfloat16)[0],
                 arm_for(config_from_json(cfg.source)))]
    return [(functools.partial(_built, arm, cfg, device), arm) for arm in arms]


def sft_batch(cfg: BenchConfig, first_index: int, mask_id: int | None, vocab: int, eos_id: int) -> dict:
    """B rows of random tokens (never the mask token), each `seq_len` long with a prompt of a quarter of it, collated
    as the SFT Trainer collates them (index kept on the host)."""
    g = torch.Generator().manual_seed(first_index)
    top = mask_id if mask_id is not None else vocab
    prompt = max(1, int(cfg.seq_len * PROMPT_FRACTION))
    rows = [{"input_ids": torch.randint(0, top, (cfg.seq_len,), generator=g).tolist(), "prompt_len": prompt,
             "index": first_index + i} for i in range(cfg.batch_size)]
    return host_index(SFTCollator(eos_id)(rows))


def bench_sft(model: torch.nn.Module, arm: Arm, cfg: BenchConfig, device: str, *, steps: int = 10, warmup: int = 3,
              peak: float | None = None, checkpointing: bool = False, accumulation: int = 8,
              lora: LoraSettings = LoraSettings(), head_chunk: int = 2048, head_kernel: str = "auto") -> dict:
    """Peak memory, tokens/s, step time, MFU and the time of an epoch of 2,000 rows of LoRA SFT on `model` (its
    frozen weights as given, bf16 for the real measurement): `steps` micro-batches timed after `warmup`."""
    base = unwrap_model(model)
    counts = count_model(base)
    config = base.config
    mask_id = getattr(config, "mask_token_id", None)
    if arm.objective == "mdm" and mask_id is None:
        mask_id = cfg.tokens.mask_token_id
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    model = apply_lora(model, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                       target_modules=lora.target_modules)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    objective = build_objective(arm.objective, seed=0, fast_head=True, chunk=head_chunk, kernel=head_kernel,
                                **({"mask_id": mask_id} if arm.objective == "mdm" else {}))
    optimizer = torch.optim.AdamW(trainable, lr=3e-4, fused=device == "cuda")
    batches = [sft_batch(cfg, i * cfg.batch_size, mask_id, config.vocab_size, eos) for i in range(warmup + steps)]
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    def head_rows(batch: dict) -> int:
        if arm.objective == "mdm":
            return int(objective.corrupt(batch).masked.sum())
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    scored = sum(head_rows(b) for b in batches[warmup:])
    resident = torch.cuda.memory_allocated() if device == "cuda" else None

    def step(i: int) -> None:
        with autocast(device):
            loss, _ = objective(model, batches[i])
        (loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            clip_grad_norm(optimizer, trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    for i in range(warmup):
        step(i)
    seconds, _ = _timed(device, lambda: [step(i) for i in range(warmup, warmup + steps)])
    step_time = seconds / steps
    tokens = cfg.batch_size * cfg.seq_len
    head = output_head(model)
    d_attention = config.num_attention_heads * (getattr(config, "head_dim", None)
                                                or config.hidden_size // config.num_attention_heads)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    n_lora = sum(m.weight.numel() for m in linears if m.weight.requires_grad)
    n_frozen = sum(m.weight.numel() for m in linears if not m.weight.requires_grad)
    flops = lora_flops(tokens=tokens, n_frozen=n_frozen, n_lora=n_lora, n_layers=config.num_hidden_layers,
                       d_attention=d_attention, seq_len=cfg.seq_len,
                       causal=arm.causal, head_rows=scored / steps, d_model=config.hidden_size,
                       vocab=config.vocab_size)
    recompute = tokens * (2 * n_frozen + 2 * n_lora + (2 if arm.causal else 4) * config.num_hidden_layers
                          * d_attention * cfg.seq_len) if checkpointing else 0
    model.eval()
    return _record("sft", arm, cfg, device, model, counts=counts,
                   mode="lora-checkpointing" if checkpointing else "lora", batch=cfg.batch_size, seq_len=cfg.seq_len,
                   prompt_len=max(1, int(cfg.seq_len * PROMPT_FRACTION)), gradient_accumulation_steps=accumulation,
                   gradient_checkpointing=checkpointing, tokens_per_s=tokens / step_time, step_time_s=step_time,
                   optimizer_step_time_s=step_time * accumulation, flops_per_step=flops,
                   head_rows_per_step=scored / steps, mfu=mfu(1 / step_time, flops, peak),
                   hfu=mfu(1 / step_time, flops + recompute, peak), peak_flops=peak,
                   peak_memory_gb=peak_memory(device) / 1e9,
                   peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if device == "cuda" else None,
                   resident_memory_gb=None if resident is None else resident / 1e9,
                   epoch_rows=EPOCH_ROWS, epoch_s=math.ceil(EPOCH_ROWS / cfg.batch_size) * step_time,
                   lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                   params_trainable=sum(p.numel() for p in trainable),
                   trainable_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
                   frozen_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in frozen}),
                   frozen_fp32_params=sum(p.numel() for p in frozen if p.dtype == torch.float32),
                   timed_steps=steps)
