"""Merging a LoRA adapter into its base model: a plain checkpoint that loads without peft.

The tutorial's command, `merge-lora --lora_path P --base_model_path B --merge_path M`: the base may be
a dlmstudy checkpoint, an original LLaDA folder or an HF Qwen2 / Llama folder. The merged folder has
safetensors weights, the base's dlmstudy.json (or one naming the base's arm) and the tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import PeftModel

from dlmstudy.errors import UserError
from dlmstudy.models.checkpoints import META_FILE, load_pretrained, read_tokenizer, save_checkpoint

ADAPTER_CONFIG = "adapter_config.json"


def merge_lora(lora_path: str | Path, base_model_path: str | Path, merge_path: str | Path) -> Path:
    """Fold the adapter in `lora_path` into the model in `base_model_path`; write the result to `merge_path`."""
    lora_path, base_model_path, merge_path = Path(lora_path), Path(base_model_path), Path(merge_path)
    if not (lora_path / ADAPTER_CONFIG).exists():
        raise UserError(f"{lora_path}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if merge_path.resolve() in (lora_path.resolve(), base_model_path.resolve()):
        raise UserError(f"merge path {merge_path} must differ from the adapter and base model folders")
    if merge_path.exists() and any(merge_path.iterdir()):
        raise UserError(f"merge path {merge_path} exists and is not empty; remove it or choose another")
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
