"""One run in its own process: what a local worker or a Slurm job executes (through submitit).

`RunJob(spec, run_id, ...)()` reads the study's prepared data from its cache, takes the run's lock
and trains and evaluates the run, or resumes it from its last complete checkpoint. It is
checkpointable in submitit's sense: on SIGUSR2 (a time limit ahead, or a preemption) training saves
a checkpoint at the end of its step and stops, and the job then asks submitit to requeue it; the
requeued job is this same callable, which resumes from that checkpoint.

Each run folder also gets `job.json`, the scheduler's record of the job that runs it (executor, job
id, log, when it started and ended, and how it ended), which `dlmstudy status` reads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from submitit.helpers import Checkpointable

from dlmstudy.atomic import write_json_atomic
from dlmstudy.errors import UserError
from dlmstudy.study.spec import StudySpec

JOB_FILE = "job.json"


def read_job_record(run_dir: Path) -> dict:
    """The run's job record, or {} when no job was ever submitted for it (or the file is unreadable)."""
    try:
        return json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def update_job_record(run_dir: Path, **fields) -> dict:
    """Merge `fields` into the run's job record (written atomically); returns the new record."""
    record = {**read_job_record(run_dir), **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / JOB_FILE, record)
    return record


class RunJob(Checkpointable):
    """Train and evaluate one run of a study in this process; returns what happened as a small dict.

    `workdir` is the directory the study was started from (relative paths in the spec are relative to it);
    `device` the device kind (cpu, cuda, npu; None: the spec's); `threads` torch's CPU threads (None: as is).
    """

    def __init__(self, spec: StudySpec, run_id: str, *, workdir: str, device: str | None = None,
                 threads: int | None = None):
        self.spec = spec
        self.run_id = run_id
        self.workdir = workdir
        self.device = device
        self.threads = threads

    def __call__(self) -> dict:
        import torch

        from dlmstudy.runners.device import resolve_device
        from dlmstudy.runners.queue import is_done, run_lock, study_runs
        from dlmstudy.runners.run import Interrupted, execute_run
        from dlmstudy.runners.sft import execute_sft_run
        from dlmstudy.runners.study import prepare_data, probe_items

        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler, in a submitit job
        os.chdir(self.workdir)
        if self.threads:
            torch.set_num_threads(self.threads)
        started = time.time()

        def say(message: str) -> None:
            print(message, flush=True)

        spec = self.spec
        device = resolve_device(self.device or spec.device)
        data = prepare_data(spec, progress=say)
        runs, sft_runs = study_runs(spec, data)
        run = next((r for r in runs + sft_runs if r.run_id == self.run_id), None)
        if run is None:
            raise UserError(f"run {self.run_id} is not a run of study {spec.name} as its spec reads now")

        def outcome(action: str, message: str = "") -> dict:
            return {"run_id": run.run_id, "action": action, "message": message, "started_at": started,
                    "ended_at": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "device": device}

        with run_lock(run.dir) as held:
            if is_done(run):
                return outcome("finished earlier")
            if not held:
                return outcome("skipped", "another process is training it")
            say(f"{run.run_id}: training on {device} (pid {os.getpid()} on {socket.gethostname()})")
            try:
                if run.stage == "sft":
                    execute_sft_run(run, spec, data, device, probe_items(spec, data, runs), say)
                else:
                    execute_run(run, spec, data, device, probe_items(spec, data, runs), say)
            except Interrupted as stop:
                say(str(stop))
                if stop.signum == signal.SIGUSR2 and callable(requeue):
                    requeue(stop.signum, None)  # checkpoint() below, then requeue and exit
                raise
        return outcome("trained")
