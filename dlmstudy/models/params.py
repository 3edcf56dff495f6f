"""Parameter counts, always reported twice: total and non-embedding (at ~100M the seed's models are ~90% embedding)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from dlmstudy.errors import UserError
from dlmstudy.models.backbones import BACKBONES, ModelSize
from dlmstudy.models.llada import is_llada_config, llada_config_from_json, read_json
from dlmstudy.models.qwen import hf_config_from_json


@dataclass(frozen=True)
class ParamCounts:
    """total = embedding + output_head + body; non_embedding = body (the output head is an embedding-sized matrix)."""

    total: int
    embedding: int
    output_head: int
    non_embedding: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_model(model: PreTrainedModel) -> ParamCounts:
    """Count a built model's parameters, separating input embedding and (untied) output head."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_n = 0 if head is None or head.weight is emb else head.weight.numel()
    return ParamCounts(total=total, embedding=emb.numel(), output_head=head_n,
                       non_embedding=total - emb.numel() - head_n)


def count_config(config: PretrainedConfig) -> ParamCounts:
    """Count parameters of a transformers config without allocating weights (meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_model(model)


def count_size(backbone: str, size: ModelSize, vocab_size: int) -> ParamCounts:
    """Closed-form count of `build_config(backbone, size, ...)`; Qwen2 adds q/k/v biases to the Llama block."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    d, head_dim = size.hidden_size, size.hidden_size // size.num_heads
    q_dim = size.num_heads * head_dim
    kv_dim = (size.num_kv_heads or size.num_heads) * head_dim
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d  # W_q, W_k, W_v, W_o
    if backbone == "qwen":
        attention += q_dim + 2 * kv_dim  # b_q, b_k, b_v
    mlp = 3 * d * size.resolved_intermediate()  # SwiGLU: gate, up, down
    body = size.num_layers * (attention + mlp + 2 * d) + d  # + two RMSNorm weights per layer, final norm
    embedding = vocab_size * d
    head = 0 if size.tie_word_embeddings else vocab_size * d
    return ParamCounts(total=embedding + head + body, embedding=embedding, output_head=head, non_embedding=body)


def config_from_json(source: str | Path | dict[str, Any]) -> PretrainedConfig:
    """Our transformers config for any supported config.json: LLaDA's original, Qwen2, or Llama."""
    raw, _ = read_json(source)
    return llada_config_from_json(source) if is_llada_config(raw) else hf_config_from_json(source)


def describe_config(source: str | Path | dict[str, Any] | PretrainedConfig) -> ParamCounts:
    """Parameter counts of a config.json (file, model folder or dict) or config, without allocating weights."""
    config = source if isinstance(source, PretrainedConfig) else config_from_json(source)
    return count_config(config)


def format_counts(counts: ParamCounts) -> str:
    """Four aligned lines (exact count, millions, share of total) for the `dlmstudy params` command."""
    rows = [("total", counts.total), ("embedding", counts.embedding),
            ("output head", counts.output_head), ("non-embedding", counts.non_embedding)]
    width = len(str(counts.total))
    return "\n".join(f"{label:<14} {n:>{width}d}  {n / 1e6:8.1f}M  {100 * n / max(counts.total, 1):5.1f}%"
                     for label, n in rows)
