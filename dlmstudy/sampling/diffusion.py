"""LLaDA's masked-diffusion sampler (the reference `generate`), vectorised over the batch.

Start from the prompt followed by `gen_length` mask tokens and unmask them block by block, left to
right. Within a block, each step predicts every masked token (x0 = argmax of Gumbel-perturbed
logits) and commits the k most confident ones; k follows a linear schedule (the block's masked
count split evenly over its steps, the remainder one each to the first steps). Options:

- `cfg_scale`: classifier-free guidance, logits = un + (cfg + 1)(cond - un), where the
  unconditional pass sees the prompt replaced by mask tokens.
- `threshold` (Fast-dLLM parallel decoding): commit every masked token of the block whose confidence
  is >= threshold, and at least the ceil(masks left / steps left) most confident ones, so a block
  ends within its `steps / num_blocks` steps and sooner when the model is confident. With steps =
  gen_length that floor is one token per step, Fast-dLLM's rule (whose `steps` does nothing under a
  threshold); with fewer steps it is the plain schedule, which a threshold above 1 reproduces exactly.
- `use_cache` (Fast-dLLM prefix cache): the first step of a block runs the whole sequence and keeps
  the K/V of the prefix (prompt and finished blocks); the block's later steps run only the block
  and the masked suffix against that cache. With bidirectional attention the prefix K/V depend on
  the tokens after it, which change during the block, so later steps are an approximation (as in
  Fast-dLLM); the first step of each block is exact, and with causal attention every step is.

- `compiled`: the same algorithm, faster: the model's full-sequence passes run as a torch.compile'd,
  CUDA-graphed call (`mode="reduce-overhead"`: the step is launch-bound at these sizes), and the
  proposal's float64 math is one compiled kernel instead of a dozen passes over [B, block, V]. Cached
  steps (`use_cache`) stay eager: their shapes change every step. Outputs equal the eager sampler's
  up to floating-point ties.

End tokens, with the reference's names (LLaDA's Appendix B.4; after SFT with EOS padding a model tends
to fill the canvas with EOS, the padding it was trained on):
- `logits_eos_inf`: the EOS logit is -inf before x0 is chosen, so EOS is never generated (an answer
  then ends at its end-of-turn token `eot_id`).
- `confidence_eos_eot_inf`: x0 is chosen as usual, but the confidence is the softmax with the EOS and
  end-of-turn logits at -inf: a position predicting either has confidence 0, so it is committed only
  after every position predicting anything else (threshold steps never take it above the floor), and the
  other confidences are renormalised over the remaining tokens. The reference sets these logits in the
  tensor it takes the softmax of only at temperature 0 (above it, only the end-of-turn token is
  covered); here both are, at every temperature.
`eos_id` may name several tokens: EOS and the pad tokens that follow it after SFT with distinct padding
(`dlmstudy.sampling.end_tokens`); the options treat each of them as EOS.

One deliberate difference from the reference: the mask token itself is never predicted (its logit is
-inf), so the output holds no mask tokens and a threshold step always makes progress; the reference
would "commit" a predicted mask and leave the position masked. Trained models give it ~0 probability.

Only the current block can be committed, so the float64 Gumbel noise and the softmax are computed
for the block's positions only (the reference draws noise for the whole sequence and discards the
rest: same distribution, a different use of the random stream). Uniform confidences for `random`
remasking are drawn for the whole sequence, as in the reference, so a seed reproduces it exactly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dlmstudy.errors import UserError
from dlmstudy.models.backbones import unwrap_model

REMASKING = ("low_confidence", "random")


class SamplerArgumentError(UserError, ValueError):
    """An invalid sampler option or combination of options (a `UserError` and a `ValueError`)."""


def num_transfer_tokens(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each step, (B, steps): the masked count split evenly, remainder first."""
    count = masked.sum(dim=1, keepdim=True)
    base, remainder = count // steps, count % steps
    return base + (torch.arange(steps, device=masked.device) < remainder).long()


