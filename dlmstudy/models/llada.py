"""LLaDA's original `config.json` and weight names, mapped onto transformers' Llama classes.

LLaDA-8B and the seed's 100M model are a Llama block (RMSNorm, RoPE, SwiGLU, no biases) with
bidirectional attention, stored under OLMo-style names (`model.transformer.blocks.N.ff_proj`).
This module translates both ways, so no code from a checkpoint folder is ever run. Settings our
Llama classes cannot reproduce exactly are refused with a UserError naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, PretrainedConfig

from dlmstudy.errors import UserError

# LLaDA's own defaults (configuration_llada.py ModelConfig): a missing key means these.
LLADA_DEFAULTS: dict[str, Any] = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False,
    "rope": False, "attention_dropout": 0.1, "multi_query_attention": None, "attention_layer_norm": False,
    "residual_dropout": 0.1, "embedding_dropout": 0.1, "input_emb_norm": False, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "rms_norm_eps": 1e-5, "max_sequence_length": 1024, "rope_theta": 10000.0,
    "include_qkv_bias": False, "include_bias": False, "bias_for_layer_norm": None, "scale_logits": False,
    "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True, "eos_token_id": 50256,
    "pad_token_id": 50256, "mask_token_id": 50256, "bos_token_id": None,
}

# What the Llama classes reproduce: each key must hold this value (why, for the error message).
REQUIRED: dict[str, tuple[Any, str]] = {
    "block_type": ("llama", "only the 'llama' block (separate q/k/v, gated MLP) is supported"),
    "block_group_size": (1, "block groups are not supported"),
    "activation_type": ("silu", "the llama block's gate activation must be silu"),
    "layer_norm_type": ("rms", "only RMSNorm is supported"),
    "layer_norm_with_affine": (True, "RMSNorm without a weight is not supported"),
    "rope": (True, "only rotary position embeddings are supported"),
    "alibi": (False, "ALiBi attention biases are not supported"),
    "include_bias": (False, "linear-layer biases are not supported"),
    "include_qkv_bias": (False, "q/k/v biases are not supported (a Llama block has none)"),
    "attention_layer_norm": (False, "q/k layer norms are not supported"),
    "input_emb_norm": (False, "embedding scaling by sqrt(d_model) is not supported"),
    "scale_logits": (False, "logit scaling is not supported"),
    "residual_dropout": (0.0, "residual dropout is not supported (Llama has attention dropout only)"),
    "embedding_dropout": (0.0, "embedding dropout is not supported (Llama has attention dropout only)"),
}

# Keys with no effect on the forward pass here (initialisation, kernels, bookkeeping).
IGNORED = {
    "auto_map", "torch_dtype", "use_cache", "init_device", "init_fn", "init_std", "init_cutoff_factor",
    "precision", "flash_attention", "flash_attention_version", "rope_full_precision", "alibi_bias_max",
    "attention_layer_norm_with_affine",
} | set(PretrainedConfig().to_dict())

# Weight names: LLaDA (under `model.transformer.`) -> our Llama model. ff_proj is the SwiGLU gate:
# LLaDA's llama block computes ff_out(silu(ff_proj(x)) * up_proj(x)).
TOP_NAMES = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
BLOCK_NAMES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}
LLADA_PREFIX = "model.transformer."


def read_json(path_or_dict: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A config as a dict plus a name for error messages (the file name, or 'config')."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), "config"
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config.json must hold a JSON object")
    return data, path.name


def is_llada_config(data: dict[str, Any]) -> bool:
    """True for LLaDA's original config.json (OLMo-style keys), not a transformers one."""
    return data.get("model_type") == "llada" or "LLaDAModelLM" in (data.get("architectures") or []) or "d_model" in data


