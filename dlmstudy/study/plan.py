"""Expanding a spec into runs: one run per arm x data setting, each with a stable id.

Pure bookkeeping (no torch): the runner resolves people into tokens and counts parameters.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from dlmstudy.study.spec import GridSpec


@dataclass(frozen=True)
class DataSetting:
    """A grid point: `unique` tokens (or people, for the built-in data) and epochs (or a total-token budget)."""

    unique: int
    unit: str
    epochs: float | None = None
    total_tokens: int | None = None

    def epochs_for(self, unique_tokens: int) -> float:
        """Epochs of this setting once the unique-token count is known."""
        return self.epochs if self.epochs is not None else self.total_tokens / unique_tokens


def data_settings(grid: GridSpec) -> list[DataSetting]:
    """The grid's data settings, in spec order (zip pairs element-wise; product takes every combination)."""
    unit = "tokens" if grid.unique_tokens is not None else "people"
    sizes = grid.unique_tokens if grid.unique_tokens is not None else grid.unique_people
    if grid.total_tokens is not None:
        return [DataSetting(u, unit, total_tokens=grid.total_tokens) for u in sizes]
    pairs = zip(sizes, grid.epochs) if grid.pairing == "zip" else itertools.product(sizes, grid.epochs)
    return [DataSetting(u, unit, epochs=float(r)) for u, r in pairs]


def short_count(n: float) -> str:
    """1234567 -> '1.2M' (for run labels and tables)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:g}"


def config_digest(config: dict[str, Any]) -> str:
    """A short hash of a fully resolved config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_id(config: dict[str, Any]) -> str:
    """A readable label plus a hash of the fully resolved config: same config, same id."""
    digest = config_digest(config)
    label = f"{config['arm']}_u{short_count(config['unique_tokens'])}_r{config['epochs']:.3g}"
    if config.get("params_target"):
        label += f"_n{short_count(config['params_target'])}"
    return f"{label}_{digest}"
