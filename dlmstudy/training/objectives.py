"""Training objectives, one per arm kind, shared by pretraining and SFT (REFERENCES.md has the formulas).

LLaDA masked diffusion (Nie et al. 2025):
    t ~ U(0,1) per sequence, p = (1 - eps) t + eps, each token masked independently with prob. p,
    pretraining  L = sum_{masked} CE / p  / (B L)
    SFT          L = 1/B sum_b [ sum_{masked in answer_b} CE / p ] / answer_len_b   ("sequence", LLaDA)
                 L = sum_{masked} CE / p / sum_b answer_len_b                        ("token", dllm default)
    and 1% of pretraining batches are cut to a random length U[1, L].
Autoregressive: next-token cross-entropy; in SFT the prompt's labels are ignored.

A batch is {"input_ids": [B, L], "index": [B]} (pretraining) plus "loss_mask" [B, L] (SFT: the
answer, including the padded EOS tokens, which LLaDA trains on). The noise of a batch is drawn from
a generator seeded by (seed, index of its first row), so a resumed run redraws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100


def forward_process(input_ids: torch.Tensor, *, mask_id: int, eps: float, generator: torch.Generator,
                    maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA's forward process: returns (noisy ids, masked [B,L] bool, p_mask [B,L])."""
    b, l = input_ids.shape
    t = torch.rand(b, device=input_ids.device, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(b, l)
    masked = torch.rand(b, l, device=input_ids.device, generator=generator) < p_mask
    if maskable is not None:
        masked &= maskable.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask


def mdm_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor, *,
             norm: str = "batch_tokens", answer_len: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-diffusion loss: CE at masked positions weighted by 1/p, normalised as named.

    norm: "batch_tokens" (pretraining: / B L), "sequence" (SFT, LLaDA: per-sequence / answer_len_b,
    then mean over B) or "token" (SFT, dllm: / total answer tokens).
    """
    b, l = targets.shape
    weighted = torch.zeros(b, l, dtype=torch.float32, device=targets.device)
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    weighted[masked] = ce / p_mask[masked]
    if norm == "batch_tokens":
        return weighted.sum() / (b * l)
    if answer_len is None:
        raise ValueError(f"norm {norm!r} needs answer_len")
    answer_len = answer_len.clamp(min=1).float()
    if norm == "sequence":
        return (weighted.sum(dim=1) / answer_len).mean()
    if norm == "token":
        return weighted.sum() / answer_len.sum()
    raise ValueError(f"unknown loss normalisation {norm!r}; use batch_tokens, sequence or token")


def ar_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position i predicts labels[i+1]; IGNORE labels are not scored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def batch_generator(batch: dict[str, torch.Tensor], seed: int) -> torch.Generator:
    """A generator seeded by the run seed and the position of the batch's first row in the run's order."""
    first = int(batch["index"].reshape(-1)[0]) if "index" in batch else 0
    g = torch.Generator(device=batch["input_ids"].device)
    g.manual_seed((seed * 1_000_003 + first) % (2**63 - 1))
    return g


@dataclass
class MDMObjective:
    """LLaDA masked diffusion (pretraining when the batch has no loss_mask, SFT when it has one)."""

    mask_id: int
    eps: float = 1e-3
    random_length_ratio: float = 0.01
    sft_norm: str = "sequence"
    seed: int = 0
    name: str = "mdm"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        g = batch_generator(batch, self.seed)
        input_ids = batch["input_ids"]
        loss_mask = batch.get("loss_mask")
        if loss_mask is None and self.random_length_ratio > 0:
            if torch.rand((), device=input_ids.device, generator=g) < self.random_length_ratio:
                length = int(torch.randint(1, input_ids.shape[1] + 1, (), device=input_ids.device, generator=g))
                input_ids = input_ids[:, :length]
        noisy, masked, p_mask = forward_process(input_ids, mask_id=self.mask_id, eps=self.eps, generator=g,
                                                maskable=loss_mask)
        logits = model(input_ids=noisy).logits
        if loss_mask is None:
            loss = mdm_loss(logits, input_ids, masked, p_mask)
        else:
            loss = mdm_loss(logits, input_ids, masked, p_mask, norm=self.sft_norm, answer_len=loss_mask.sum(1))
        denom = loss_mask.sum() if loss_mask is not None else input_ids.numel()
        return loss, {"masked_fraction": float(masked.sum()) / max(float(denom), 1.0)}


@dataclass
class ARObjective:
    """Next-token prediction (pretraining: every token; SFT: only where loss_mask is set)."""

    seed: int = 0
    name: str = "ar"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            loss_mask = batch.get("loss_mask")
            labels = input_ids if loss_mask is None else input_ids.masked_fill(~loss_mask.bool(), IGNORE)
        logits = model(input_ids=input_ids, attention_mask=batch.get("attention_mask")).logits
        return ar_loss(logits, labels), {}


OBJECTIVES: dict[str, Callable[..., object]] = {"mdm": MDMObjective, "ar": ARObjective}


def build_objective(name: str, **settings) -> MDMObjective | ARObjective:
    """An objective by registry name with its settings (unknown settings are errors)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**settings)
