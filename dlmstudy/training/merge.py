"""Merging a LoRA adapter into its base model: a plain checkpoint that loads without peft.

The tutorial's command, `merge-lora --lora_path P --base_model_path B --merge_path M`: the base may be
a dlmstudy checkpoint, an original LLaDA folder or an HF Qwen2 / Llama folder. The merged folder has
safetensors weights, the base's dlmstudy.json (or one naming the base's arm) and the tokenizer.

An adapter made for another model is refused before anything is merged (peft would skip the modules the base
lacks with a warning, and fail on a shape with a traceback): every tensor of the adapter must name a module of
the base with matching shapes, and the base the adapter names, where that folder is here, must have the given
base's shape.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from dlmstudy.errors import UserError
from dlmstudy.models.checkpoints import (META_FILE, check_whole, detect_layout, load_pretrained, read_tokenizer,
                                         save_checkpoint)
from dlmstudy.models.llada import llada_config_from_json
from dlmstudy.models.qwen import hf_config_from_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LORA_TENSOR = re.compile(r"(?P<module>.+)\.lora_(?P<side>A|B)(?:\.[^.]+)?\.weight$")
# config.json keys that fix a model's shapes
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size", "embedding_size")


def adapter_shapes(lora_path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the adapter folder and its shape, named as in the base model (peft's prefix removed)."""
    from safetensors import safe_open

    weights = next((lora_path / n for n in ADAPTER_WEIGHTS if (lora_path / n).exists()), None)
    if weights is None:
        raise UserError(f"{lora_path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if weights.suffix == ".safetensors":
        with safe_open(weights, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        shapes = {k: tuple(v.shape) for k, v in torch.load(weights, map_location="meta", weights_only=True).items()}
    return {k.removeprefix("base_model.model."): v for k, v in shapes.items()}


def _shape_config(folder: Path) -> dict:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: raw[k] for k in SHAPE_KEYS if k in raw}


def base_shapes(base_model_path: Path) -> dict[str, tuple[int, ...]]:
    """The base's parameter names and shapes, from its config alone (built on the meta device: no weights read)."""
    from transformers import AutoModelForCausalLM

    if detect_layout(base_model_path) == "llada":
        config = llada_config_from_json(base_model_path / "config.json")
    else:
        config = hf_config_from_json(base_model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def check_adapter(lora_path: Path, base_model_path: Path) -> None:
    """A UserError (one line) when the adapter in `lora_path` was not made for the model in `base_model_path`."""
    check_whole(lora_path)
    config = json.loads((lora_path / ADAPTER_CONFIG).read_text())
    named = config.get("base_model_name_or_path")
    if named and Path(named).is_dir() and Path(named).resolve() != base_model_path.resolve():
        theirs, ours = _shape_config(Path(named)), _shape_config(base_model_path)
        differ = [k for k in SHAPE_KEYS if k in theirs and k in ours and theirs[k] != ours[k]]
        if differ:
            raise UserError(f"{lora_path}: the adapter was made for {named} ({differ[0]} {theirs[differ[0]]}), not "
                            f"for {base_model_path} ({differ[0]} {ours[differ[0]]})")
    params = base_shapes(base_model_path)
    for name, shape in adapter_shapes(lora_path).items():
        lora = LORA_TENSOR.match(name)
        target = f"{lora['module']}.weight" if lora else name
        if target not in params:
            raise UserError(f"{lora_path}: the adapter's {name} has no {target} in {base_model_path} "
                            "(an adapter of another model)")
        if lora is None:
            theirs, ours, what = shape, params[target], "has shape"
        elif lora["side"] == "A":  # (r, in features)
            theirs, ours, what = shape[1], params[target][1], "takes inputs of"
        else:  # (out features, r)
            theirs, ours, what = shape[0], params[target][0], "gives outputs of"
        if theirs != ours:
            raise UserError(f"{lora_path}: the adapter's {name} {what} {theirs}, {target} in {base_model_path} "
                            f"{ours} (an adapter of another model)")


def merge_lora(lora_path: str | Path, base_model_path: str | Path, merge_path: str | Path) -> Path:
    """Fold the adapter in `lora_path` into the model in `base_model_path`; write the result to `merge_path`."""
    lora_path, base_model_path, merge_path = Path(lora_path), Path(base_model_path), Path(merge_path)
    if not (lora_path / ADAPTER_CONFIG).exists():
        raise UserError(f"{lora_path}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if merge_path.resolve() in (lora_path.resolve(), base_model_path.resolve()):
        raise UserError(f"merge path {merge_path} must differ from the adapter and base model folders")
    if merge_path.exists() and any(merge_path.iterdir()):
        raise UserError(f"merge path {merge_path} exists and is not empty; remove it or choose another")
    check_adapter(lora_path, base_model_path)
    base, tokenizer, arm = load_pretrained(base_model_path)
    tokenizer = tokenizer or read_tokenizer(lora_path)
    if tokenizer is None:
        raise UserError(f"no tokenizer in {base_model_path} or {lora_path}; the merged checkpoint needs one")
    merged = PeftModel.from_pretrained(base, lora_path).merge_and_unload()
    tmp = merge_path.with_name(merge_path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, merged, tokenizer, arm)
    if (base_model_path / META_FILE).exists():
        shutil.copyfile(base_model_path / META_FILE, tmp / META_FILE)
    if merge_path.exists():
        merge_path.rmdir()
    tmp.replace(merge_path)
    return merge_path
