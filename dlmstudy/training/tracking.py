"""Tracking: SwanLab (offline by default, as in the tutorial's `report_to: swanlab`) plus a plain mirror.

Every scalar the trainer logs is appended to `scalars.jsonl` in the run folder; the analysis reads
that file, so a study needs neither a login nor SwanLab's cloud to be reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

SCALARS_FILE = "scalars.jsonl"


class ScalarMirror(TrainerCallback):
    """Append every logged scalar (with step and tokens seen) to a JSON-lines file and, if on, to SwanLab."""

    def __init__(self, path: Path, swanlab_run: Any = None):
        self.path = Path(path)
        self.swanlab_run = swanlab_run

    def on_train_begin(self, args, state, control, **kwargs):
        """On resume, drop mirrored rows newer than the checkpoint the run restarts from (and a torn last line)."""
        if state.is_world_process_zero and self.path.exists():
            text = self.path.read_text()
            rows = parse_rows(text)
            kept = [r for r in rows if r.get("step", 0) <= state.global_step]
            torn = len(rows) != sum(1 for line in text.splitlines() if line.strip()) or not text.endswith("\n")
            if len(kept) != len(rows) or (torn and text):
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        row = {"step": state.global_step, **scalars}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.swanlab_run is not None:
            import swanlab

            swanlab.log(scalars, step=state.global_step)


def start_swanlab(*, project: str, name: str, mode: str, logdir: Path, config: dict[str, Any]) -> Any:
    """Start a SwanLab run (offline needs no login); returns None when tracking is off."""
    if mode == "disabled":
        return None
    import swanlab

    os.environ.pop("SWANLAB_PROJECT", None)  # makes swanlab.init fail; SWANLAB_PROJ_NAME is the supported name
    logdir.mkdir(parents=True, exist_ok=True)
    return swanlab.init(project=project, name=name, mode=mode, log_dir=str(logdir), config=config)


def finish_swanlab(run: Any) -> None:
    """Close a SwanLab run so the next run of the study starts clean."""
    if run is not None:
        import swanlab

        swanlab.finish()


def parse_rows(text: str) -> list[dict[str, float]]:
    """JSON-lines rows; a line cut short by a killed process is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_scalars(run_dir: Path) -> list[dict[str, float]]:
    """The mirrored scalars of a run (empty when it logged none)."""
    path = Path(run_dir) / SCALARS_FILE
    return parse_rows(path.read_text()) if path.exists() else []


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar, showing the latest loss in the bar instead of printing every log line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "val_loss", "tokens_per_s")}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)
