"""Samplers: LLaDA's masked-diffusion sampler (with Fast-dLLM options) and AR decoding, behind `sample`."""

from dlmstudy.sampling.autoregressive import ar_generate
from dlmstudy.sampling.diffusion import SamplerArgumentError, generate
from dlmstudy.sampling.registry import SAMPLERS, sample, sampler_options

__all__ = ["SAMPLERS", "SamplerArgumentError", "ar_generate", "generate", "sample", "sampler_options"]
