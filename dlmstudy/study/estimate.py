"""Compute and time estimates for a plan: each run's tokens, training FLOPs and time on a named device.

FLOPs follow `dlmstudy bench`: N = weights used in a matmul (output head included, embedding lookup
not), training FLOPs = 6 N D for D tokens. Time comes from the bench record closest to the run
(same objective; same training path, shape and batch where there is one): its achieved FLOP/s,
MFU x peak = tokens/s x flops_per_token, carried over to the run's own FLOPs per token,

    tokens/s(run) = tokens/s(record) x flops_per_token(record) / flops_per_token(run)
    time(run)     = D / tokens/s(run)

where flops_per_token = 6 N + 12 layers d L (bench's count: attention scores and values included).
Validation passes are forward only, a third of a training step's FLOPs per token, at the same
achieved FLOP/s: eval time = eval tokens / (3 tokens/s(run)), where eval tokens counts every
position each validation runs forward (times the Monte-Carlo draws for diffusion).
Pure arithmetic over numbers and a JSON file; the runner counts N and the eval tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dlmstudy.errors import UserError

# `dlmstudy bench --json` on one H200 (docs/benchmarks.md), shipped as package data; used when no --bench file
# (and no --calibrate) is given.
SHIPPED_BENCH = resources.files("dlmstudy.study") / "bench" / "h200-2026-11-29.json"
RECORD_FIELDS = ("device_name", "config", "arm", "objective", "mode", "batch", "seq_len", "tokens_per_s",
                 "flops_per_token")


@dataclass(frozen=True)
class BenchRecord:
    """One training measurement of `dlmstudy bench`: a device, a model shape, a batch, its throughput."""

    device_name: str
    config: str
    arm: str
    objective: str
    mode: str
    batch: int
    seq_len: int
    tokens_per_s: float
    flops_per_token: float
    mfu: float | None = None

    def describe(self) -> str:
        """One line: device, shape, path, batch, throughput, MFU."""
        mfu = f", MFU {self.mfu:.1%}" if self.mfu is not None else ""
        return (f"{self.device_name} {self.config} {self.arm} ({self.mode}), batch {self.batch} x {self.seq_len}: "
                f"{self.tokens_per_s:,.0f} tokens/s{mfu} at {self.flops_per_token / 1e6:,.0f}M FLOPs/token")


def bench_record(r: dict) -> BenchRecord:
    """A training record of `dlmstudy bench` (a dict of its JSON) as a BenchRecord."""
    return BenchRecord(**{f: r[f] for f in RECORD_FIELDS}, mfu=r.get("mfu"))


def load_bench(path: str | Path) -> list[BenchRecord]:
    """The training records of a `dlmstudy bench --json` file, or of the shipped one (sampling records skipped)."""
    path = Path(path) if isinstance(path, str) else path
    if not path.is_file():
        raise UserError(f"bench file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a JSON file (write one with dlmstudy bench --json FILE)") from None
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise UserError(f"{path}: expected a JSON list of bench records (dlmstudy bench --json FILE)")
    records = []
    for i, r in enumerate(raw):
        if r.get("measurement", "train") != "train":
            continue
        absent = [f for f in RECORD_FIELDS if r.get(f) is None]
        if absent:
            raise UserError(f"{path}: record {i} has no {absent[0]!r}")
        records.append(bench_record(r))
    return records


def closest_record(records: list[BenchRecord], *, objective: str, flops_per_token: float, seq_len: int,
                   batch: int, mode: str = "plain", device_name: str | None = None,
                   arm: str | None = None) -> BenchRecord | None:
    """The record to time a run by: same objective (and device, if named); then the same training path; then the
    same arm (if named); then the nearest in log FLOPs per token, sequence length and batch. None when nothing
    matches."""
    pool = [r for r in records if r.objective == objective and r.tokens_per_s > 0 and r.flops_per_token > 0]
    if device_name:
        pool = [r for r in pool if device_name.lower() in r.device_name.lower()]

    def distance(r: BenchRecord) -> tuple[bool, bool, float]:
        return (r.mode != mode, arm is not None and r.arm != arm, abs(math.log(r.flops_per_token / flops_per_token))
                + abs(math.log(r.seq_len / seq_len)) + abs(math.log(r.batch / batch)))

    return min(pool, key=distance, default=None)


@dataclass(frozen=True)
class Estimate:
    """A run's budget: tokens D, FLOPs 6 N D, and (with a bench record) its throughput and time on one device."""

    tokens: int
    n_matmul: int
    flops_per_token: float
    record: BenchRecord | None
    batch: int = 0  # the run's sequences per device step, to compare with the record's
    eval_tokens: int = 0  # token positions the run's validations run forward

    @property
    def flops(self) -> float:
        """Training FLOPs, 6 N D."""
        return 6 * self.n_matmul * self.tokens

    @property
    def tokens_per_s(self) -> float | None:
        """The record's achieved FLOP/s over this run's FLOPs per token (None without a record)."""
        if self.record is None:
            return None
        return self.record.tokens_per_s * self.record.flops_per_token / self.flops_per_token

    @property
    def seconds(self) -> float | None:
        """Training time on one device, D / tokens/s."""
        return None if self.tokens_per_s is None else self.tokens / self.tokens_per_s

    @property
    def eval_seconds(self) -> float | None:
        """Validation time on one device: forward passes, a third of a training step's FLOPs per token."""
        return None if self.tokens_per_s is None else self.eval_tokens / (3 * self.tokens_per_s)

    @property
    def total_seconds(self) -> float | None:
        """Training and validation (no checkpoints, QA sampling or start-up)."""
        return None if self.seconds is None else self.seconds + self.eval_seconds


def format_duration(seconds: float | None) -> str:
    """3725 -> '1.0 h'; None -> '-'."""
    if seconds is None:
        return "-"
    for div, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= div:
            return f"{seconds / div:.1f} {unit}"
    return f"{seconds:.0f} s"
