"""LoRA for SFT through peft, with the tutorial's settings (`lora: true`, `target_modules: all-linear`).

`all-linear` adapts every linear layer of the blocks (attention and MLP projections) but not the
output head. Full fine-tuning is simply the model without `apply_lora`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from dlmstudy.errors import UserError


@dataclass(frozen=True)
class LoraSettings:
    """Rank r, scale lora_alpha / r, dropout on the adapter input, and which linear layers to adapt."""

    r: int = 32
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"LoRA rank r must be at least 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise UserError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise UserError("target_modules is empty; use all-linear or a list of module names")


def apply_lora(model: PreTrainedModel, *, r: int = 32, lora_alpha: float = 64, lora_dropout: float = 0.05,
               target_modules: str | list[str] | tuple[str, ...] = "all-linear") -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapters are trainable afterwards."""
    modules = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    LoraSettings(r, lora_alpha, lora_dropout, modules)  # checks the values
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=modules if isinstance(modules, str) else list(modules))
    return get_peft_model(model, config)
