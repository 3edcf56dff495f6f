"""`dlmstudy import-dllm`: a dllm (or LLaDA tutorial) training YAML turned into a study spec.

dllm's YAMLs are flat: ModelArguments, DataArguments and transformers' TrainingArguments side by side,
for one model and one stage. Each key is mapped to where the study sets it, or dropped with the reason,
and every decision is one line. The stage is pretraining unless the file has LoRA keys or `--stage sft`:
then `model_name_or_path` is the SFT base and the spec's pretraining grid is a placeholder (run the SFT
stage alone with `--only stage=sft`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dlmstudy.errors import UserError

STAGES = ("auto", "pretrain", "sft")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
LORA_KEYS = ("lora", "target_modules", "r", "lora_alpha", "lora_dropout")
# The tutorial's "about 500 tokens per document" of C4, as studies/tutorial.yaml counts it (1,000,000 documents
# -> 524,288,000 tokens: whole 1024-token sequences).
TOKENS_PER_DOCUMENT = 524
SFT_PLACEHOLDER_GRID = {"unique_tokens": [65536], "epochs": [1]}
# TrainingArguments the study decides itself, and why (the rest pass through under training: or sft:)
DECIDED = {
    "output_dir": "each run writes runs/<study>/<run_id>/ (the id: a label and a hash of its config)",
    "overwrite_output_dir": "a run folder is never overwritten: a finished run is skipped, a killed one resumes",
    "logging_dir": "logs go to the run folder (scalars.jsonl, swanlog/)",
    "eval_strategy": "dlmstudy evaluates every training.eval_every steps (pretraining) and after every epoch (SFT)",
    "evaluation_strategy": "dlmstudy evaluates every training.eval_every steps (pretraining) and after every epoch "
                           "(SFT)",
    "save_strategy": "checkpoints every save_steps steps, each marked complete once written",
    "dataloader_num_workers": "batches are built in the training process (0 workers) so both arms see the same order",
    "remove_unused_columns": "dlmstudy's collators need every column",
    "resume_from_checkpoint": "a killed run resumes from its last complete checkpoint by itself",
    "do_train": "every run trains", "do_eval": "every run evaluates",
    "push_to_hub": "nothing leaves the machine", "hub_model_id": "nothing leaves the machine",
}


# dllm keys by stage: (pretraining target, SFT target); "- reason" drops the key for that stage
STAGE_KEYS = {
    **{key: ("- LoRA is for the SFT stage (sft.lora)", f"sft.{key}") for key in LORA_KEYS},
    "dataset_args": ("data.pretrain.source", "sft.source"),
    "text_field": ("data.pretrain.text_field", "- SFT rows are Alpaca's (instruction, input, output)"),
    "streaming": ("- sources are always read lazily, tokenized once and cached under runs/<study>/_cache/",) * 2,
    "num_proc": ("data.num_proc",) * 2,
    "drop_tail": ("data.drop_tail", "- SFT rows are whole conversations"),
    "insert_eos": ("data.insert_eos", "- SFT rows are whole conversations"),
    "max_length": ("data.max_length", "sft.max_length"),
    "load_preprocessed_data": ("- dlmstudy tokenizes pretraining text with the study's one tokenizer and caches it",
                               "sft.load_preprocessed_data"),
    "random_length_ratio": ("training.random_length_ratio", "- LLaDA's random lengths are a pretraining setting"),
    "mask_prompt_loss": ("- no prompts in pretraining", "- the SFT loss is taken on answer tokens only"),
    "seed": ("seed",) * 2,
    "eval_steps": ("training.eval_every", "- SFT evaluates after every epoch"),
    "per_device_eval_batch_size": ("evaluation.batch_size",) * 2,
}


@dataclass
class Imported:
    """A study spec from a dllm YAML and one line per key of that YAML: where it went, or why it was dropped."""

    spec: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    stage: str = "pretrain"

    def text(self, source: str | Path) -> str:
        """The spec as YAML, headed by the mapping lines as comments."""
        head = [f"# Imported from {source} by `dlmstudy import-dllm` ({self.stage} stage):"]
        head += [f"#   {line}" for line in self.lines]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.spec, sort_keys=False, allow_unicode=True)


def _set(spec: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        spec = spec.setdefault(key, {})
    spec[last] = value


def _documents(dataset_args: str) -> int | None:
    """N of a `path[train:N,...]` slice (dllm's syntax, underscores allowed), else None."""
    match = re.search(r"\[[^\]]*\btrain:([\d_]+)", dataset_args or "")
    return int(match.group(1).replace("_", "")) if match else None


def _name(raw: dict[str, Any], source: Path) -> str:
    """A study name from run_name (else the file's name): letters, digits, '_', '-' and '.' only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw.get("run_name") or source.stem)).strip("-") or "imported"


def _model_folder(path: str, source: Path) -> Path | None:
    """The model folder as given (relative to the working directory, else to the YAML's folder), if it exists."""
    for candidate in (Path(path), source.parent / path):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _arm_of(path: str, folder: Path | None) -> tuple[str, str]:
    """(arm, how it was told) of model_name_or_path: its config.json's kind, else its name."""
    if folder is not None:
        from dlmstudy.models.llada import is_llada_config, read_json

        raw, _ = read_json(folder / "config.json")
        if is_llada_config(raw):
            return "llada", "its config.json is LLaDA's"
        if raw.get("model_type") == "qwen2":
            return "qwen", "its config.json is Qwen2's"
        raise UserError(f"{folder}/config.json: model_type {raw.get('model_type')!r} is neither LLaDA nor Qwen2; "
                        "pass --arms")
    lowered = path.lower()
    for arm in ("llada", "qwen"):
        if arm in lowered:
            return arm, f"the name says {arm}"
    raise UserError(f"model_name_or_path {path}: no config.json there and the name says neither llada nor qwen; "
                    "pass --arms")


def _shape(folder: Path) -> dict[str, Any]:
    """The spec's `model:` keys from a LLaDA or Qwen2 config.json."""
    from dlmstudy.runners.bench import config_from_path

    size = config_from_path(folder / "config.json").size
    shape = {"hidden_size": size.hidden_size, "num_layers": size.num_layers, "num_heads": size.num_heads,
             "intermediate_size": size.intermediate_size, "rope_theta": size.rope_theta,
             "rms_norm_eps": size.rms_norm_eps, "tie_word_embeddings": size.tie_word_embeddings}
    if size.num_kv_heads not in (None, size.num_heads):
        shape["num_kv_heads"] = size.num_kv_heads
    return shape


def import_dllm(path: str | Path, *, stage: str = "auto", arms: list[str] | None = None,
                tokens_per_document: int = TOKENS_PER_DOCUMENT) -> Imported:
    """The study spec for a dllm training YAML, with a line for every key it maps or drops."""
    from transformers import TrainingArguments

    from dlmstudy.study.names import ALIASES
    from dlmstudy.study.spec import parse_spec
    from dlmstudy.study.training_args import SFT_SETS, STUDY_SETS

    source = Path(path)
    if not source.is_file():
        raise UserError(f"dllm config not found: {source}")
    try:
        raw = yaml.safe_load(source.read_text())
    except yaml.YAMLError:
        raise UserError(f"{source}: is not valid YAML") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{source}: expected a mapping of dllm settings (ModelArguments, DataArguments, "
                        "TrainingArguments)")
    if stage not in STAGES:
        raise UserError(f"--stage {stage}: use one of {', '.join(STAGES)}")
    if tokens_per_document < 1:
        raise UserError(f"--tokens_per_document must be >= 1, got {tokens_per_document}")
    if stage == "auto":
        stage = "sft" if any(k in raw for k in LORA_KEYS) else "pretrain"
    sft = stage == "sft"
    out = Imported({"name": _name(raw, source)}, stage=stage)
    lines = out.lines
    spec = out.spec
    section = "sft" if sft else "training"
    hf = {f.name for f in fields(TrainingArguments)}

    def mapped(key: str, where: str, value: Any = ..., note: str = "") -> None:
        _set(spec, where, raw[key] if value is ... else value)
        lines.append(f"{key} -> {where}" + (f" ({note})" if note else ""))

    def dropped(key: str, why: str) -> None:
        lines.append(f"{key}: dropped, {why}")

    model = raw.get("model_name_or_path")
    folder = _model_folder(str(model), source) if model else None
    if model:
        arm, told = _arm_of(str(model), folder)
        spec["arms"] = arms or [arm]
        if sft:
            mapped("model_name_or_path", f"sft.base.{arm}", note=f"the {arm} arm's SFT base; {told}")
        elif folder is not None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            lines.append(f"model_name_or_path: arm {arm} ({told}); {folder} holds no tokenizer files, so the spec "
                         "keeps its own BPE tokenizer: set tokenizer.path to the model's tokenizer folder")
        else:
            mapped("model_name_or_path", "tokenizer.path", note=f"dllm loads the tokenizer from the model folder; "
                   f"arm {arm}: {told}")
            spec["tokenizer"] = {"kind": "pretrained", "path": str(model)}
        if not sft:
            if folder is not None:
                spec["model"] = _shape(folder)
                lines.append(f"model: the shape of {folder / 'config.json'} (every arm shares it)")
            else:
                lines.append(f"model: {model}/config.json not found here: set model: (hidden_size, num_layers, "
                             "num_heads, intermediate_size) from it")
    elif arms:
        spec["arms"] = arms
    if arms:
        lines.append(f"arms: {', '.join(arms)} (--arms)")

    steps = raw.get("max_steps")
    epochs = raw.get("num_train_epochs")
    # key -> (pretraining target, SFT target); None: dropped for that stage, with the reason
    for key, value in raw.items():
        if key in ("model_name_or_path", "max_steps", "num_train_epochs"):
            continue
        if key in STAGE_KEYS:
            target = STAGE_KEYS[key][1 if sft else 0]
            if target.startswith("-"):
                dropped(key, target[1:].strip())
            else:
                mapped(key, target)
        elif key == "run_name":
            lines.append(f"run_name -> name ({spec['name']}; each run's id starts with its arm and grid point)")
        elif key == "report_to":
            targets = [value] if isinstance(value, str) else list(value or [])
            if "swanlab" in targets:
                mapped(key, "tracking.report_to", "swanlab", "offline unless SWANLAB_MODE or tracking.mode: "
                       "online; SWANLAB_PROJECT names the project")
            elif set(targets) <= {"none"}:
                mapped(key, "tracking.report_to", "none")
            else:
                dropped(key, f"dlmstudy tracks with SwanLab only (and scalars.jsonl), not {', '.join(targets)}")
        elif key in DECIDED:
            dropped(key, DECIDED[key])
        elif key in (SFT_SETS if sft else STUDY_SETS):
            dropped(key, (SFT_SETS if sft else STUDY_SETS)[key])
        elif (section, key) in ALIASES:
            mapped(key, f"{section}.{key}", note=f"read as {ALIASES[section, key][1]}, today's TrainingArguments name")
        elif key in hf:
            mapped(key, f"{section}.{key}")
        else:
            dropped(key, "not a dllm or TrainingArguments setting dlmstudy knows")

    if sft:
        if epochs is not None:
            mapped("num_train_epochs", "sft.epochs", [max(1, round(float(epochs)))], "whole epochs, each evaluated")
        else:
            lines.append("sft.epochs: [1], the spec's default (the file sets no num_train_epochs)")
        if steps is not None:
            dropped("max_steps", "SFT trains whole epochs (sft.epochs; the tutorial advises num_train_epochs too)")
        spec["grid"] = dict(SFT_PLACEHOLDER_GRID)
        lines.append("grid: a placeholder the spec requires (this file trains no pretraining run): run "
                     "`dlmstudy run FILE --only stage=sft`")
    else:
        spec["grid"] = _grid(raw, steps, epochs, tokens_per_document, lines)
    try:
        parse_spec(spec, source)
    except UserError as err:
        raise UserError(f"{source}: the imported spec does not load: {err}") from None
    return out


def _grid(raw: dict[str, Any], steps: Any, epochs: Any, tokens_per_document: int, lines: list[str]) -> dict:
    """The pretraining grid point of the YAML: from max_steps (as transformers, it wins over epochs), else from the
    train:N documents of dataset_args x tokens per document, for num_train_epochs (default 1)."""
    length = raw.get("max_length", 1024)
    if steps is not None and steps > 0:
        batch = raw.get("per_device_train_batch_size", 8) * raw.get("gradient_accumulation_steps", 1)
        tokens = steps * batch * length
        lines.append(f"max_steps -> grid: unique_tokens [{tokens:,}] = {steps} steps x {batch} sequences x "
                     f"{length} tokens (one device), epochs [1]")
        if epochs is not None:
            lines.append("num_train_epochs: dropped, max_steps wins (as in transformers)")
        return {"unique_tokens": [tokens], "epochs": [1]}
    documents = _documents(raw.get("dataset_args", ""))
    if documents is None:
        raise UserError("cannot size the grid: give max_steps, or num_train_epochs with a dataset_args "
                        "slice [train:N,...] (then --tokens_per_document)")
    tokens = documents * tokens_per_document
    lines.append(f"dataset_args train:{documents:,} -> grid.unique_tokens [{tokens:,}] = {documents:,} documents x "
                 f"{tokens_per_document} tokens per document (an estimate, --tokens_per_document; counted "
                 "exactly once tokenized)")
    value = 1 if epochs is None else epochs
    lines.append(f"num_train_epochs -> grid.epochs [{value}]" if epochs is not None else
                 "grid.epochs [1]: the file sets neither max_steps nor num_train_epochs")
    return {"unique_tokens": [tokens], "epochs": [value]}
