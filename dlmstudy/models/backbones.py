"""Backbone configs: the same size settings become a Llama-style (LLaDA) or a Qwen2 transformers config.

Attention direction is part of the config (`is_causal`): masked-diffusion arms are bidirectional,
AR arms causal. Both use SDPA attention. The mask token id lives in the config as `mask_token_id`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from dlmstudy.errors import UserError

BACKBONES = ("llada", "qwen")


@dataclass(frozen=True)
class ModelSize:
    """Width, depth and shape of a backbone; the same numbers build either backbone."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dropout: float = 0.0

    def resolved_intermediate(self) -> int:
        """SwiGLU MLP width; defaults to the 8d/3 rule rounded up to a multiple of 64."""
        if self.intermediate_size:
            return self.intermediate_size
        return 64 * ((8 * self.hidden_size // 3 + 63) // 64)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids every arm's config carries (one tokenizer for both arms)."""

    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    mask_token_id: int
    bos_token_id: int | None = None


def build_config(backbone: str, size: ModelSize, tokens: SpecialTokens, *, causal: bool) -> PretrainedConfig:
    """A transformers config for `backbone` at `size`; `causal=False` gives bidirectional attention."""
    if size.hidden_size % size.num_heads:
        raise UserError(f"hidden_size {size.hidden_size} is not divisible by num_heads {size.num_heads}")
    common = dict(
        vocab_size=tokens.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.resolved_intermediate(),
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads or size.num_heads,
        max_position_embeddings=size.max_position_embeddings,
        rope_theta=size.rope_theta,
        rms_norm_eps=size.rms_norm_eps,
        tie_word_embeddings=size.tie_word_embeddings,
        attention_dropout=size.dropout,
        hidden_act="silu",
        pad_token_id=tokens.pad_token_id,
        eos_token_id=tokens.eos_token_id,
        bos_token_id=tokens.bos_token_id,
        is_causal=causal,
        use_cache=causal,
    )
    if backbone == "llada":
        config: PretrainedConfig = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    elif backbone == "qwen":
        config = Qwen2Config(use_sliding_window=False, **common)
    else:
        raise UserError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    config.mask_token_id = tokens.mask_token_id
    config.dlmstudy_size = asdict(size)
    return config


def build_model(config: PretrainedConfig, *, seed: int | None = None) -> PreTrainedModel:
    """A freshly initialised model with SDPA attention (seeded for identical inits across runs)."""
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / compile / accelerate / peft wrappers (what owns the layers and head)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_mask_argument(model: torch.nn.Module, attention_mask: torch.Tensor | None
                            ) -> torch.Tensor | dict | None:
    """The `attention_mask` to pass for a forward pass without a KV cache.

    With no padding mask, transformers' mask builder checks the position ids for packed sequences
    and reads the answer on the host: a device sync per forward (seen in an H200 trace of the AR step).
    A causal Qwen2 decoder also takes its masks already built, one per layer type, so it gets the one
    that builder would return here ({"full_attention": None}: SDPA's causal kernel, no mask tensor).
    Every other case gets `attention_mask` unchanged (Llama's decoder takes no mask mapping).
    """
    config = unwrap_model(model).config
    if (attention_mask is None and config.model_type == "qwen2" and getattr(config, "is_causal", True)
            and set(getattr(config, "layer_types", None) or ["sliding_attention"]) == {"full_attention"}):
        return {"full_attention": None}
    return attention_mask
