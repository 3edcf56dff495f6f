"""Training time over the segments of a resumed run: every checkpoint records the seconds trained up to it, so a
run resumed (even from its final checkpoint) reports the time its steps took, not only its last segment's.

Time spent after a run's last checkpoint before it was killed is not counted: those steps are trained again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from dlmstudy.atomic import write_json_atomic

CLOCK_FILE = "train_clock.json"


def clock_at(checkpoint: Path | None) -> dict:
    """{"train_seconds", "segments"} recorded in a checkpoint (zero for none, or one saved without a clock)."""
    path = Path(checkpoint) / CLOCK_FILE if checkpoint is not None else None
    if path is None or not path.exists():
        return {"train_seconds": 0.0, "segments": 0}
    return json.loads(path.read_text())


class TrainClock(TrainerCallback):
    """Seconds of training since the run began, over all its segments; written into each checkpoint it saves.

    Place it before the callback that marks a checkpoint complete, so every complete checkpoint has its clock."""

    def __init__(self, resume: Path | None):
        before = clock_at(resume)
        self.before, self.segments = float(before["train_seconds"]), int(before["segments"]) + 1
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        """Training seconds so far: earlier segments up to their last checkpoint, plus this one."""
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_json_atomic(folder / CLOCK_FILE, {"train_seconds": self.seconds(), "segments": self.segments,
                                                    "step": state.global_step})
