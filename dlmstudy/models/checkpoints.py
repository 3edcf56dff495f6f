"""Saving and loading checkpoints: dlmstudy folders, LLaDA's original layout, and HF Qwen2 / Llama folders.

A dlmstudy checkpoint is a transformers model folder plus `dlmstudy.json` naming the arm (so the
right objective and sampler follow the weights). LLaDA-8B folders keep LLaDA's own config keys and
tensor names; they are renamed onto our Llama classes. Loading never runs code from the folder: configs
are read as JSON into classes transformers ships (a model type only the folder's code defines is refused),
`trust_remote_code=False` everywhere, so transformers never asks to run code; a tokenizer class only the
folder defines is refused; weights come from safetensors, or `torch.load(weights_only=True)`. Every file of a
folder is checked whole before loading (`checkpoint_problem`): a damaged checkpoint is one line, not a traceback.
"""

from __future__ import annotations

import json
import struct
import zipfile
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


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes: the header must parse
    and the bytes it describes must be all there (a file cut short is caught without reading a tensor)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "cut short (no header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"cut short ({size:,} bytes, its header alone needs {n + 8:,})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not readable"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and "data_offsets" in t]
    need = 8 + n + max(ends, default=0)
    return f"cut short ({size:,} of {need:,} bytes)" if size < need else None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive (its directory is at the end, so a file cut short has none); older files are
    a pickle."""
    with path.open("rb") as f:
        magic = f.read(2)
    if magic == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"not a whole archive ({err})"
        return None
    return None if magic[:1] == b"\x80" else "neither a torch archive nor a pickle"


def checkpoint_problem(path: str | Path) -> str | None:
    """What is damaged in a model or Trainer checkpoint folder, as 'file: what' (None when every file checked is
    whole): safetensors cut short, torch files that are not whole archives, JSON that does not parse, shards its
    index names that are missing."""
    path = Path(path)
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.stat().st_size == 0 and file.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"):
            return f"{file.name}: empty"
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        elif file.suffix in (".bin", ".pt", ".pth"):
            problem = _torch_file_problem(file)
        elif file.suffix == ".json":
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError):
                return f"{file.name}: not readable JSON"
            shards = data.get("weight_map", {}).values() if file.name.endswith(".index.json") else []
            missing = sorted(set(shards) - {p.name for p in path.iterdir()})
            problem = f"shard {missing[0]} is missing" if missing else None
        else:
            continue
        if problem:
            return f"{file.name}: {problem}"
    return None


def check_whole(path: str | Path) -> None:
    """A UserError (one line) when a checkpoint folder is damaged: loading it would fail or read wrong weights."""
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"{path}: damaged checkpoint: {problem}")


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
    check_whole(path)
    refuse_tokenizer_code(path)
    arm = read_arm(path)
    config = hf_config_from_json(path)  # a model type transformers ships: never code from the folder
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="sdpa",
                                                 trust_remote_code=False).to(device).eval()
    tokenizer = read_tokenizer(path)
    if tokenizer is None:
        raise UserError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
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


def refuse_tokenizer_code(path: str | Path) -> None:
    """A UserError when a tokenizer folder names a tokenizer class that only its own code defines (`auto_map`
    without a class transformers ships): dlmstudy never runs code from a folder, and substituting another class
    could tokenize differently."""
    import transformers

    config = Path(path) / "tokenizer_config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{config}: not readable JSON") from None
    auto = (raw.get("auto_map") or {}) if isinstance(raw, dict) else {}
    wanted = auto.get("AutoTokenizer") if isinstance(auto, dict) else None
    shipped = hasattr(transformers, str(raw.get("tokenizer_class")))
    if wanted and not shipped:
        named = next((c for c in (wanted if isinstance(wanted, list) else [wanted]) if c), wanted)
        raise UserError(f"{config}: its tokenizer is code in the folder ({named}); dlmstudy never runs code from "
                        "an input folder (use a tokenizer transformers ships, e.g. tokenizer.json)")


def read_tokenizer(path: str | Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has no tokenizer files."""
    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    refuse_tokenizer_code(path)
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
    layout = detect_layout(path)
    check_whole(path)
    refuse_tokenizer_code(path)
    arm = folder_arm(path)
    if layout == "llada":
        model = load_llada_original(path, device=device, dtype=dtype)
    else:
        config = hf_config_from_json(path)  # a model type transformers ships: never code from the folder
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, attn_implementation="sdpa", trust_remote_code=False, output_loading_info=True, **kwargs)
        for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if info.get(problem):
                raise UserError(f"{path}: {problem.replace('_', ' ')}: {sorted(info[problem])[0]}")
    return model.to(device).eval(), read_tokenizer(path), arm
