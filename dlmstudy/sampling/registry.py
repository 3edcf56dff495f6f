"""One entry point for every arm's sampler: `sample(model, prompt, sampler=name, **options)`.

Evaluation and chat call `sample` with the arm's `sampler` name; a new arm with a new decoding
procedure adds one entry to `SAMPLERS`. Options a sampler does not take are errors, never ignored.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from dlmstudy.sampling.autoregressive import ar_generate
from dlmstudy.sampling.diffusion import SamplerArgumentError, generate

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "diffusion": generate,
    "ar": ar_generate,
}


def sampler_options(sampler: str) -> list[str]:
    """The keyword options `sampler` accepts (everything after model and prompt)."""
    if sampler not in SAMPLERS:
        raise SamplerArgumentError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    return list(inspect.signature(SAMPLERS[sampler]).parameters)[2:]


def sample(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    *,
    sampler: str,
    attention_mask: torch.Tensor | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode with the named sampler ("diffusion" or "ar"); returns prompt + generated tokens (B, P + new)."""
    known = sampler_options(sampler)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SamplerArgumentError(
            f"sampler {sampler!r} does not take {', '.join(unknown)}; its options: {', '.join(known)}")
    return SAMPLERS[sampler](model, prompt, attention_mask=attention_mask, **options)
