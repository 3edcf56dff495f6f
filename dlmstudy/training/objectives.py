"""Training objectives, one per arm kind, shared by pretraining and SFT (formulas below).

LLaDA masked diffusion (Nie et al. 2025):
    t ~ U(0,1) per sequence, p = (1 - eps) t + eps, each token masked independently with prob. p,
    pretraining  L = sum_{masked} CE / p  / (B L)
    SFT          L = 1/B sum_b [ sum_{masked in answer_b} CE / p ] / answer_len_b   ("sequence", LLaDA)
                 L = sum_{masked} CE / p / sum_b answer_len_b                        ("token", dllm default)
    and 1% of pretraining batches are cut to a random length U[1, L].
Autoregressive: next-token cross-entropy; in SFT the prompt's labels are ignored.

A batch is {"input_ids": [B, L], "index": [B]} (pretraining) plus "loss_mask" [B, L] (SFT: the
answer, including the padding, which LLaDA trains on) and optionally "always_masked" [B, L] (SFT
positions masked in every draw, p = 1, so weighted 1: the `masked_pad` padding of data/sft_padding.py);
"index" may be a tensor or a list
(DLMTrainer keeps it on the host as a list). Each sequence's noise (t and the
per-token uniforms) is counter-based: a hash of (seed, its index in the run's order, position). So a
resumed run redraws the same masks, and batch size, gradient accumulation, device count and device
type do not change them. Only the random-length cut is decided per batch, by its first row's index.
The noise is drawn on the host, and so are the masked rows in pretraining: the fast head then needs
no device sync (heads.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dlmstudy.errors import UserError

IGNORE = -100
SFT_NORMS = ("sequence", "token")
Metrics = dict[str, torch.Tensor]  # detached scalars, averaged by the trainer between logs (no device sync per step)


def mask_positions(t: torch.Tensor, u: torch.Tensor, *, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens LLaDA's forward process masks: p = (1 - eps) t + eps per sequence, token i iff u_i < p
    (SFT then keeps only answer tokens). t [B] and u [B, L] are uniforms in [0, 1); returns (masked [B, L]
    bool, p_mask [B, L])."""
    b, l = u.shape
    p_mask = ((1 - eps) * t.float() + eps)[:, None].expand(b, l)
    return u < p_mask, p_mask


