"""Diverged runs: which finished runs blew up, at which step and why, so that none of them enters a number.

A result.json written by the trainer's divergence stop (it has `diverged_step`) is taken as it is:
`diverged`, `diverged_step`, `diverged_reason` (a run restarted at a lower learning rate that then finished
is not diverged). For runs recorded before the stop existed, a run is diverged when its logged scalars
show a non-finite validation loss, or a training loss that is not finite or collapsed to 0.0 (a
cross-entropy is positive: 0.0 is what a run whose weights turned NaN logs), or its final validation loss
is not finite; the step is the first logged step that shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    """A diverged run's step (None when nothing logged shows where) and reason."""

    step: int | None
    reason: str


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _first_sign(scalars: list[dict]) -> Divergence | None:
    """The first logged step whose training or validation loss shows a divergence, with the first sign of each
    kind in the reason."""
    signs = {}
    for row in sorted(scalars, key=lambda r: r.get("step", 0)):
        loss, val = row.get("loss"), row.get("val_loss")
        if "training" not in signs and isinstance(loss, (int, float)) and not (_finite(loss) and loss > 0):
            signs["training"] = (row.get("step"), f"training loss {loss:g}" + (" (collapsed)" if loss == 0 else ""))
        if "validation" not in signs and isinstance(val, (int, float)) and not _finite(val):
            signs["validation"] = (row.get("step"), f"validation loss {val}")
    if not signs:
        return None
    ordered = sorted(signs.values(), key=lambda sign: sign[0] if sign[0] is not None else 0)
    return Divergence(ordered[0][0], "; ".join(f"{what} from step {step}" for step, what in ordered))


def divergence(result: dict, scalars: list[dict]) -> Divergence | None:
    """Whether a finished run diverged (None: it did not), from its result.json and its logged scalar rows
    (the training rows' `loss`, the evaluations' `val_loss`)."""
    if "diverged_step" in result:
        if not result.get("diverged"):
            return None
        step = result["diverged_step"]
        return Divergence(int(step) if _finite(step) else None,
                          result.get("diverged_reason") or "marked diverged by the trainer")
    sign = _first_sign(scalars)
    if sign is not None:
        return sign
    final = result.get("final_val_loss")
    if isinstance(final, (int, float)) and not _finite(final):
        return Divergence(None, f"final validation loss {final}")
    return None
