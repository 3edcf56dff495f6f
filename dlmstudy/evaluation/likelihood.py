"""Likelihoods for both arms: LLaDA's Monte-Carlo bound for masked diffusion, exact NLL for AR.

Diffusion (the bound of "Large Language Diffusion Models", as LLaDA's and dllm's evaluations estimate it):

    log p(y | c) >= E_l E_{|M|=l} [ (L/l) · Σ_{i∈M} log p(y_i | c, y masked at M) ],   l ~ U{1..L}

Each Monte-Carlo draw masks l of the L scored tokens, chosen uniformly. The counts are
stratified: a stratum of B draws shares one k ~ U{1..L} and draw j masks
l_j = ((round(k + j·L/B) − 1) mod L) + 1 tokens, so the B counts sweep 1..L evenly.
Works with any model whose `model(input_ids, attention_mask=...).logits` gives token logits.
Sequences with padding must be right-padded (positions are taken as 0..T-1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def stratified_mask_counts(lengths: Tensor, draws: int, *, generator: torch.Generator | None = None) -> Tensor:
    """(N, draws) mask counts: row n holds one stratum of `draws` counts in 1..lengths[n]."""
    L = lengths.to(torch.float64).cpu()
    k = (torch.rand(len(L), generator=generator, dtype=torch.float64) * L).floor() + 1  # k ~ U{1..L}
    j = torch.arange(draws, dtype=torch.float64)
    l = torch.round(k[:, None] + j[None, :] * L[:, None] / draws)
    return ((l - 1) % L[:, None] + 1).long()


def _logits(model, x: Tensor, attention_mask: Tensor | None, prompt: Tensor | None, cfg_scale: float, mask_id: int) -> Tensor:
    """Model logits; with CFG, un + (cfg+1)(cond − un) where the unconditional pass masks the prompt."""
    if cfg_scale == 0.0 or prompt is None:
        return model(x, attention_mask=attention_mask).logits
    un_x = x.masked_fill(prompt, mask_id)
    both = torch.cat([x, un_x])
    am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cond, un = model(both, attention_mask=am).logits.chunk(2)
    return un + (cfg_scale + 1) * (cond - un)


def masked_log_prob_terms(
    model,
    x: Tensor,
    maskable: Tensor,
    l: Tensor,
    *,
    mask_id: int,
    attention_mask: Tensor | None = None,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One estimator term per row: mask l_r of the `maskable` positions uniformly, return (L_r/l_r)·Σ_masked log p."""
    u = torch.rand(x.shape, generator=generator).to(x.device).masked_fill(~maskable, 2.0)
    masked = u.argsort(dim=1).argsort(dim=1) < l[:, None]  # the l_r smallest scores: a uniform l_r-subset
    noisy = x.masked_fill(masked, mask_id)
    prompt = ~maskable if attention_mask is None else ~maskable & attention_mask.bool()
    logits = _logits(model, noisy, attention_mask, prompt, cfg_scale, mask_id)
    log_p = -F.cross_entropy(logits[masked].float(), x[masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    summed = torch.zeros(len(x), device=x.device).index_add_(0, rows, log_p)
    L = maskable.sum(dim=1)
    return summed * L / l


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def mdm_loglikelihood(
    model,
    prefix: Tensor | list[int],
    target: Tensor | list[int],
    *,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    return_stderr: bool = False,
    generator: torch.Generator | None = None,
) -> float | tuple[float, float]:
    """Monte-Carlo lower bound on log p(target | prefix), only target positions masked (LLaDA eval).

    Draws come in minibatches of `batch_size`, each one stratum of mask counts. With
    `return_stderr`, also the standard error of the mean over the mc_num draws, computed as if
    they were independent (stratification makes the true error smaller; nan when mc_num is 1).
    """
    device = model_device(model)
    prefix = torch.as_tensor(prefix, dtype=torch.long).flatten()
    target = torch.as_tensor(target, dtype=torch.long).flatten()
    if len(target) == 0:
        raise ValueError("mdm_loglikelihood needs a non-empty target")
    x = torch.cat([prefix, target]).to(device)
    maskable = torch.arange(len(x), device=device) >= len(prefix)
    L = torch.tensor([len(target)])
    terms = []
    for start in range(0, mc_num, batch_size):
        B = min(batch_size, mc_num - start)
        l = stratified_mask_counts(L, B, generator=generator)[0].to(device)
        terms.append(masked_log_prob_terms(
            model, x.expand(B, -1), maskable.expand(B, -1), l,
            mask_id=mask_id, cfg_scale=cfg_scale, generator=generator,
        ))
    t = torch.cat(terms).double()
    estimate = t.mean().item()
    if not return_stderr:
        return estimate
    stderr = (t.std() / math.sqrt(len(t))).item() if len(t) > 1 else math.nan
    return estimate, stderr


@torch.no_grad()
def mdm_nll_bound(
    model,
    input_ids: Tensor,
    *,
    mask_id: int,
    mc_num: int = 32,
    batch_size: int = 32,
    attention_mask: Tensor | None = None,
    scored: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(NLL per token in nats, its Monte-Carlo standard error) of whole sequences, as the diffusion ELBO.

    With `scored` (bool, like input_ids), only those positions are masked and counted and the rest is
    visible context: the bound on -log p(scored | rest), e.g. an answer given its prompt.

    This is an UPPER bound on the true NLL (the negated lower bound on log p), not an exact NLL:
    compare it with an AR model's exact NLL knowing the gap favours AR. Each sequence gets its own
    stratum of `mc_num` mask counts; rows (sequence, draw) are evaluated `batch_size` at a time.
    Tokens where `attention_mask` is 0 (right padding) are neither masked nor counted. The standard
    error treats draws as independent (conservative under stratification); nan when mc_num is 1.
    """
    device = model_device(model)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if scored is not None:
        valid = valid & scored.bool()
    L = valid.sum(dim=1)
    if (L == 0).any():
        raise ValueError("mdm_nll_bound got a sequence with nothing to score (attention_mask or scored all zero)")
    N, J = input_ids.shape[0], mc_num
    counts = stratified_mask_counts(L, J, generator=generator).flatten()
    seq = torch.arange(N).repeat_interleave(J)
    nll = torch.empty(N * J, dtype=torch.float64)
    for s in range(0, N * J, batch_size):
        idx = seq[s:s + batch_size]
        am = None if attention_mask is None else attention_mask[idx].to(device)
        nll[s:s + batch_size] = -masked_log_prob_terms(
            model, input_ids[idx].to(device), valid[idx].to(device), counts[s:s + batch_size].to(device),
            mask_id=mask_id, attention_mask=am, generator=generator,
        ).double().cpu()
    per_seq = nll.view(N, J)  # each row: J estimates of the bound on −log p(x_n)
    tokens = L.sum().item()
    estimate = per_seq.mean(dim=1).sum().item() / tokens
    stderr = math.sqrt((per_seq.var(dim=1) / J).sum().item()) / tokens if J > 1 else math.nan
    return estimate, stderr


@torch.no_grad()
def ar_nll(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, batch_size: int = 32) -> float:
    """Exact next-token NLL per predicted token in nats; the first token of each sequence is context only."""
    device = model_device(model)
    total, count = 0.0, 0
    for s in range(0, len(input_ids), batch_size):
        ids = input_ids[s:s + batch_size].to(device)
        am = None if attention_mask is None else attention_mask[s:s + batch_size].to(device)
        logits = model(ids, attention_mask=am).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        scored = torch.ones_like(nll, dtype=torch.bool) if am is None else am[:, 1:].bool()
        total += nll[scored].sum().item()
        count += int(scored.sum())
    return total / count
