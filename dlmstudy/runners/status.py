"""`dlmstudy status`: each run's state, from its folder, its lock and (for Slurm jobs) sacct.

| state | when |
| --- | --- |
| done | result.json is there |
| diverged | result.json says `diverged: true` |
| running | a live process holds the run's lock, or Slurm says the job runs |
| queued | its Slurm job waits (pending, requeued) |
| failed | its last job ended without a result (the detail says why and where it resumes from) |
| waiting | it is not `ready()`: an SFT run whose parent has no final checkpoint yet |
| pending | not submitted yet (or stopped: the detail names the checkpoint it resumes from) |
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from dlmstudy.runners.job import read_job_record
from dlmstudy.runners.queue import LOCK_FILE, is_done, read_result, select, study_runs, waited_for
from dlmstudy.runners.study import prepare_data
from dlmstudy.study.spec import StudySpec
from dlmstudy.training.trainer import COMPLETE_MARK

STATES = ("done", "diverged", "running", "queued", "failed", "waiting", "pending")
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "PREEMPTED"}
RUNNING = {"RUNNING", "COMPLETING", "RESIZING"}


@dataclass
class RunState:
    """One run's row of `dlmstudy status`."""

    run_id: str
    stage: str
    arm: str
    state: str
    job_id: str | None = None
    detail: str = ""


def alive(pid: int, host: str) -> bool:
    """Whether process `pid` lives on `host` (on another host it cannot be checked: taken as alive)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def lock_holder(run_dir: Path) -> tuple[int, str] | None:
    """(pid, host) written by the process that last took the run's lock, if that process is alive."""
    try:
        pid, host = (run_dir / LOCK_FILE).read_text().split()
    except (OSError, ValueError):
        return None
    return (int(pid), host) if alive(int(pid), host) else None


def resumes_from(run_dir: Path) -> str | None:
    """The newest complete checkpoint's name (read only: nothing is removed, unlike at resume)."""
    steps = [int(p.name.split("-")[-1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / COMPLETE_MARK).exists()]
    return f"checkpoint-{max(steps)}" if steps else None


def slurm_state(record: dict) -> str:
    """Slurm's state of a recorded job (sacct through submitit), e.g. PENDING, RUNNING, COMPLETED."""
    import submitit

    job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"])
    return (job.get_info(mode="force").get("State") or "UNKNOWN").split()[0]


def run_state(run) -> RunState:
    """The state of one run (see the module docstring)."""
    record = read_job_record(run.dir)
    row = RunState(run.run_id, run.stage, run.arm.name, "pending", record.get("job_id"))
    checkpoint = resumes_from(run.dir)
    resume = f"resumes from {checkpoint}" if checkpoint else ""
    if is_done(run):
        result = read_result(run)
        row.state = "diverged" if result.get("diverged") else "done"
        row.detail = f"{result['val_loss_kind']} {result['final_val_loss']:.4f}"
        return row
    holder = lock_holder(run.dir)
    in_flight = not record.get("state")
    scheduler = slurm_state(record) if record.get("executor") == "slurm" and in_flight else None
    # a local job whose process still imports: its controller (the job id) lives, the run is not locked yet
    starting = (record.get("executor") == "local" and in_flight and holder is None and "submitted_from" in record
                and alive(int(record["job_id"]), record["submitted_from"]))
    if starting:
        row.state, row.detail = "running", "starting"
    elif holder is not None or scheduler in RUNNING:
        row.state = "running"
        row.detail = ", ".join(filter(None, [f"pid {holder[0]} on {holder[1]}" if holder else "", record.get("log"),
                                             checkpoint and f"last {checkpoint}"]))
    elif scheduler in QUEUED:
        row.state, row.detail = "queued", f"Slurm {scheduler}" + (f", {resume}" if resume else "")
    elif record.get("state") == "failed" or scheduler is not None or (record and not record.get("state")):
        row.state = "failed"
        why = record.get("error") or (f"Slurm {scheduler}" if scheduler else "its process ended without a result")
        row.detail = "; ".join(filter(None, [why, resume, record.get("errors")]))
    elif not run.ready():
        row.state, row.detail = "waiting", f"for {waited_for(run)}"
    else:
        row.detail = resume
    return row


def study_states(spec: StudySpec, only: list[str] | None = None) -> list[RunState]:
    """Every (selected) run's state; the data come from the study's cache (prepared by `dlmstudy run`)."""
    data = prepare_data(spec, progress=lambda m: None)
    runs, sft_runs = study_runs(spec, data)
    return [run_state(r) for r in select(runs, only) + select(sft_runs, only)]


def format_states(rows: list[RunState]) -> str:
    """A table of the runs and a count per state."""
    lines = [f"{'run':<44} {'stage':<9} {'arm':<12} {'state':<9} {'job':<12} detail"]
    lines += [f"{r.run_id:<44} {r.stage:<9} {r.arm:<12} {r.state:<9} {r.job_id or '-':<12} {r.detail}" for r in rows]
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" (of {len(rows)} runs)")
    return "\n".join(lines)


def states_json(rows: list[RunState]) -> str:
    """The rows as JSON (`dlmstudy status --json`)."""
    return json.dumps([r.__dict__ for r in rows], indent=2)
