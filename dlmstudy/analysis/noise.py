"""Seed-to-seed noise measured from replicates, and the cells whose losses the claims compare.

A cell is one arm × model size × U × total tokens × learning rate; its runs differ only in their seed. Where
cells have several seeds, the noise floor is measured: the pooled standard deviation over every replicated
cell of an arm, s² = Σ_i Σ_j (L_ij − mean_i)² / Σ_i (n_i − 1), or over every arm's replicated cells when that
arm has none. A study without replicates has no measured floor: ASSUMED_SEED_SD stands in, and the
verdicts built on it can at most "suggest".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

Z = 1.96  # two-sided 95%
ASSUMED_SEED_SD = 0.02  # nats/token: the seed-to-seed standard deviation assumed where no cell is replicated
CELL_KEYS = ["arm", "size", "unique_tokens", "tokens", "learning_rate"]


def size_keys(runs: pd.DataFrame) -> pd.Series:
    """A model-size label shared by matched runs of different arms: run.json's size, else the size rank."""
    if "size" in runs and runs["size"].fillna("").astype(str).str.len().gt(0).all():
        return runs["size"].astype(str)
    rank = runs.groupby("arm")["params_non_embedding"].rank(method="dense").astype(int)
    return "size #" + rank.astype(str)


def _with_keys(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with a final loss, with the cell keys filled (size label; a missing learning rate as NaN)."""
    runs = runs.dropna(subset=["final_val_loss"])
    learning_rate = runs["learning_rate"] if "learning_rate" in runs else np.nan
    return runs.assign(size=size_keys(runs) if len(runs) else pd.Series(dtype=str), learning_rate=learning_rate)


@dataclass(frozen=True)
class SeedNoise:
    """Per arm, the seed-to-seed standard deviation the study measured (`table`: arm, sd, dof, replicated
    cells, source; the row "all arms" pools every arm)."""

    table: pd.DataFrame

    def sd(self, arm: str) -> tuple[float, str]:
        """(standard deviation, where it comes from) for one arm: its own replicates, else every arm's, else
        ASSUMED_SEED_SD."""
        rows = self.table.set_index("arm") if len(self.table) else pd.DataFrame()
        for key in (arm, "all arms"):
            if key in rows.index and rows.loc[key, "dof"] > 0:
                return float(rows.loc[key, "sd"]), rows.loc[key, "source"]
        return ASSUMED_SEED_SD, f"assumed {ASSUMED_SEED_SD} (no replicated cell)"


def seed_noise(runs: pd.DataFrame) -> SeedNoise:
    """The pooled seed-to-seed standard deviation per arm and over all arms, from cells with several seeds."""
    runs = _with_keys(runs)
    rows, total_ss, total_dof, total_cells = [], 0.0, 0, 0
    for arm, group in runs.groupby("arm"):
        ss, dof, replicated = 0.0, 0, 0
        for _, cell in group.groupby(CELL_KEYS[1:], dropna=False):
            if len(cell) > 1:
                ss += float(((cell["final_val_loss"] - cell["final_val_loss"].mean()) ** 2).sum())
                dof, replicated = dof + len(cell) - 1, replicated + 1
        rows.append({"arm": arm, "sd": math.sqrt(ss / dof) if dof else np.nan, "dof": dof,
                     "replicated cells": replicated,
                     "source": f"measured: {replicated} replicated cell(s) of {arm}" if dof else "no replicated cell"})
        total_ss, total_dof, total_cells = total_ss + ss, total_dof + dof, total_cells + replicated
    rows.append({"arm": "all arms", "sd": math.sqrt(total_ss / total_dof) if total_dof else np.nan, "dof": total_dof,
                 "replicated cells": total_cells,
                 "source": f"measured: {total_cells} replicated cell(s) of all arms" if total_dof else
                 "no replicated cell"})
    return SeedNoise(pd.DataFrame(rows))


def cells(runs: pd.DataFrame, noise: SeedNoise | None = None) -> pd.DataFrame:
    """One row per cell: mean final validation loss over its seeds and its standard error
    √((mean MC s.e.² + sd²)/n) with sd the arm's seed-to-seed standard deviation (`seed_sd`, `noise`: where it
    comes from); `replicated` when the cell has several seeds, `measured` when sd was measured; `runs` names
    the cell's runs."""
    runs = _with_keys(runs)
    noise = noise or seed_noise(runs)
    rows = []
    for (arm, size, unique, tokens, lr), group in runs.groupby(CELL_KEYS, dropna=False):
        n = len(group)
        sd, source = noise.sd(arm)
        mc = float((group["final_val_loss_stderr"].fillna(0.0) ** 2).mean())
        rows.append({"arm": arm, "objective": group["objective"].iloc[0], "backbone": group["backbone"].iloc[0],
                     "size": size, "params": group["params_non_embedding"].mean(), "unique_tokens": unique,
                     "tokens": tokens, "epochs": group["epochs"].mean(), "learning_rate": lr,
                     "flops": group["flops"].mean(), "loss": group["final_val_loss"].mean(),
                     "se": math.sqrt((mc + sd**2) / n), "n_seeds": n, "replicated": n > 1,
                     "measured": not source.startswith("assumed"), "seed_sd": sd, "noise": source,
                     "loss_kind": group["val_loss_kind"].iloc[0], "runs": ", ".join(group["run_id"])})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Difference:
    """A difference between cells (or derived numbers) with its standard error; beyond the noise when
    |value| > Z·se."""

    value: float
    se: float

    @property
    def noise(self) -> float:
        return Z * self.se

    @property
    def sign(self) -> int:
        """+1 or −1 when the difference is beyond the noise, 0 when within it (or NaN)."""
        if not np.isfinite(self.value) or abs(self.value) <= self.noise:
            return 0
        return 1 if self.value > 0 else -1

    def __str__(self) -> str:
        return f"{self.value:+.3f} ± {self.noise:.3f}"


def difference(a, b) -> Difference:
    """a − b of two cells (rows holding loss and se)."""
    return Difference(a["loss"] - b["loss"], math.hypot(a["se"], b["se"]))
