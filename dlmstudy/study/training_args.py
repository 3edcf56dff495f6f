"""`training:` and `sft:` keys that are `transformers.TrainingArguments` names: checked when the spec loads.

Each value is checked against the TrainingArguments field's type (so `learning_rate: fast` or `1e-3` written as a
string is caught, or read as the number it spells), then against the range the name allows, and the whole set is
built into a TrainingArguments once, so its own checks run before any training. Names the study decides itself
are refused with where the spec sets them: a value there would be overwritten without a word.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from dlmstudy.study.names import where_instead

_PREDICTION_LOOP = "validation runs each arm's own loss (evaluation: settings), not the Trainer's prediction loop"

# Names the study sets for every run, and where a spec sets what they mean.
STUDY_SETS: dict[str, str] = {
    "num_train_epochs": "set by the data grid: give grid.epochs (or grid.total_tokens)",
    "report_to": "set tracking.report_to (swanlab or none)",
    "project": "set tracking.project",
    "run_name": "each run is named by its run id",
    "eval_strategy": "validation runs every training.eval_every steps (or eval_steps)",
    "save_strategy": "checkpoints are saved every save_steps steps",
    "seed": "set the study's top-level seed: (or seeds:)",
    "data_seed": "set data.seed (the study draws its batch order once per data setting)",
    "train_sampling_strategy": "batches come in the study's fixed order (data.seed)",
    "dataloader_num_workers": "batches are read from the packed token arrays in the training process "
                              "(data.num_proc sets the tokenization workers)",
    "remove_unused_columns": "the study's datasets hold only what the objectives read",
    "disable_tqdm": "dlmstudy shows its own progress bar",
    "use_cpu": "set device: cpu (or dlmstudy run --device cpu)",
    "local_rank": "set by dlmstudy run --num_processes",
    "output_dir": "runs are written to runs_dir/<study>/<run id>",
    "resume_from_checkpoint": "a run resumes from its last complete checkpoint by itself",
    "do_train": "every run trains and is evaluated",
    "do_eval": "every run trains and is evaluated",
    "do_predict": "every run trains and is evaluated",
    "per_device_eval_batch_size": "set evaluation.batch_size",
    "load_best_model_at_end": "the study reports the best and the final validation loss and keeps the final model",
    "metric_for_best_model": "the study reports the best and the final validation loss and keeps the final model",
    "greater_is_better": "the study reports the best and the final validation loss and keeps the final model",
    "label_smoothing_factor": "each arm's objective defines its loss",
    "torch_compile": "set training.compile (the study compiles the decoder itself)",
    "prediction_loss_only": _PREDICTION_LOOP,
    "eval_accumulation_steps": _PREDICTION_LOOP,
    "eval_do_concat_batches": _PREDICTION_LOOP,
    "eval_use_gather_object": _PREDICTION_LOOP,
    "batch_eval_metrics": _PREDICTION_LOOP,
    "include_for_metrics": _PREDICTION_LOOP,
    "bf16_full_eval": _PREDICTION_LOOP,
    "fp16_full_eval": _PREDICTION_LOOP,
}
# The SFT stage evaluates and saves after every epoch and counts its epochs in sft.epochs.
SFT_SETS: dict[str, str] = {
    **STUDY_SETS,
    "num_train_epochs": "set sft.epochs",
    "eval_steps": "SFT runs are evaluated after every epoch",
    "save_steps": "SFT runs save a checkpoint after every epoch",
}


def _at_least_1(v: float) -> bool:
    return v >= 1


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


# Ranges TrainingArguments leaves to fail (or silently misbehave) later, in training.
BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "per_device_train_batch_size": (_at_least_1, "at least 1"),
    "gradient_accumulation_steps": (_at_least_1, "at least 1"),
    "save_total_limit": (_at_least_1, "at least 1 (2 or more keeps a complete checkpoint through a kill)"),
    "dataloader_prefetch_factor": (_at_least_1, "at least 1"),
    "torch_empty_cache_steps": (_at_least_1, "at least 1"),
    "ddp_timeout": (_at_least_1, "at least 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (as many steps as the grid's tokens make) or at least 1"),
    "learning_rate": (_positive, "above 0"),
    "adam_epsilon": (_positive, "above 0"),
    "logging_steps": (_positive, "above 0 (below 1: a ratio of the run's steps)"),
    "eval_steps": (_positive, "above 0 (below 1: a ratio of the run's steps)"),
    "save_steps": (_positive, "above 0 (below 1: a ratio of the run's steps)"),
    "warmup_steps": (_non_negative, "at least 0 (below 1: a ratio of the run's steps)"),
    "weight_decay": (_non_negative, "at least 0"),
    "max_grad_norm": (_non_negative, "at least 0 (0: no clipping)"),
    "neftune_noise_alpha": (_non_negative, "at least 0"),
    "eval_delay": (_non_negative, "at least 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


@functools.cache
def _fields() -> dict[str, Any]:
    """TrainingArguments' field names and their type annotations."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def names() -> set[str]:
    """Every TrainingArguments name."""
    return set(_fields())


