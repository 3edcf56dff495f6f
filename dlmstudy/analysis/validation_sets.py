"""One validation set per number: which held-out sequences each evaluation of a run scored, and its "best"
loss as the minimum over evaluations on one set.

A run records its set in result.json: `validation_sequences`, the number of held-out sequences (the first
that many) that every evaluation, during training and final, scored. Runs recorded before that field scored
two sets when run.json's `objective_settings.eval_batches` > 0: the evaluations during training the first
eval_batches × `training.per_device_train_batch_size` sequences, the final one all of them (the study
spec's `data.validation_tokens` // `data.max_length`). There "best" is the minimum over the evaluations
during training only (one set, the same for every run of the study) and never mixed with the final loss,
which is on the other set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_BATCH = 16  # per_device_train_batch_size when a run's config does not set it (the trainer's default)


@dataclass(frozen=True)
class ValidationSets:
    """Sequences scored by the evaluations during training (`during`) and by the final one (`final`), each the
    first that many held-out sequences; None where the records do not say."""

    during: int | None
    final: int | None

    @property
    def one_set(self) -> bool:
        return self.during is not None and self.during == self.final

    @property
    def final_label(self) -> str:
        if self.final is None:
            return "final evaluation (set not recorded)"
        return f"{self.final} sequences (every evaluation)" if self.one_set else f"all {self.final} sequences (final)"

    @property
    def best_label(self) -> str:
        if self.one_set:
            return self.final_label
        if self.during is None:
            return "evaluations during training (set not recorded)"
        of = f" of {self.final}" if self.final is not None else ""
        return f"first {self.during}{of} sequences (during training)"


def validation_sets(result: dict, config: dict, spec: dict) -> ValidationSets:
    """The sets a run's evaluations scored, from its result.json, else its run.json and the study spec."""
    recorded = result.get("validation_sequences")
    if isinstance(recorded, int) and recorded > 0:
        return ValidationSets(recorded, recorded)
    data = spec.get("data") or {}
    length = config.get("max_length") or data.get("max_length")
    held_out = data["validation_tokens"] // length if data.get("validation_tokens") and length else None
    batches = (config.get("objective_settings") or {}).get("eval_batches")
    if not isinstance(batches, int):
        return ValidationSets(None, held_out)
    if batches == 0:
        return ValidationSets(held_out, held_out)
    during = batches * (config.get("training") or {}).get("per_device_train_batch_size", DEFAULT_BATCH)
    return ValidationSets(min(during, held_out) if held_out else during, held_out)


def best_loss(sets: ValidationSets, during: list[float], final: float, recorded: float) -> float:
    """The lowest validation loss on one set: over the evaluations during training and the final one when they
    scored the same sequences (the recorded best when no curve was logged), else over those during training."""
    curve = [v for v in during if isinstance(v, (int, float)) and math.isfinite(v)]
    if sets.one_set:
        candidates = curve + [final] if curve else [recorded]
    else:
        candidates = curve
    candidates = [v for v in candidates if isinstance(v, (int, float)) and math.isfinite(v)]
    return min(candidates, default=float("nan"))
