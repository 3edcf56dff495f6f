"""Tracking: SwanLab through transformers' own integration (`report_to="swanlab"`), plus a plain mirror.

dlmstudy opens each run's SwanLab experiment itself, because transformers' SwanLabCallback sets neither
the mode nor the log folder, and would start no run for the final evaluation: the callback finds the run
open, logs the Trainer's arguments and model config, and every Trainer log line as `train/<key>` and
`eval/<key>`. The run stays open after training so that the final evaluation is logged to it too
(`final/<key>`); `finish_tracking` then closes it. A resumed run continues its experiment: the id of the
SwanLab run found in the run folder's `swanlog/` is passed back with `resume="allow"`.

The tutorial's environment is honoured: `SWANLAB_PROJECT` (or `SWANLAB_PROJ_NAME`) names the project and
`SWANLAB_MODE` the mode (`cloud` = `online`) where the spec leaves `tracking.project` / `tracking.mode`
unset; swanlab itself reads `SWANLAB_API_KEY`, `SWANLAB_WORKSPACE`, `SWANLAB_API_HOST`, `SWANLAB_TAGS`
and the rest. swanlab 0.10 would parse `SWANLAB_PROJECT` as a JSON settings object and fail, so it is
hidden from `swanlab.init` (and restored). Not used: `SWANLAB_LOG_DIR` (the log stays in the run folder,
where the report reads it) and `SWANLAB_RUN_ID` / `SWANLAB_RESUME` (each run of a study is its own
experiment). Every scalar the trainer logs is also appended to `scalars.jsonl` in the run folder; the
analysis reads that file, so a study needs neither a login nor SwanLab's cloud to be reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from dlmstudy.errors import UserError

SCALARS_FILE = "scalars.jsonl"
DEFAULT_PROJECT, DEFAULT_MODE = "dlmstudy", "offline"
MODES = {"cloud": "online"}  # swanlab's older name, as transformers' docs still give it


class ScalarMirror(TrainerCallback):
    """Append every logged scalar (with step and tokens seen) to a JSON-lines file."""

    def __init__(self, path: Path):
        self.path = Path(path)

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


def swanlab_settings(tracking: Any) -> tuple[str, str]:
    """(project, mode) of a spec's `tracking:`: the spec's own keys, else SWANLAB_PROJECT / SWANLAB_PROJ_NAME and
    SWANLAB_MODE, else dlmstudy and offline."""
    given = tracking.model_fields_set
    project = tracking.project if "project" in given else (
        os.environ.get("SWANLAB_PROJECT") or os.environ.get("SWANLAB_PROJ_NAME") or DEFAULT_PROJECT)
    mode = tracking.mode if "mode" in given else os.environ.get("SWANLAB_MODE") or DEFAULT_MODE
    return project, MODES.get(mode, mode)


@contextmanager
def _without(var: str) -> Iterator[None]:
    """The environment without `var` for the duration."""
    value = os.environ.pop(var, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[var] = value


def check_tracking(tracking: Any) -> None:
    """Fail before any training when SwanLab cannot start as asked: not installed, or online without a login."""
    if tracking.report_to != "swanlab" or swanlab_settings(tracking)[1] == "disabled":
        return
    try:
        import swanlab
    except ImportError:
        raise UserError("tracking.report_to swanlab needs swanlab (pip install swanlab), "
                        "or set tracking.report_to: none") from None
    if swanlab_settings(tracking)[1] != "online":
        return
    with _without("SWANLAB_PROJECT"):
        key = swanlab.Settings().api_key  # SWANLAB_API_KEY, else the key `swanlab login` saved
    if not key:
        raise UserError("tracking.mode online: not logged in to SwanLab; run `swanlab login` (or set "
                        "SWANLAB_API_KEY), or use tracking.mode offline and `swanlab sync` the logs later")


def previous_run_id(logdir: Path) -> str | None:
    """The id of the latest SwanLab run in a log folder (`run-<time>-<id>`), or None."""
    runs = sorted(p.name for p in Path(logdir).glob("run-*-*") if p.is_dir())
    return runs[-1].rsplit("-", 1)[1] if runs else None


def start_swanlab(tracking: Any, *, name: str, logdir: Path, config: dict[str, Any]) -> Any:
    """Open the run's SwanLab experiment (continuing the one in `logdir` if any); None when tracking is off."""
    project, mode = swanlab_settings(tracking)
    if tracking.report_to != "swanlab" or mode == "disabled":
        return None
    check_tracking(tracking)
    import swanlab

    logdir.mkdir(parents=True, exist_ok=True)
    previous = previous_run_id(logdir)
    with _without("SWANLAB_PROJECT"):
        try:
            return swanlab.init(project=project, name=name, mode=mode, log_dir=str(logdir), config=config,
                                id=previous, resume="allow" if previous else None, reinit=True)
        except Exception as err:
            if mode != "online":
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"SwanLab could not start in mode online ({first}); check the network and "
                            "`swanlab login`, or use tracking.mode offline") from None


def _flat(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric, finite values of a nested dict as `prefix/key/subkey` scalars."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def finish_tracking(final: dict[str, Any] | None = None, *, error: str | None = None) -> None:
    """Log the final evaluation (as `final/<key>`) to the open SwanLab run and close it; `error` marks it crashed.
    Nothing happens when no run is open."""
    swanlab = sys.modules.get("swanlab")
    if swanlab is None or not swanlab.has_run():
        return
    if final:
        swanlab.log(_flat(final, "final"))
    if error:
        swanlab.finish(state="crashed", error=error)
    else:
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
