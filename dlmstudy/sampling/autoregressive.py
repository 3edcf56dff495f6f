"""Left-to-right decoding for the autoregressive arms: greedy, temperature and top-p, with a KV cache.

A plain loop rather than `model.generate`: it takes a `torch.Generator` (reproducible sampling next
to other random work), handles left-padded batches through position ids, and its greedy path is the
argmax loop without a cache, computed incrementally. `compiled` greedy decoding goes through
transformers' `generate` with a static KV cache instead, which compiles the decode step with CUDA
graphs on accelerators (the loop is launch-bound at these sizes); it gives the same tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, GenerationConfig

from dlmstudy.sampling.diffusion import SamplerArgumentError, accepts, cache_kwargs, check_prompt, positions_from_mask


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose one token per row from last-position logits (B, V): argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def ar_generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Extend left-padded `prompt` (B, P) by up to `max_new_tokens` tokens; returns prompt + new tokens.

    Rows that have produced `eos_id` are filled with `eos_id` afterwards; decoding stops early once
    every row has, so the result can be shorter than P + max_new_tokens. `compiled` (greedy only):
    transformers' `generate` with a static cache, compiled on accelerators (module docstring).
    """
    check_prompt(prompt, attention_mask)
    if max_new_tokens < 1:
        raise SamplerArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise SamplerArgumentError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    attention_mask = torch.ones_like(prompt) if attention_mask is None else attention_mask.long()
    if compiled:
        if temperature != 0:
            raise SamplerArgumentError("compiled AR decoding is greedy only (temperature 0)")
        return static_generate(model, prompt, attention_mask, max_new_tokens=max_new_tokens, eos_id=eos_id)
    positions = positions_from_mask(attention_mask)
    cache = DynamicCache()
    last_only = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    logits = model(prompt, attention_mask=attention_mask, position_ids=positions, **last_only,
                   **cache_kwargs(model, cache)).logits
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    new_tokens = []
    for t in range(max_new_tokens):
        token = next_token(logits[:, -1], temperature, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        new_tokens.append(token)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(token[:, None], attention_mask=attention_mask, position_ids=positions,
                       **cache_kwargs(model, cache)).logits
    return torch.cat([prompt, torch.stack(new_tokens, dim=1)], dim=1)


def static_generate(model: torch.nn.Module, prompt: torch.Tensor, attention_mask: torch.Tensor, *,
                    max_new_tokens: int, eos_id: int | None) -> torch.Tensor:
    """Greedy decoding by transformers' `generate` with a static KV cache (compiled with CUDA graphs there on
    accelerators); rows that ended are filled with `eos_id`, and without `eos_id` nothing ends early."""
    ends = [] if eos_id is None else eos_id  # [] overrides the model config's end token: nothing ends early
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static",
                              eos_token_id=ends, pad_token_id=0 if eos_id is None else eos_id)
    return model.generate(prompt, attention_mask=attention_mask, generation_config=config)
