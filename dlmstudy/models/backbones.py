"""Backbone configs: the same size settings become a Llama-style (LLaDA) or a Qwen2 transformers config.

Attention direction is part of the config (`is_causal`): masked-diffusion arms are bidirectional,
AR arms causal. Both use SDPA attention. The mask token id lives in the config as `mask_token_id`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from transformers import (AttentionInterface, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel,
                          Qwen2Config)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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


# The same SDPA function under a name transformers' mask builders do not know: for it they build no mask.
UNMASKED_SDPA = "sdpa_unmasked"
AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)


@contextlib.contextmanager
def unmasked_attention(model: torch.nn.Module, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Within: a forward pass without a KV cache builds no attention mask when there is nothing to mask.

    With no padding mask transformers' mask builders still check the position ids for packed sequences,
    a Python `if` on a device tensor (a device sync per forward, seen in an H200 trace), and under
    torch.compile they build a full mask tensor, which costs SDPA its fused kernels. For an attention
    implementation they do not know they return None at once, and SDPA takes `is_causal` from the config:
    so the model's SDPA runs under another name here. Only for unpadded rows in full-attention layers
    (sliding windows need their masks); every other case runs unchanged.
    """
    config = unwrap_model(model).config
    if (attention_mask is not None or config._attn_implementation != "sdpa"
            or set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}):
        yield
        return
    config._attn_implementation = UNMASKED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
