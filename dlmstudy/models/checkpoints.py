"""Saving and loading checkpoints: dlmstudy folders, LLaDA's original layout, and HF Qwen2 / Llama folders.

A dlmstudy checkpoint is a transformers model folder plus `dlmstudy.json` naming the arm (so the
right objective and sampler follow the weights). LLaDA-8B folders keep LLaDA's own config keys and
tensor names; they are renamed onto our Llama classes. Loading never runs code from the folder (no
trust_remote_code); weights come from safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from dlmstudy.errors import UserError
from dlmstudy.models.llada import is_llada_config, llada_config_from_json, llada_name, llada_state_dict_to_hf, read_json
from dlmstudy.models.qwen import backbone_of, hf_config_from_json
from dlmstudy.models.registry import Arm, get_arm

META_FILE = "dlmstudy.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def save_checkpoint(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, arm: Arm) -> None:
    """Write model (safetensors), tokenizer and the arm's name to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / META_FILE).write_text(json.dumps({"arm": arm.name}, indent=2))


def read_arm(path: str | Path) -> Arm:
    """The arm recorded in a checkpoint folder."""
    meta = Path(path) / META_FILE
    if not meta.exists():
        raise UserError(f"{path}: not a dlmstudy checkpoint (no {META_FILE})")
    return get_arm(json.loads(meta.read_text())["arm"])


def load_checkpoint(path: str | Path, *, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Arm]:
    """Load (model, tokenizer, arm) from a dlmstudy checkpoint folder, in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint folder not found: {path}")
    arm = read_arm(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, arm


def detect_layout(path: str | Path) -> str:
    """"dlmstudy" (has dlmstudy.json), "llada" (LLaDA's original config.json) or "hf" (Qwen2 / Llama)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    if (path / META_FILE).exists():
        return "dlmstudy"
    if not (path / "config.json").exists():
        raise UserError(f"{path}: no config.json, not a model folder")
    raw, _ = read_json(path)
    if is_llada_config(raw):
        return "llada"
    hf_config_from_json(raw)  # refuses model types we have no classes for
    return "hf"


def read_state_dict(path: str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a model folder onto `device`: (sharded) safetensors, else pytorch_model.bin read weights-only."""
    path = Path(path)
    for index_name, single, load in (
        ("model.safetensors.index.json", "model.safetensors", lambda f: load_file(f, device=device)),
        ("pytorch_model.bin.index.json", "pytorch_model.bin",
         lambda f: torch.load(f, map_location=device, weights_only=True, mmap=True)),
    ):
        if (path / index_name).exists():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).exists():
                    raise UserError(f"{path}: shard {shard} named in {index_name} is missing")
                state.update(load(path / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise UserError(f"{path}: tensor {missing[0]!r} named in {index_name} is not in its shard")
            return state
        if (path / single).exists():
            return load(path / single)
    raise UserError(f"{path}: no weights (model.safetensors, its index, or pytorch_model.bin)")


def load_llada_original(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        ) -> PreTrainedModel:
    """A LLaDA folder (original config keys and tensor names) as our bidirectional Llama model on `device`."""
    path = Path(path)
    config = llada_config_from_json(path / "config.json")
    state = llada_state_dict_to_hf(read_state_dict(path, device=device))
    return model_from_state(config, state, dtype, source=path, original_name=llada_name).to(device)


def model_from_state(config: PretrainedConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                     *, source: Path, original_name: Callable[[str], str]) -> PreTrainedModel:
    """Build the model without allocating weights, then adopt `state`'s tensors (exact names and shapes; cast to
    `dtype` when given); a tensor missing, unexpected or of the wrong shape is a UserError naming it as
    `original_name` does and `source`."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    expected = dict(model.named_parameters())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{source}: tensor {original_name(missing[0])!r} is missing")
    for name, tensor in state.items():
        if name not in expected:
            raise UserError(f"{source}: unexpected tensor {original_name(name)!r}")
        if tensor.shape != expected[name].shape:
            raise UserError(f"{source}: tensor {original_name(name)!r} has shape {tuple(tensor.shape)}, "
                            f"the config gives {tuple(expected[name].shape)}")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.dtype = model.model.embed_tokens.weight.dtype  # so a re-saved copy reloads in the same precision
    return model


def read_tokenizer(path: str | Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has no tokenizer files."""
    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot load its tokenizer without running its code ({err})") from None


def arm_for(config: PretrainedConfig) -> Arm:
    """The 2x2 arm a plain model folder belongs to: backbone from model_type, objective from `is_causal`."""
    causal = getattr(config, "is_causal", True)
    return get_arm(f"{backbone_of(config)}-{'ar' if causal else 'mdm'}")


def folder_arm(path: str | Path) -> Arm:
    """The arm of a model folder from its metadata alone, before any weights load."""
    layout = detect_layout(path)
    if layout == "llada":
        return get_arm("llada-mdm")
    return read_arm(path) if layout == "dlmstudy" else arm_for(hf_config_from_json(path))


def load_pretrained(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, Arm]:
    """(model, tokenizer or None, arm) from a dlmstudy, original-LLaDA or HF Qwen2/Llama folder, in eval mode."""
    path = Path(path)
    layout, arm = detect_layout(path), folder_arm(path)
    if layout == "llada":
        model = load_llada_original(path, device=device, dtype=dtype)
    else:
        config = None if layout == "dlmstudy" else hf_config_from_json(path)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, attn_implementation="sdpa", trust_remote_code=False, output_loading_info=True, **kwargs)
        for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if info.get(problem):
                raise UserError(f"{path}: {problem.replace('_', ' ')}: {sorted(info[problem])[0]}")
    return model.to(device).eval(), read_tokenizer(path), arm
