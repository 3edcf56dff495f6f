"""LoRA for SFT through peft, with the tutorial's settings (`lora: true`, `target_modules: all-linear`).

`all-linear` adapts every linear layer of the blocks (attention and MLP projections) but not the
output head. Full fine-tuning is simply the model without `apply_lora`. The frozen base keeps its own
dtype (bf16 at 8B: no fp32 copy of a frozen weight exists); the adapters, their gradients and the
optimizer state are fp32 (peft's `autocast_adapter_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
               target_modules: str | list[str] | tuple[str, ...] = "all-linear", seed: int | None = None) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters (A drawn after seeding torch with `seed`, when given, so runs start
    alike; B zero); only the adapters are trainable afterwards."""
    modules = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    LoraSettings(r, lora_alpha, lora_dropout, modules)  # checks the values
    if seed is not None:
        torch.manual_seed(seed)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=modules if isinstance(modules, str) else list(modules))
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant, so no input
    needs to require a gradient): what `TrainingArguments(gradient_checkpointing=True)` does inside the Trainer."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
