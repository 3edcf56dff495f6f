"""Arms: a (backbone, objective, sampler) triple registered by name.

Adding a comparison arm is one `register_arm` call (plus its objective or sampler if new);
see docs/arms.md. The study, trainer and evaluation look arms up here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dlmstudy.errors import UserError


@dataclass(frozen=True)
class Arm:
    """One side of a comparison.

    backbone: "llada" (Llama-style block: no biases, RMSNorm, SwiGLU) or "qwen" (Qwen2: qkv bias).
    objective: "mdm" (LLaDA masked diffusion, bidirectional attention) or "ar" (next token, causal).
    sampler: "diffusion" (LLaDA low-confidence remasking) or "ar" (left-to-right decoding).
    overrides: training/model settings this arm changes relative to the study (e.g. weight decay).
    """

    name: str
    backbone: str
    objective: str
    sampler: str
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def causal(self) -> bool:
        """AR objectives use causal attention; masked diffusion sees the whole sequence."""
        return self.objective == "ar"


ARMS: dict[str, Arm] = {}


def register_arm(arm: Arm) -> Arm:
    """Add an arm to the registry (names are unique)."""
    if arm.name in ARMS:
        raise ValueError(f"arm {arm.name!r} is already registered")
    ARMS[arm.name] = arm
    return arm


def get_arm(name: str) -> Arm:
    """Look an arm up by name; unknown names are user errors listing the known ones."""
    try:
        return ARMS[name]
    except KeyError:
        raise UserError(f"unknown arm {name!r}; known arms: {', '.join(sorted(ARMS))}") from None


# The 2x2 design: backbone (LLaDA-style, Qwen2) x objective (masked diffusion, autoregressive).
register_arm(Arm("llada-mdm", "llada", "mdm", "diffusion", "LLaDA: Llama-style block, bidirectional, masked diffusion"))
register_arm(Arm("llada-ar", "llada", "ar", "ar", "Llama-style block trained autoregressively"))
register_arm(Arm("qwen-mdm", "qwen", "mdm", "diffusion", "Qwen2 block, bidirectional, masked diffusion"))
register_arm(Arm("qwen-ar", "qwen", "ar", "ar", "Qwen2: causal, next-token prediction"))
# A regularised AR control: the stronger AR baseline the data-constrained literature asks for
# (weight decay and dropout against multi-epoch overfitting). See docs/arms.md.
register_arm(Arm("qwen-ar-reg", "qwen", "ar", "ar", "Qwen2 AR with weight decay 0.1 and attention dropout 0.1",
                 overrides={"weight_decay": 0.1, "dropout": 0.1}))
# The tutorial's names for the two headline arms.
register_arm(Arm("llada", "llada", "mdm", "diffusion", "alias of llada-mdm (the tutorial's LLaDA)"))
register_arm(Arm("qwen", "qwen", "ar", "ar", "alias of qwen-ar (the tutorial's Qwen2.5)"))