@functools.cache
def _adapter(name: str) -> TypeAdapter | None:
    """A validator for the field's type (None for a type pydantic cannot check, e.g. a config object)."""
    try:
        return TypeAdapter(_fields()[name], config=ConfigDict(allow_inf_nan=False, arbitrary_types_allowed=True))
    except Exception:  # noqa: BLE001 - any schema pydantic cannot build is checked by TrainingArguments alone
        return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_value(name: str, value: Any, key: str) -> tuple[Any, str | None]:
    """(the value as its field's type, or the problem with it, one line naming `key`)."""
    given = value
    if isinstance(value, bool) and _fields()[name] in (int, float):
        return value, f"{key}: a number, not {str(value).lower()}"
    adapter = _adapter(name)
    if adapter is not None:
        try:
            value = adapter.validate_python(value)
        except ValidationError as err:
            message = err.errors()[0]["msg"]
            return value, f"{key}: {message[0].lower() + message[1:]} (got {_shown(given)})"
    if isinstance(value, float) and not math.isfinite(value):
        return value, f"{key}: not a finite number (got {given!r})"
    if name in BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        ok, allowed = BOUNDS[name]
        if not ok(value):
            return value, f"{key}: must be {allowed} (got {given!r})"
    return value, None


def _complaint(arguments: dict[str, Any]) -> str | None:
    """What TrainingArguments says of `arguments` with the values the study adds (None: nothing)."""
    from transformers import TrainingArguments

    study = {"output_dir": "unused", "eval_strategy": "steps", "save_strategy": "steps", "eval_steps": 1,
             "save_steps": 1, "report_to": "none", "use_cpu": True}
    try:
        TrainingArguments(**{**study, **arguments})
    except Exception as err:  # noqa: BLE001 - whatever TrainingArguments refuses, the spec refuses
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def build_check(arguments: dict[str, Any], section: str) -> str | None:
    """Build the arguments into a TrainingArguments, as a run will; its complaint, naming the key that alone
    causes it (or the section, for a combination)."""
    line = _complaint(arguments)
    if line is None:
        return None
    named = next((k for k in arguments if _complaint({k: arguments[k]}) is not None), None)
    return f"{section}.{named}: {line}" if named else f"{section}: {line}"


def split_training(raw: dict[str, Any], section: str, ours: set[str],
                   refused: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """`raw` with its TrainingArguments names moved under `arguments` and checked; the problems, one line each.

    `ours` are the section's own keys (validated by its schema); any other name is an error saying where it goes."""
    known = names()
    out: dict[str, Any] = {}
    given = raw.get("arguments", {})
    arguments: dict[str, Any] = {}
    problems: list[str] = []
    if not isinstance(given, dict):
        problems.append(f"{section}.arguments: a mapping of TrainingArguments names (got {_shown(given)})")
        given = {}
    for key, value in [*((k, v) for k, v in raw.items() if k != "arguments"), *given.items()]:
        where = f"{section}.{key}"
        if key in ours:
            out[key] = value
        elif key in refused:
            problems.append(f"{where}: not settable here: {refused[key]}")
        elif key in known:
            arguments[key], problem = check_value(key, value, where)
            if problem:
                problems.append(problem)
        elif where_instead(key):
            problems.append(f"unknown key '{where}' (a dllm setting: write it as {where_instead(key)})")
        else:
            problems.append(f"unknown key '{where}' (not a dlmstudy or transformers.TrainingArguments setting)")
    if not problems and arguments:
        problem = build_check(arguments, section)
        if problem:
            problems.append(problem)
    out["arguments"] = arguments
    return out, problems
