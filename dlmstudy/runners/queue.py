"""The run queue: a study's runs in order, finished runs skipped, one process per run (file lock)."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from dlmstudy.runners.run import RESULT_FILE
from dlmstudy.runners.study import Run


@contextmanager
def run_lock(run_dir: Path):
    """Hold `run_dir/.lock` exclusively; yields False when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_done(run: Run) -> bool:
    """A run with result.json is finished and is never trained again."""
    return (run.dir / RESULT_FILE).exists()


def read_result(run: Run) -> dict:
    return json.loads((run.dir / RESULT_FILE).read_text())


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """Keep runs matching every `key=value` filter (arm, unique_tokens, epochs, run_id) or a bare arm name."""
    if not only:
        return runs
    kept = runs
    for f in only:
        key, _, value = f.partition("=") if "=" in f else ("arm", "", f)
        if key == "arm":
            kept = [r for r in kept if r.arm.name == value]
        elif key == "run_id":
            kept = [r for r in kept if r.run_id.startswith(value)]
        elif key in ("unique_tokens", "epochs"):
            kept = [r for r in kept if float(getattr(r, key)) == float(value)]
        else:
            from dlmstudy.errors import UserError

            raise UserError(f"--only {f!r}: use arm=NAME, unique_tokens=N, epochs=R or run_id=PREFIX")
    return kept


def run_queue(spec, *, only: list[str] | None = None, device: str | None = None, max_minutes: float | None = None,
              progress=print) -> list[dict]:
    """Run every (selected) run of a study that has no result yet; returns the results of all selected runs.

    With `max_minutes`, no new run starts once that much wall time has passed (for chunked work on a
    lent machine); send SIGTERM to stop a run mid-way at its next step with a checkpoint.
    """
    import time

    started = time.time()
    from dlmstudy.runners.device import resolve_device
    from dlmstudy.runners.run import execute_run
    from dlmstudy.runners.study import prepare_data, probe_items, resolve_runs, write_study_index

    device = resolve_device(device or spec.device)
    data = prepare_data(spec, progress=progress)
    runs = resolve_runs(spec, data)
    write_study_index(spec, runs)
    probes = probe_items(spec, data, runs)
    chosen = select(runs, only)
    results = []
    for i, run in enumerate(chosen, 1):
        tag = f"[{i}/{len(chosen)}] {run.run_id}"
        if is_done(run):
            progress(f"{tag}: finished earlier, skipped")
            results.append(read_result(run))
            continue
        if max_minutes is not None and time.time() - started > 60 * max_minutes:
            progress(f"{tag}: not started, the {max_minutes:g}-minute budget is spent; run again to continue")
            continue
        with run_lock(run.dir) as locked:
            if not locked:
                progress(f"{tag}: another process is training it, skipped")
                continue
            progress(f"{tag}: training on {device} ({run.total_tokens:,} tokens, {run.epochs:g} epochs "
                     f"of {run.unique_tokens:,} unique)")
            result = execute_run(run, spec, data, device, probes, progress)
            acc = " ".join(f"{d} {result[f'accuracy_{d}']:.2f}" for d in ("forward", "reverse")
                           if result[f"accuracy_{d}"] is not None)
            progress(f"{tag}: done, {result['val_loss_kind']} {result['final_val_loss']:.4f}"
                     + (f", accuracy {acc}" if acc else ""))
            results.append(result)
    return results
