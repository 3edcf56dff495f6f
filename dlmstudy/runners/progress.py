"""Whole-study progress while runs train in parallel: runs and tokens done of the total, and an ETA.

The ETA starts from `dlmstudy plan`'s estimate of each run (one device, one run at a time, from the
bench records) and is corrected by what finished runs measured:

    correction = sum(measured seconds) / sum(estimated seconds)      over finished runs with an estimate
    left(run)  = max(0, correction x estimate(run) - seconds it has run so far)
    ETA        = sum(left) / runs in flight

A run's measured seconds are its job's, start-up and evaluation included, while it shared its device
with the others in flight, so the correction carries both the device's real speed and the cost of
sharing. A run without an estimate (SFT) counts as the mean corrected estimate of the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dlmstudy.study.estimate import format_duration
from dlmstudy.study.plan import short_count


@dataclass
class StudyProgress:
    """Counts and ETA of a study's selected runs; `finished`/`started` keep it current."""

    tokens: dict[str, int]  # run id -> training tokens (0 when unknown, e.g. SFT)
    estimates: dict[str, float | None]  # run id -> estimated seconds on one device, alone
    done: set[str] = field(default_factory=set)
    measured: dict[str, float] = field(default_factory=dict)
    running_since: dict[str, float] = field(default_factory=dict)

    def started(self, run_id: str, at: float | None = None) -> None:
        self.running_since[run_id] = time.time() if at is None else at

    def finished(self, run_id: str, seconds: float | None = None) -> None:
        """A run is done (trained here in `seconds`, or found finished: no measurement)."""
        self.running_since.pop(run_id, None)
        self.done.add(run_id)
        if seconds is not None:
            self.measured[run_id] = seconds

    def stopped(self, run_id: str) -> None:
        """A run ended without finishing (failed, skipped, interrupted)."""
        self.running_since.pop(run_id, None)

    def correction(self) -> float | None:
        """Measured over estimated seconds of the finished runs that have both; None before the first."""
        pairs = [(s, self.estimates[r]) for r, s in self.measured.items() if self.estimates.get(r)]
        return sum(s for s, _ in pairs) / sum(e for _, e in pairs) if pairs else None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds until every run not done has finished, at the current parallelism; None when unknown."""
        now = time.time() if now is None else now
        left = [r for r in self.tokens if r not in self.done]
        if not left:
            return 0.0
        c = self.correction()
        predicted = {r: (c or 1.0) * e for r, e in self.estimates.items() if e}
        if not predicted:
            return None
        typical = sum(predicted.values()) / len(predicted)
        rest = sum(max(0.0, predicted.get(r, typical) - (now - self.running_since.get(r, now))) for r in left)
        return rest / max(1, len(self.running_since))

    def line(self) -> str:
        """'[3/12 runs, 6.3M/25.2M tokens, ETA 14 min]' (ETA 'from the plan' until a run has finished here)."""
        total = sum(self.tokens.values())
        done = sum(self.tokens[r] for r in self.done if r in self.tokens)
        eta = self.eta()
        when = "" if eta is None else f", ETA {format_duration(eta)}" + (
            " from the plan" if self.correction() is None else "")
        return (f"[{len(self.done & self.tokens.keys())}/{len(self.tokens)} runs, "
                f"{short_count(done)}/{short_count(total)} tokens{when}]")
