"""The run queue: a study's runs in order, finished runs skipped, one process per run (file lock)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from dlmstudy.damaged import read_record, set_aside
from dlmstudy.models.checkpoints import checkpoint_problem
from dlmstudy.runners.run import RESULT_FILE
from dlmstudy.runners.study import Run

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: Path):
    """Hold `run_dir/.lock` exclusively; yields False when another process holds it.

    The holder writes "pid host" into the file, so `dlmstudy status` can tell a live holder from a dead one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_done(run: Run, progress=print) -> bool:
    """A run with a readable result.json is finished and is never trained again. A damaged result, or a damaged
    final checkpoint (which SFT, eval and generate read), is set aside (renamed <name>.damaged-<time>, reported)
    so the run trains again."""
    if read_record(run.dir / RESULT_FILE, expect={"run_id": run.run_id}, progress=progress) is None:
        return False
    final = run.dir / "checkpoint"
    problem = checkpoint_problem(final) if final.is_dir() else None
    if problem is None:
        return True
    moved = set_aside(final)
    set_aside(run.dir / RESULT_FILE)
    progress(f"{final}: damaged ({problem}); set aside as {moved.name} with its result.json, training the run again")
    return False


def read_result(run: Run) -> dict:
    return json.loads((run.dir / RESULT_FILE).read_text())


def waited_for(run) -> str:
    """What a run that is not `ready()` waits for, in words."""
    return f"its base model {run.base}" if run.stage == "sft" else "the runs it depends on"


def select(runs: list, only: list[str] | None) -> list:
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
            kept = [r for r in kept if getattr(r, key, None) is not None and float(getattr(r, key)) == float(value)]
        elif key == "stage":
            kept = [r for r in kept if r.stage == value]
        else:
            from dlmstudy.errors import UserError

            raise UserError(f"--only {f!r}: use arm=NAME, unique_tokens=N, epochs=R, stage=pretrain|sft or run_id=PREFIX")
    return kept


def study_runs(spec, data) -> tuple[list, list]:
    """(pretraining runs, SFT runs) of a study whose data are prepared, in the order they are started."""
    from dlmstudy.runners.sft import resolve_sft_runs
    from dlmstudy.runners.study import resolve_runs

    runs = resolve_runs(spec, data)
    return runs, resolve_sft_runs(spec, runs)


def run_queue(spec, *, only: list[str] | None = None, device: str | None = None, max_minutes: float | None = None,
              progress=print) -> list[dict]:
    """Run every (selected) run of a study that has no result yet; returns the results of all selected runs.

    Pretraining runs go first, then SFT runs (each needs its parent's final checkpoint). With
    `max_minutes`, no new run starts once that much wall time has passed (chunked work on a lent
    machine); SIGTERM stops a run at its next step with a checkpoint. Under accelerate launch every
    process trains each run together; rank 0 alone decides, holds the lock and writes.
    """
    import time
    from contextlib import ExitStack

    from dlmstudy.runners.device import resolve_device
    from dlmstudy.runners.launch import Ranks
    from dlmstudy.runners.run import execute_run
    from dlmstudy.runners.sft import execute_sft_run
    from dlmstudy.runners.study import prepare_data, probe_items, write_study_index

    started = time.time()
    device = resolve_device(device or spec.device)
    ranks = Ranks(device)
    say = progress if ranks.main else (lambda message: None)
    with ranks.main_first():
        data = prepare_data(spec, progress=say)
    runs, sft_runs = study_runs(spec, data)
    if ranks.main:
        write_study_index(spec, runs, sft_runs)
    probes = probe_items(spec, data, runs)
    chosen = select(runs, only) + select(sft_runs, only)
    results = []
    for i, run in enumerate(chosen, 1):
        tag = f"[{i}/{len(chosen)}] {run.run_id}"
        with ExitStack() as held:
            action = ranks.share(_decide(run, held, started, max_minutes, say) if ranks.main else None)
            if action == "done":
                say(f"{tag}: finished earlier, skipped")
                results.append(read_result(run))
                continue
            if action != "train":
                say(f"{tag}: {action}")
                continue
            if run.stage == "sft":
                say(f"{tag}: fine-tuning {run.arm.name} for {run.epochs} epochs on {device}")
                result = execute_sft_run(run, spec, data, device, probes, say)
            else:
                say(f"{tag}: training on {device} ({run.total_tokens:,} tokens, {run.epochs:g} epochs "
                    f"of {run.unique_tokens:,} unique)")
                result = execute_run(run, spec, data, device, probes, say, write=ranks.main)
            ranks.wait()
        if not ranks.main:
            continue
        say(f"[{i}/{len(chosen)}] {result_line(run.run_id, result)}")
        results.append(result)
    return results


def result_line(run_id: str, result: dict) -> str:
    """'<run id>: done, <loss kind> <final loss>[, accuracy forward a reverse b]' (DIVERGED when it diverged)."""
    acc = " ".join(f"{d} {result[f'accuracy_{d}']:.2f}" for d in ("forward", "reverse")
                   if result.get(f"accuracy_{d}") is not None)
    state = "DIVERGED" if result.get("diverged") else "done"
    return (f"{run_id}: {state}, {result['val_loss_kind']} {result['final_val_loss']:.4f}"
            + (f", accuracy {acc}" if acc else ""))


def _decide(run, held, started: float, max_minutes: float | None, progress=print) -> str:
    """What to do with a run: "done", "train" (with its lock held in `held`), or why it is skipped."""
    import time

    if is_done(run, progress):
        return "done"
    if max_minutes is not None and time.time() - started > 60 * max_minutes:
        return f"not started, the {max_minutes:g}-minute budget is spent; run again to continue"
    if not run.ready():
        return f"waiting for {waited_for(run)}; run again once that has finished"
    if not held.enter_context(run_lock(run.dir)):
        return "another process is training it, skipped"
    return "train"
