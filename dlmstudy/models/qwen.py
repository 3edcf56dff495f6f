"""Transformers-native config.json files (Qwen2 / Qwen2.5, Llama) read with transformers' own classes.

These layouts need no renaming: the Qwen arm is transformers' Qwen2 model. Only model types whose
classes ship with transformers are accepted, so no code from a folder is ever run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from dlmstudy.errors import UserError
from dlmstudy.models.llada import read_json

# model_type in config.json -> (transformers config class, our backbone name)
HF_MODEL_TYPES: dict[str, tuple[type[PretrainedConfig], str]] = {
    "qwen2": (Qwen2Config, "qwen"),
    "llama": (LlamaConfig, "llada"),
}


def hf_config_from_json(path_or_dict: str | Path | dict[str, Any]) -> PretrainedConfig:
    """A Qwen2 or Llama config from its config.json (a file, its folder, or the loaded dict)."""
    raw, name = read_json(path_or_dict)
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        known = ", ".join(sorted(HF_MODEL_TYPES))
        code = " (its auto_map names model code in the folder, which dlmstudy never runs)" if "auto_map" in raw else ""
        raise UserError(f"{name}: model_type {model_type!r} is not supported{code} (known: {known}, or a LLaDA config)")
    config_class, _ = HF_MODEL_TYPES[model_type]
    return config_class.from_dict({k: v for k, v in raw.items() if k != "auto_map"})


def qwen2_config_from_json(path_or_dict: str | Path | dict[str, Any]) -> Qwen2Config:
    """A Qwen2 config (Qwen2 and Qwen2.5 share it) from its config.json; other model types are refused."""
    config = hf_config_from_json(path_or_dict)
    if not isinstance(config, Qwen2Config):
        raise UserError(f"expected a Qwen2 config.json, got model_type {config.model_type!r}")
    return config


def backbone_of(config: PretrainedConfig) -> str:
    """Our backbone name for a transformers config ("qwen" or "llada")."""
    if config.model_type not in HF_MODEL_TYPES:
        raise UserError(f"model_type {config.model_type!r} has no dlmstudy backbone")
    return HF_MODEL_TYPES[config.model_type][1]
