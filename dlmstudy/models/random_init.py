"""Model folders with a real config and random weights, laid out as the releases are (safetensors shards + index).

For smoke-testing a machine before downloading weights: loading, memory and speed, never quality.
LLaDA-8B's config (its original layout) and Qwen2.5-7B's ship with the package (`MODEL_CONFIGS`).
Each tensor is drawn on the target device in the target dtype and written shard by shard, so neither
the device nor the host ever holds the whole model: the host holds one shard at a time.

Initialisation: every matrix (linear layers, embedding, head) ~ N(0, std) with the config's
`initializer_range` (Qwen2, Llama) or `init_std` (LLaDA), default 0.02; RMSNorm weights 1; biases 0.
The draws come from one generator seeded with `seed` on the device, in the model's parameter order,
so `random_model` (the same weights in memory, for `dlmstudy bench`) equals a written folder's model
when both use one device and seed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from dlmstudy.errors import UserError
from dlmstudy.models.checkpoints import model_from_state
from dlmstudy.models.llada import hf_name, is_llada_config, llada_name, read_json
from dlmstudy.models.params import config_from_json

# Configs shipped with the package: name -> what it is.
MODEL_CONFIGS = {
    "llada-8b": "LLaDA-8B-Base's config.json (original LLaDA layout; auto_map left out: no code ships)",
    "qwen2.5-7b": "Qwen2.5-7B's config.json",
}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


def model_config_path(name_or_path: str | Path) -> Path:
    """A shipped config by name (`llada-8b`, `qwen2.5-7b`), else the path given (a config.json or its folder)."""
    if str(name_or_path) in MODEL_CONFIGS:
        return Path(str(resources.files("dlmstudy") / "models" / "configs" / f"{name_or_path}.json"))
    path = Path(name_or_path)
    if not path.exists():
        raise UserError(f"config {name_or_path!r}: no such file; use a config.json or one of "
                        f"{', '.join(MODEL_CONFIGS)}")
    return path


def parse_dtype(name: str) -> torch.dtype:
    """bf16, fp16 or fp32 (or their torch names) as a torch dtype."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use bf16, fp16 or fp32")
    return DTYPES[name]


def parse_size(size: str | int) -> int:
    """Bytes of a size such as 5GB, 500MB, 2GiB or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserError(f"shard size {size!r}: use a positive size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def folder_tensors(raw: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a folder of this config.json holds, in the model's order, named as the
    folder names them (LLaDA's original names for its layout); a tied head is stored once, as the embedding."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_from_json(raw))
    rename = llada_name if is_llada_config(raw) else str
    return [(rename(name), tuple(p.shape)) for name, p in model.named_parameters()]


def init_std(raw: dict[str, Any]) -> float:
    """The standard deviation of the random matrices: the config's own initialisation scale, else 0.02."""
    return float(raw.get("initializer_range") or raw.get("init_std") or 0.02)


def random_tensors(tensors: list[tuple[str, tuple[int, ...]]], *, std: float, dtype: torch.dtype, device: str,
                   seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor drawn in turn on `device` in `dtype`: matrices N(0, std), vectors 1 (norm weights) or 0 (biases)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape in tensors:
        out = torch.empty(shape, dtype=dtype, device=device)
        if len(shape) > 1:
            out.normal_(0.0, std, generator=generator)
        else:
            out.fill_(0.0 if name.endswith(".bias") else 1.0)
        yield name, out


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    size = 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        if not shards or (shards[-1] and size + n > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _config_json(raw: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The config as given; a transformers config also names the weights' dtype (so "auto" loads them as stored)."""
    if is_llada_config(raw):
        return dict(raw)
    key = "dtype" if "dtype" in raw and "torch_dtype" not in raw else "torch_dtype"
    return {**raw, key: str(dtype).removeprefix("torch.")}


def write_random_folder(config: str | Path | dict[str, Any], out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                        shard_size: str | int = "5GB", device: str = "cpu", seed: int = 0,
                        tokenizer: PreTrainedTokenizerBase | None = None,
                        progress: Callable[[str], None] = print) -> Path:
    """Write config.json, random weights (one model.safetensors, or shards and their index) and the tokenizer.

    The folder appears complete or not at all: it is written beside `out` and renamed into place.
    """
    raw, name = read_json(config)
    config_from_json(raw)  # refuses configs dlmstudy cannot load
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {out} exists and is not empty; remove it or choose another")
    max_bytes = parse_size(shard_size)
    tensors = folder_tensors(raw)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(tensors, itemsize, max_bytes)
    total = sum(math.prod(shape) for _, shape in tensors) * itemsize
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        draws = random_tensors(tensors, std=init_std(raw), dtype=dtype, device=device, seed=seed)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = WEIGHTS_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            part = {n: t.cpu() for n, t in (next(draws) for _ in shard)}
            save_file(part, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
            del part
            progress(f"{file}: {len(shard)} tensors written ({i}/{len(shards)})")
        if len(shards) > 1:
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        (tmp / "config.json").write_text(json.dumps(_config_json(raw, dtype), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def random_model(config: str | Path | dict[str, Any], *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> tuple[PreTrainedModel, PretrainedConfig]:
    """The model of a config.json with the weights `write_random_folder` would write, drawn directly on `device`
    (nothing is allocated twice: no init pass, no host copy); returns (model in eval mode, its config)."""
    raw, name = read_json(config)
    hf_config = config_from_json(raw)
    rename = hf_name if is_llada_config(raw) else str
    state = {rename(n): t for n, t in random_tensors(folder_tensors(raw), std=init_std(raw), dtype=dtype,
                                                     device=device, seed=seed)}
    model = model_from_state(hf_config, state, source=Path(name), original_name=str)
    return model.to(device).eval(), hf_config