def llada_config_from_json(path_or_dict: str | Path | dict[str, Any]) -> LlamaConfig:
    """A bidirectional Llama config equal in function to a LLaDA config.json (keys as in LLaDA-8B)."""
    raw, name = read_json(path_or_dict)
    unknown = sorted(set(raw) - set(LLADA_DEFAULTS) - IGNORED)
    if unknown:
        raise UserError(f"{name}: unknown LLaDA config key {unknown[0]!r}")
    cfg = {**LLADA_DEFAULTS, **raw}

    def refuse(key: str, why: str) -> UserError:
        note = "" if key in raw else " (LLaDA's default when the key is absent)"
        return UserError(f"{name}: {key}={json.dumps(cfg[key])}{note}: {why}")

    for key, (wanted, why) in REQUIRED.items():
        value = bool(cfg[key]) if isinstance(wanted, bool) else cfg[key]
        if value != wanted:
            raise refuse(key, why)
    if cfg["bias_for_layer_norm"]:
        raise refuse("bias_for_layer_norm", "RMSNorm biases are not supported")

    d, n_heads = cfg["d_model"], cfg["n_heads"]
    if d % n_heads:
        raise refuse("n_heads", f"d_model {d} is not divisible by n_heads {n_heads}")
    if cfg["multi_query_attention"]:
        if cfg["n_kv_heads"] not in (None, 1):
            raise refuse("n_kv_heads", "multi_query_attention needs n_kv_heads 1 or null")
        n_kv = 1
    else:
        n_kv = cfg["n_kv_heads"] or n_heads
    if n_heads % n_kv:
        raise refuse("n_kv_heads", f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
    rows = cfg["embedding_size"] or cfg["vocab_size"]
    if rows < cfg["vocab_size"]:
        raise refuse("embedding_size", f"the embedding has fewer rows than vocab_size {cfg['vocab_size']}")

    config = LlamaConfig(
        vocab_size=rows,  # the embedding matrix's rows; logits have this many columns, as in LLaDA
        hidden_size=d,
        intermediate_size=cfg["mlp_hidden_size"] or cfg["mlp_ratio"] * d,
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=d // n_heads,
        max_position_embeddings=cfg["max_sequence_length"],
        rope_theta=float(cfg["rope_theta"]),
        rms_norm_eps=cfg["rms_norm_eps"],
        tie_word_embeddings=bool(cfg["weight_tying"]),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=cfg["attention_dropout"],
        hidden_act="silu",
        pad_token_id=cfg["pad_token_id"],
        eos_token_id=cfg["eos_token_id"],
        bos_token_id=cfg["bos_token_id"],
        is_causal=False,
        use_cache=False,
    )
    config.mask_token_id = cfg["mask_token_id"]
    config.llada_vocab_size = cfg["vocab_size"]
    return config


def llada_json_from_config(config: PretrainedConfig) -> dict[str, Any]:
    """The LLaDA config.json for one of our Llama configs (the inverse of `llada_config_from_json`)."""
    if config.model_type != "llama" or config.attention_bias or config.mlp_bias:
        raise UserError(f"only a bias-free Llama config maps onto LLaDA's layout, not {config.model_type!r}")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise UserError(f"head_dim {config.head_dim} x heads must equal hidden_size {config.hidden_size} in LLaDA")
    return {
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "block_type": "llama",
        "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
        "include_bias": False, "include_qkv_bias": False, "block_group_size": 1,
        "layer_norm_with_affine": True, "attention_layer_norm": False, "input_emb_norm": False,
        "scale_logits": False, "residual_dropout": 0.0, "embedding_dropout": 0.0,
        "d_model": config.hidden_size, "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "mlp_hidden_size": config.intermediate_size,
        "vocab_size": getattr(config, "llada_vocab_size", config.vocab_size), "embedding_size": config.vocab_size,
        "rope_theta": config.rope_parameters["rope_theta"], "rms_norm_eps": config.rms_norm_eps,
        "max_sequence_length": config.max_position_embeddings, "attention_dropout": config.attention_dropout,
        "weight_tying": bool(config.tie_word_embeddings), "mask_token_id": getattr(config, "mask_token_id", None),
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
    }


def hf_name(name: str) -> str:
    """Our name for a LLaDA tensor: `model.transformer.blocks.3.ff_proj.weight` -> `model.layers.3.mlp.gate_proj.weight`."""
    rest = name.removeprefix(LLADA_PREFIX)
    parts = rest.split(".")
    prefixed = rest != name
    if prefixed and len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if prefixed and len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise UserError(f"unexpected tensor {name!r} in a LLaDA checkpoint")


def llada_name(name: str) -> str:
    """LLaDA's parameter name for one of ours (the inverse of `hf_name`)."""
    for llada, ours in TOP_NAMES.items():
        if name.startswith(ours + "."):
            return f"{LLADA_PREFIX}{llada}{name[len(ours):]}"
    for llada, ours in BLOCK_NAMES.items():
        head, sep, tail = name.partition(f".{ours}.")
        if sep and head.startswith("model.layers.") and head[len("model.layers."):].isdigit():
            return f"{LLADA_PREFIX}blocks.{head[len('model.layers.'):]}.{llada}.{tail}"
    raise UserError(f"parameter {name!r} has no LLaDA counterpart")


def llada_state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LLaDA state dict to our Llama names (tensors are shared, not copied)."""
    return {hf_name(k): v for k, v in state.items()}
