"""Parameter matching: one aspect rule turns a parameter target into a shape every arm shares.

The rule (AspectRule, defaults in brackets): width d_model = width_step·k [64·k]; depth
n_layers = max(1, round(d_model / aspect)) [d/64: d256 -> 4 layers, d512 -> 8, d768 -> 12];
heads n_heads = d_model / head_dim [head_dim 64; lower it for tiny models]; SwiGLU MLP width
= mlp_ratio·d_model rounded up to a multiple of mlp_multiple [8d/3, 64]. `solve_size` picks the k
whose count (non-embedding or total) is nearest the target. `match_arms` gives every arm that shape,
so arms differ only where their backbones do (Qwen2's q/k/v biases add 3·d per layer at full
attention), and checks non-embedding counts agree within a tolerance (2%); with `adjust_mlp` each
later arm's MLP width is re-solved to the integer nearest the first arm's count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize
from dlmstudy.models.params import ParamCounts, count_size
from dlmstudy.models.registry import Arm, get_arm

KINDS = ("non_embedding", "total")
MODEL_KEYS = frozenset(f.name for f in fields(ModelSize))


@dataclass(frozen=True)
class AspectRule:
    """How width fixes depth, heads and MLP width (see the module docstring)."""

    width_step: int = 64
    aspect: int = 64
    head_dim: int = 64
    mlp_ratio: Fraction = Fraction(8, 3)
    mlp_multiple: int = 64

    def __post_init__(self) -> None:
        if min(self.width_step, self.aspect, self.head_dim, self.mlp_multiple) < 1 or self.mlp_ratio <= 0:
            raise UserError(f"matching rule values must be positive: {self}")
        if self.width_step % self.head_dim:
            raise UserError(f"matching rule: width_step {self.width_step} must be a multiple of head_dim {self.head_dim}")

    def shape(self, d_model: int, base: ModelSize = ModelSize()) -> ModelSize:
        """The rule's size at width `d_model`; other settings (context, rope, dropout, tying) come from `base`."""
        n_layers = max(1, math.floor(Fraction(d_model, self.aspect) + Fraction(1, 2)))
        mlp = math.ceil(Fraction(self.mlp_ratio) * d_model / self.mlp_multiple) * self.mlp_multiple
        return replace(base, hidden_size=d_model, num_layers=n_layers, num_heads=d_model // self.head_dim,
                       num_kv_heads=None, intermediate_size=mlp)


@dataclass(frozen=True)
class MatchedArm:
    """One arm's solved size, its counts, and its non-embedding deviation from the first arm."""

    arm: Arm
    size: ModelSize
    counts: ParamCounts
    deviation: float


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown parameter target kind {kind!r}; known: {', '.join(KINDS)}")


def solve_size(backbone: str, target: int, *, vocab_size: int, kind: str = "non_embedding",
               rule: AspectRule = AspectRule(), base: ModelSize = ModelSize(), max_width: int = 65536) -> ModelSize:
    """The rule's size whose `kind` count is nearest `target` (counts grow with width, so scan up)."""
    _check_kind(kind)
    if target <= 0:
        raise UserError(f"parameter target must be positive, got {target}")
    best: tuple[int, ModelSize] | None = None
    for d_model in range(rule.width_step, max_width + 1, rule.width_step):
        size = rule.shape(d_model, base)
        n = getattr(count_size(backbone, size, vocab_size), kind)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), size)
        if n >= target:
            return best[1]
    raise UserError(f"parameter target {target:,} ({kind}) needs a width above {max_width}")


def fit_mlp(backbone: str, size: ModelSize, target_non_embedding: int, *, vocab_size: int) -> ModelSize:
    """`size` with the MLP width whose non-embedding count is nearest the target (the count is linear in it)."""
    width = size.resolved_intermediate()
    at = count_size(backbone, replace(size, intermediate_size=width), vocab_size).non_embedding
    slope = count_size(backbone, replace(size, intermediate_size=width + 1), vocab_size).non_embedding - at
    return replace(size, intermediate_size=max(1, width + round((target_non_embedding - at) / slope)))


def check_match(counts_by_arm: Mapping[str, ParamCounts | int], tolerance: float = 0.02) -> float:
    """The relative spread max/min - 1 of non-embedding counts; a UserError naming both counts above `tolerance`."""
    counts = {name: c.non_embedding if isinstance(c, ParamCounts) else int(c) for name, c in counts_by_arm.items()}
    if not counts:
        raise UserError("no arms to match")
    low, high = min(counts, key=counts.get), max(counts, key=counts.get)
    if counts[low] <= 0:
        raise UserError(f"arm {low} has {counts[low]} non-embedding parameters")
    spread = counts[high] / counts[low] - 1
    if spread > tolerance:
        raise UserError(f"arms differ by {spread:.1%} in non-embedding parameters, more than the tolerance "
                        f"{tolerance:.1%}: {high} has {counts[high]:,}, {low} has {counts[low]:,}")
    return spread


def split_overrides(arm: Arm) -> tuple[dict[str, Any], dict[str, Any]]:
    """An arm's overrides as (ModelSize fields, e.g. dropout; everything else, e.g. weight_decay for training)."""
    model = {k: v for k, v in arm.overrides.items() if k in MODEL_KEYS}
    return model, {k: v for k, v in arm.overrides.items() if k not in MODEL_KEYS}


def match_arms(arms: Sequence[Arm | str], target: int, *, vocab_size: int, kind: str = "non_embedding",
               rule: AspectRule = AspectRule(), base: ModelSize = ModelSize(), tolerance: float = 0.02,
               adjust_mlp: bool = False) -> dict[str, MatchedArm]:
    """Solve the first arm's size for `target`, give it to every arm (plus its model overrides) and check the match."""
    resolved = [get_arm(a) if isinstance(a, str) else a for a in arms]
    if not resolved:
        raise UserError("no arms to match")
    shape = solve_size(resolved[0].backbone, target, vocab_size=vocab_size, kind=kind, rule=rule, base=base)
    reference = count_size(resolved[0].backbone, shape, vocab_size).non_embedding
    matched = {}
    for arm in resolved:
        size = replace(shape, **split_overrides(arm)[0])
        if adjust_mlp:
            size = fit_mlp(arm.backbone, size, reference, vocab_size=vocab_size)
        counts = count_size(arm.backbone, size, vocab_size)
        matched[arm.name] = MatchedArm(arm, size, counts, counts.non_embedding / reference - 1)
    check_match({name: m.counts for name, m in matched.items()}, tolerance)
    return matched