def top_k_mask(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the k[b] highest-confidence positions of each row b (a per-row top-k)."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    return ranks < k.unsqueeze(-1)


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the transformers model under any wrappers takes the keyword argument `name` explicitly.

    A wrapper's own signature can say nothing: peft's forward takes **kwargs and passes them on."""
    return name in inspect.signature(type(unwrap_model(model)).forward).parameters


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache) -> dict:
    """Keyword arguments passing a KV cache to a transformers model (`cache`, formerly `past_key_values`)."""
    name = "cache" if accepts(model, "cache") else "past_key_values"
    return {name: cache, "use_cache": True}


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop the cached K/V beyond the first `length` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


_last_compiled: list = []  # [(the model, its compiled call)] for the last model sampled compiled, at most one


def compiled_call(model: torch.nn.Module):
    """`model(...)` as a torch.compile'd, CUDA-graphed call. The last model's compiled call is kept (an SFT
    run probes one model every epoch); a new model replaces it, so earlier models can be freed.

    The model is not changed in place, so training it (the SFT probes run mid-training) is unaffected."""
    if not _last_compiled or _last_compiled[0][0] is not model:
        _last_compiled[:] = [(model, torch.compile(model, mode="reduce-overhead", dynamic=False))]
    compiled = _last_compiled[0][1]

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are consumed: reuse the graph's
        return compiled(*args, **kwargs)

    return call


class _Denoiser:
    """The mask predictor as the sampler calls it: padding, classifier-free guidance and the KV cache."""

    def __init__(self, model, prompt_len: int, attention_mask, gen_length: int, cfg_scale: float, mask_id: int,
                 compiled: bool = False):
        self.model, self.prompt_len, self.cfg_scale, self.mask_id = model, prompt_len, cfg_scale, mask_id
        self.full_pass = compiled_call(model) if compiled else model
        self.keep_logits = accepts(model, "logits_to_keep")
        self.attention_mask = self.position_ids = None
        if attention_mask is not None:
            generated = torch.ones(attention_mask.shape[0], gen_length, dtype=torch.long, device=attention_mask.device)
            full = torch.cat([attention_mask.long(), generated], dim=1)
            self.attention_mask, self.position_ids = self._pair(full), self._pair(positions_from_mask(full))

    def _pair(self, t: torch.Tensor) -> torch.Tensor:
        """Stack the conditional and unconditional batches when guidance is on."""
        return torch.cat([t, t]) if self.cfg_scale > 0 else t

    def logits(self, x: torch.Tensor, start: int, block: slice, cache: DynamicCache | None) -> torch.Tensor:
        """Logits of the positions in `block`, running the model on x[:, start:] (the prefix is in `cache`)."""
        inputs = x
        if self.cfg_scale > 0:
            unconditional = x.clone()
            unconditional[:, : self.prompt_len] = self.mask_id
            inputs = torch.cat([x, unconditional])
        kwargs = {}
        if self.attention_mask is not None:
            kwargs.update(attention_mask=self.attention_mask, position_ids=self.position_ids[:, start:])
        if cache is not None:
            kwargs.update(cache_kwargs(self.model, cache))
        window = slice(block.start - start, block.stop - start)
        run = self.model if cache is not None else self.full_pass
        if self.keep_logits:
            kwargs["logits_to_keep"] = torch.arange(window.start, window.stop, device=x.device)
            logits = run(inputs[:, start:], **kwargs).logits
        else:
            logits = run(inputs[:, start:], **kwargs).logits[:, window]
        if self.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        return logits


def _proposal(logits, gumbel_u, temperature, random_confidence, mask_id, eos_ids, eot_ids, eos_banned,
              logits_eos_inf, confidence_eos_eot_inf):
    """x0 and its confidence for each position of the block: Gumbel-max in float64, as in the reference.

    gumbel_u: the noise's uniforms (float64, the logits' shape), None at temperature 0. eos_ids, eot_ids: 1-D id
    tensors (eot_ids may be empty); eos_banned: [B, block] positions where EOS may not be chosen, or None."""
    logits = logits.to(torch.float64)
    logits[:, :, mask_id] = float("-inf")
    if logits_eos_inf:
        logits[:, :, eos_ids] = float("-inf")
    elif eos_banned is not None:
        logits[:, :, eos_ids] = logits[:, :, eos_ids].masked_fill(eos_banned[..., None], float("-inf"))
    if gumbel_u is None:
        x0 = logits.argmax(dim=-1)
    else:
        x0 = (logits.exp() / (-torch.log(gumbel_u)) ** temperature).argmax(dim=-1)
    if random_confidence is not None:
        return x0, random_confidence.to(torch.float64)
    if confidence_eos_eot_inf:
        logits[:, :, torch.cat([eos_ids, eot_ids])] = float("-inf")
    confidence = F.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, confidence


@functools.cache
def _compiled_proposal():
    return torch.compile(_proposal, dynamic=False)


def _propose(logits, *, temperature, random_confidence, generator, mask_id, eos_ids, eot_ids, eos_banned,
             logits_eos_inf, confidence_eos_eot_inf, compiled=False):
    """`_proposal` with its random draws made here (eager, from `generator`), compiled or not."""
    gumbel_u = None
    if temperature > 0:
        gumbel_u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    proposal = _compiled_proposal() if compiled else _proposal
    return proposal(logits, gumbel_u, temperature, random_confidence, mask_id, eos_ids, eot_ids, eos_banned,
                    logits_eos_inf, confidence_eos_eot_inf)


def token_ids(ids: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """One token id, several or none as a 1-D long tensor on `device`."""
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long, device=device)


def check_prompt(prompt: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """A (B, P) batch of token ids, left-padded when `attention_mask` (B, P) is given."""
    if prompt.dim() != 2 or prompt.dtype != torch.long:
        raise SamplerArgumentError(
            f"prompt must be a 2-D tensor of token ids (batch, length), got {tuple(prompt.shape)} {prompt.dtype}")
    if attention_mask is None:
        return
    if attention_mask.shape != prompt.shape:
        raise SamplerArgumentError(
            f"attention_mask shape {tuple(attention_mask.shape)} != prompt shape {tuple(prompt.shape)}")
    if (attention_mask[:, 1:].long() < attention_mask[:, :-1].long()).any():
        raise SamplerArgumentError("prompts must be left-padded (attention_mask zeros before ones); got right padding")


def _check(steps, gen_length, block_length, temperature, cfg_scale, remasking, threshold, has_eos, min_new_tokens,
           logits_eos_inf, confidence_eos_eot_inf) -> None:
    """Reject invalid options and combinations with one clear line each."""
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if value < 1:
            raise SamplerArgumentError(f"{name} must be >= 1, got {value}")
    if gen_length % block_length:
        raise SamplerArgumentError(f"gen_length {gen_length} is not divisible by block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise SamplerArgumentError(
            f"steps {steps} is not divisible by the number of blocks {num_blocks} (gen_length / block_length)")
    if remasking not in REMASKING:
        raise SamplerArgumentError(f"unknown remasking {remasking!r}; known: {', '.join(REMASKING)}")
    if temperature < 0 or cfg_scale < 0:
        raise SamplerArgumentError(f"temperature and cfg_scale must be >= 0, got {temperature} and {cfg_scale}")
    if threshold is not None and remasking != "low_confidence":
        raise SamplerArgumentError("threshold (parallel decoding) needs remasking='low_confidence'")
    if threshold is not None and threshold < 0:
        raise SamplerArgumentError(f"threshold must be >= 0, got {threshold}")
    if (min_new_tokens or logits_eos_inf or confidence_eos_eot_inf) and not has_eos:
        raise SamplerArgumentError("min_new_tokens, logits_eos_inf and confidence_eos_eot_inf need eos_id")
    if confidence_eos_eot_inf and remasking != "low_confidence":
        raise SamplerArgumentError("confidence_eos_eot_inf changes the model's confidence: it needs "
                                   "remasking='low_confidence'")
    if not 0 <= min_new_tokens <= gen_length:
        raise SamplerArgumentError(f"min_new_tokens must be in [0, gen_length={gen_length}], got {min_new_tokens}")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    threshold: float | None = None,
    use_cache: bool = False,
    eos_id: int | Sequence[int] | None = None,
    eot_id: int | None = None,
    min_new_tokens: int = 0,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    generator: torch.Generator | None = None,
    compiled: bool = False,
    return_history: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill `gen_length` masked tokens after `prompt` (B, P) by LLaDA's reverse process; returns (B, P + gen_length).

    `mask_id` defaults to `model.config.mask_token_id`. `attention_mask` (B, P) marks real prompt
    tokens of left-padded prompts. `eos_id` (one id or several) and `eot_id` (end of turn, e.g.
    `<|im_end|>`) are the end tokens: `min_new_tokens` forbids EOS in the first that many generated
    positions; `logits_eos_inf` forbids it everywhere; `confidence_eos_eot_inf` commits positions
    predicting EOS or end of turn only after every other masked position of the block (module docstring).
    `generator` drives the random draws (the global RNG when None).
    `compiled`: the same algorithm through torch.compile and CUDA graphs (module docstring).
    With `return_history`, also returns `unmask_step` (B, gen_length): the step (counted over all
    blocks from 0) at which each generated position was committed; `unmask_step == t` are the
    positions committed at step t.
    """
    if mask_id is None:
        mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
        if mask_id is None:
            raise SamplerArgumentError("mask_id is required (the model's config has no mask_token_id)")
    check_prompt(prompt, attention_mask)
    eos_ids, eot_ids = token_ids(eos_id, prompt.device), token_ids(eot_id, prompt.device)
    _check(steps, gen_length, block_length, temperature, cfg_scale, remasking, threshold, len(eos_ids) > 0,
           min_new_tokens, logits_eos_inf, confidence_eos_eot_inf)
    batch, prompt_len = prompt.shape
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    x = torch.cat([prompt, prompt.new_full((batch, gen_length), mask_id)], dim=1)
    denoiser = _Denoiser(model, prompt_len, attention_mask, gen_length, cfg_scale, mask_id, compiled)
    unmask_step = torch.full((batch, gen_length), -1, dtype=torch.long, device=x.device)
    step = 0
    for b in range(num_blocks):
        block = slice(prompt_len + b * block_length, prompt_len + (b + 1) * block_length)
        gen_block = slice(block.start - prompt_len, block.stop - prompt_len)
        schedule = num_transfer_tokens(x[:, block] == mask_id, steps_per_block)
        eos_banned = None
        if min_new_tokens:
            generated_index = torch.arange(gen_block.start, gen_block.stop, device=x.device)
            eos_banned = (generated_index < min_new_tokens).expand(batch, -1)
        cache = DynamicCache() if use_cache else None
        for i in range(steps_per_block):
            if threshold is not None and not (x[:, block] == mask_id).any():
                break
            start = block.start if (cache is not None and i > 0) else 0
            logits = denoiser.logits(x, start, block, cache)
            if cache is not None:
                crop_cache(cache, block.start)
            random_confidence = None
            if remasking == "random":
                random_confidence = torch.rand(x.shape, device=x.device, generator=generator)[:, block]
            x0, confidence = _propose(logits, temperature=temperature,
                                      random_confidence=random_confidence, generator=generator, mask_id=mask_id,
                                      eos_ids=eos_ids, eot_ids=eot_ids, eos_banned=eos_banned,
                                      logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
                                      compiled=compiled)
            masked = x[:, block] == mask_id
            confidence = confidence.masked_fill(~masked, float("-inf"))
            if threshold is None:
                commit = top_k_mask(confidence, schedule[:, i])
            else:  # the floor keeps the block on schedule: ceil(masks left / steps left)
                floor = (masked.sum(dim=-1) + steps_per_block - i - 1) // (steps_per_block - i)
                commit = (confidence >= threshold) | top_k_mask(confidence, floor)
            x[:, block] = torch.where(commit, x0, x[:, block])
            unmask_step[:, gen_block] = unmask_step[:, gen_block].masked_fill(commit, step)
            step += 1
    return (x, unmask_step) if return_history else x