def mask_tokens(input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The noisy sequence x_t: input_ids with the masked positions replaced by the mask token."""
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)


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


GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijective, well-mixed scramble of 64-bit integers."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def noise_keys(seed: int, stream: int, index: torch.Tensor) -> np.ndarray:
    """One 64-bit key per index for a (run seed, stream) pair; stream 0 is per-sequence noise, 1 per-batch draws."""
    head = _mix64(_mix64(np.array([seed], dtype=np.uint64)) + np.uint64(stream))
    return _mix64(head + index.reshape(-1).cpu().numpy().astype(np.uint64))


def uniforms(keys: np.ndarray, n: int) -> torch.Tensor:
    """[len(keys), n] uniforms in [0, 1) (24-bit, exact in float32): the SplitMix64 stream that starts at each key."""
    counters = keys[:, None] + GOLDEN * np.arange(1, n + 1, dtype=np.uint64)[None, :]
    return torch.from_numpy((_mix64(counters) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24))


def _index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "index" not in batch:
        raise ValueError("an MDM batch needs 'index' (each row's position in the run's order) to seed its noise")
    return torch.as_tensor(batch["index"])


def sequence_noise(batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B], u [B, L]) on the host (CPU); row b is a function of (seed, index_b) only (counter-based)."""
    draws = uniforms(noise_keys(seed, 0, _index(batch)), batch["input_ids"].shape[1] + 1)
    return draws[:, 0], draws[:, 1:]


def upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device` without waiting for the device: from pinned memory, asynchronously, on CUDA."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def batch_generator(batch: dict[str, torch.Tensor], seed: int) -> torch.Generator:
    """A CPU generator for per-batch draws, seeded by (seed, index of the batch's first row) only."""
    return torch.Generator().manual_seed(int(noise_keys(seed, 1, _index(batch).reshape(-1)[:1])[0]))


class Corrupted(NamedTuple):
    """A noised MDM batch: rows are the flat indices of the masked positions when known without a device sync;
    cut: the batch was cut to a random length (its forward runs eagerly: `forward_context`)."""

    input_ids: torch.Tensor
    noisy: torch.Tensor
    masked: torch.Tensor
    p_mask: torch.Tensor
    loss_mask: torch.Tensor | None
    rows: torch.Tensor | None
    cut: bool = False


def forward_context(cut: bool) -> contextlib.AbstractContextManager:
    """Where a batch of a shape seen once runs: a batch cut to a random length runs eagerly, so a compiled
    decoder keeps the one graph of the training shape (recompiling the whole decoder for each cut
    batch stalled an H200 run for 30 s); every other batch runs as the model is set up."""
    return torch.compiler.set_stance("force_eager") if cut else contextlib.nullcontext()


@dataclass
class MDMObjective:
    """LLaDA masked diffusion (pretraining when the batch has no loss_mask, SFT when it has one)."""

    mask_id: int
    eps: float = 1e-3
    random_length_ratio: float = 0.01
    sft_norm: str = "sequence"
    seed: int = 0
    name: str = "mdm"

    def __post_init__(self):
        if not 0 < self.eps < 1:
            raise UserError(f"mask eps must be in (0, 1), got {self.eps}")
        if not 0 <= self.random_length_ratio <= 1:
            raise UserError(f"random_length_ratio must be in [0, 1], got {self.random_length_ratio}")
        if self.seed < 0:
            raise UserError(f"seed must be non-negative, got {self.seed}")
        if self.sft_norm not in SFT_NORMS:
            raise UserError(f"unknown SFT loss normalisation {self.sft_norm!r}; use {' or '.join(SFT_NORMS)}")

    def corrupt(self, batch: dict[str, torch.Tensor]) -> Corrupted:
        """The batch's noising. The masks are drawn on the host; in pretraining the masked rows are found there
        too, so the fast head needs no device sync (in SFT the answer mask is on the device)."""
        input_ids = batch["input_ids"]
        loss_mask = batch.get("loss_mask")
        t, u = sequence_noise(batch, self.seed)
        cut = False
        if loss_mask is None and self.random_length_ratio > 0:
            g = batch_generator(batch, self.seed)
            if torch.rand((), generator=g) < self.random_length_ratio:
                length = int(torch.randint(1, input_ids.shape[1] + 1, (), generator=g))
                input_ids, u, cut = input_ids[:, :length], u[:, :length], True
        masked, p_mask = mask_positions(t, u, eps=self.eps)
        rows = masked.flatten().nonzero().squeeze(1) if loss_mask is None else None
        device = input_ids.device
        masked, p_mask = upload(masked, device), upload(p_mask.contiguous(), device)
        if loss_mask is not None:
            masked = masked & loss_mask.bool()
        always = batch.get("always_masked")
        if always is not None:
            always = always.bool().to(device)
            masked = masked | always
            p_mask = p_mask.masked_fill(always, 1.0)
        noisy = mask_tokens(input_ids, masked, self.mask_id)
        return Corrupted(input_ids, noisy, masked, p_mask, loss_mask, None if rows is None else upload(rows, device),
                         cut)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        input_ids, noisy, masked, p_mask, loss_mask, _, cut = self.corrupt(batch)
        with forward_context(cut):
            logits = model(input_ids=noisy).logits
        if loss_mask is None:
            loss = mdm_loss(logits, input_ids, masked, p_mask)
        else:
            loss = mdm_loss(logits, input_ids, masked, p_mask, norm=self.sft_norm, answer_len=loss_mask.sum(1))
        maskable = loss_mask.sum().clamp(min=1) if loss_mask is not None else input_ids.numel()
        return loss, {"masked_fraction": (masked.sum() / maskable).detach()}


@dataclass
class ARObjective:
    """Next-token prediction (pretraining: every token; SFT: only where loss_mask is set)."""

    seed: int = 0
    name: str = "ar"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            loss_mask = batch.get("loss_mask")
            labels = input_ids if loss_mask is None else input_ids.masked_fill(~loss_mask.bool(), IGNORE)
        logits = model(input_ids=input_ids, attention_mask=batch.get("attention_mask")).logits
        return ar_loss(logits, labels), {}
