"""A study's runs as separate processes: up to N at once on this machine (`--workers`), or Slurm jobs (`--slurm`).

Both go through submitit. Its local executor starts one process per run here, pinned to one device
(CUDA_VISIBLE_DEVICES on CUDA, ASCEND_RT_VISIBLE_DEVICES on Ascend; on the CPU each process gets an
equal share of the cores), with up to K runs sharing a device. Its Slurm executor submits one job per
run, or one array for the runs that are ready together. Either way:

- the shared data (tokenizer, token streams) are prepared here, once, before any run starts; each
  run's process reads them from `runs/<study>/_cache`;
- a run is submitted only once `run.ready()` is true (an SFT run after its parent has its final
  checkpoint), whatever its stage;
- inside its process a run takes its lock and resumes from its last complete checkpoint, so two
  invocations never train one run twice and a killed run resumes the next time;
- a failed run is reported in one line with its log, and the others go on;
- each finished run prints one line with the study's progress (runs, tokens, ETA).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field

import submitit

from dlmstudy.errors import UserError
from dlmstudy.runners.job import RunJob, read_job_record, update_job_record
from dlmstudy.runners.progress import StudyProgress
from dlmstudy.runners.queue import is_done, read_result, result_line, select, study_runs, waited_for
from dlmstudy.runners.run import Interrupted, default_arguments, optimizer_steps
from dlmstudy.runners.study import prepare_data, study_dir, write_study_index
from dlmstudy.study.estimate import format_duration
from dlmstudy.study.spec import ClusterSpec, StudySpec

# Runs sharing one device by default, by non-embedding parameters, from the H200 measurement in
# docs/benchmarks.md ("Concurrent runs on one GPU"): at 3.2M four runs gave 3.7x one run's throughput (eight
# gave less); at 10.6M two gave 1.5x and more gave nothing further. Larger models were not measured: 1.
RUNS_PER_DEVICE = ((5_000_000, 4), (12_000_000, 2))
VISIBLE = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # the local executor's time limit: none, in effect
MAX_REQUEUES = 50  # Slurm time limits a run may run into, each resumed from its checkpoint, before it is failed
LIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                     "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "UNKNOWN"}


def runs_per_device(run, given: int | None) -> int:
    """K, the runs that share one device with this one: `given`, else by its size (RUNS_PER_DEVICE); SFT runs 1."""
    if given is not None:
        return given
    params = getattr(run, "params", None)
    if params is None:
        return 1
    return next((k for limit, k in RUNS_PER_DEVICE if params.non_embedding <= limit), 1)


def visible_devices(device: str) -> list[int]:
    """The accelerator ids this process may use: its CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES, else all."""
    listed = os.environ.get(VISIBLE[device], "").strip()
    if listed:
        try:
            return [int(d) for d in listed.split(",") if d.strip()]
        except ValueError:
            raise UserError(f"{VISIBLE[device]}={listed}: --workers pins runs by device number; give numbers, "
                            "or --devices") from None
    import torch

    return list(range(torch.cuda.device_count() if device == "cuda" else torch.npu.device_count()))


@dataclass
class Placement:
    """Where a run goes: a device id (None on the CPU and on Slurm) and the share of it the run takes."""

    device: int | None = None
    share: float = 0.0


class LocalDevices:
    """This machine's capacity: at most `workers` runs at once, and per device runs whose shares sum to at most 1
    (a run's share is 1/K, K by its size unless `runs_per_device` is given). On the CPU: `workers` runs."""

    def __init__(self, kind: str, ids: list[int | None], workers: int, runs_per_device: int | None):
        self.kind, self.workers, self.given = kind, workers, runs_per_device
        self.load = {d: 0.0 for d in ids}
        self.running = 0

    def place(self, run) -> Placement | None:
        if self.running >= self.workers:
            return None
        share = 1 / self.workers if self.kind == "cpu" else 1 / runs_per_device(run, self.given)
        device = min(self.load, key=lambda d: self.load[d])
        if self.load[device] + share > 1 + 1e-9:
            return None
        self.load[device] += share
        self.running += 1
        return Placement(device, share)

    def free(self, placement: Placement) -> None:
        self.load[placement.device] -= placement.share
        self.running -= 1


@dataclass
class InFlight:
    """A submitted run: its job and where it runs."""

    run: object
    job: submitit.Job
    placement: Placement
    submitted_at: float = field(default_factory=time.time)


class LocalBackend:
    """Runs as processes of this machine through submitit's LocalExecutor, each pinned to its device."""

    name = "local"
    poll_s = 0.5

    def __init__(self, spec: StudySpec, *, device: str, workers: int, runs_per_device: int | None = None,
                 devices: list[int] | None = None):
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        if runs_per_device is not None and runs_per_device < 1:
            raise UserError(f"--runs_per_device must be at least 1, got {runs_per_device}")
        if device == "cpu":
            if devices:
                raise UserError("--devices names accelerators; on the CPU --workers alone sets how many runs train")
            ids: list[int | None] = [None]
        else:
            ids = list(devices) if devices else visible_devices(device)
            if not ids:
                raise UserError(f"no {device} device is visible to pin runs to")
        self.spec, self.device = spec, device
        self.slots = LocalDevices(device, ids, workers, runs_per_device)
        self.threads = None if device != "cpu" or os.environ.get("OMP_NUM_THREADS") else max(
            1, (os.cpu_count() or 1) // workers)
        self.executor = submitit.LocalExecutor(folder=study_dir(spec) / "_jobs" / "%j")

    def describe(self) -> str:
        if self.device == "cpu":
            return f"up to {self.slots.workers} runs at once on the CPU"
        ids = ", ".join(str(d) for d in self.slots.load)
        k = f"{self.slots.given} runs" if self.slots.given else "runs by size (RUNS_PER_DEVICE)"
        return f"up to {self.slots.workers} runs at once on {self.device} {ids}, {k} per device"

    def place(self, run) -> Placement | None:
        return self.slots.place(run)

    def free(self, placement: Placement) -> None:
        self.slots.free(placement)

    def submit(self, placed: list[tuple[object, Placement]]) -> list[submitit.Job]:
        jobs = []
        for run, placement in placed:
            pinned = [] if placement.device is None else [placement.device]
            self.executor.update_parameters(
                timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=len(pinned) if self.device == "cuda" else 0,
                visible_gpus=tuple(pinned) if self.device == "cuda" else (),
                setup=[f"export ASCEND_RT_VISIBLE_DEVICES={placement.device}"] if self.device == "npu" else [])
            jobs.append(self.executor.submit(RunJob(self.spec, run.run_id, workdir=os.getcwd(), device=self.device,
                                                    threads=self.threads)))
        return jobs

    def where(self, placement: Placement) -> str:
        return self.device if placement.device is None else f"{self.device}:{placement.device}"

    def stop(self, flights: list[InFlight]) -> None:
        """Ask each run in flight to stop with a checkpoint (submitit's controller passes SIGTERM on)."""
        for f in flights:
            try:
                os.kill(int(f.job.job_id), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass

    def attach(self, run) -> submitit.Job | None:
        return None  # a process of an earlier invocation cannot be followed; the run lock keeps it from clashing


def slurm_options(cluster: ClusterSpec, spec: StudySpec) -> dict:
    """submitit SlurmExecutor parameters of a `cluster:` section."""
    options = {"job_name": f"dlmstudy-{spec.name}", "time": cluster.minutes, "partition": cluster.partition,
               "account": cluster.account, "qos": cluster.qos, "constraint": cluster.constraint,
               "gpus_per_node": cluster.gpus_per_run or None, "cpus_per_task": cluster.cpus_per_run,
               "mem": f"{round(cluster.mem_gb * 1024)}M" if cluster.mem_gb else None,
               "array_parallelism": cluster.array_parallelism, "setup": cluster.setup or None,
               "signal_delay_s": cluster.signal_delay_s}
    return {k: v for k, v in options.items() if v is not None}


class SlurmBackend:
    """Runs as Slurm jobs through submitit's SlurmExecutor: a job per run, an array for runs ready together."""

    name = "slurm"
    poll_s = 30.0

    def __init__(self, spec: StudySpec, cluster: ClusterSpec):
        try:
            self.executor = submitit.SlurmExecutor(folder=study_dir(spec) / "_jobs" / "%j",
                                                   max_num_timeout=MAX_REQUEUES)
        except RuntimeError:
            raise UserError("--slurm: there is no srun on PATH; run this on a Slurm login node") from None
        self.executor.update_parameters(**slurm_options(cluster, spec))
        self.spec, self.cluster = spec, cluster

    def describe(self) -> str:
        c = self.cluster
        where = ", ".join(f"{k} {v}" for k, v in (("partition", c.partition), ("account", c.account)) if v)
        return f"Slurm jobs ({where or 'default partition'}, {c.minutes} min each, {c.gpus_per_run} GPU per run)"

    def place(self, run) -> Placement | None:
        return Placement()

    def free(self, placement: Placement) -> None:
        pass

    def submit(self, placed: list[tuple[object, Placement]]) -> list[submitit.Job]:
        try:
            with self.executor.batch():
                jobs = [self.executor.submit(RunJob(self.spec, run.run_id, workdir=os.getcwd())) for run, _ in placed]
        except submitit.core.utils.FailedJobError as err:
            raise UserError(f"sbatch refused the jobs: {error_line(err)}") from None
        return jobs

    def where(self, placement: Placement) -> str:
        return "Slurm"

    def stop(self, flights: list[InFlight]) -> None:
        pass  # jobs are the cluster's: they go on without this process

    def attach(self, run) -> submitit.Job | None:
        """The job of an earlier invocation that is still queued or running for this run, if any."""
        record = read_job_record(run.dir)
        if record.get("executor") != "slurm" or record.get("state") or "job_id" not in record:
            return None
        job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"])
        return job if job.get_info(mode="force").get("State", "UNKNOWN").split()[0] in LIVE_SLURM_STATES else None


@dataclass
class StudyOutcome:
    """What a scheduled study ended with."""

    finished: list[dict] = field(default_factory=list)  # results of every selected run that is done
    failed: list[str] = field(default_factory=list)  # run ids
    not_started: list[str] = field(default_factory=list)
    interrupted: bool = False


def training_tokens(run) -> int:
    """The tokens a pretraining run trains on: its budget, or `max_steps` steps of it; 0 for other stages."""
    if run.stage != "pretrain":
        return 0
    L = run.config["max_length"]
    arguments = default_arguments(run.config, run.total_tokens // L, "cpu")
    return min(run.total_tokens, optimizer_steps(arguments, run.total_tokens // L)
               * arguments["per_device_train_batch_size"] * arguments["gradient_accumulation_steps"] * L)


def error_line(error: BaseException) -> str:
    """The last line of a job's error: its exception, e.g. 'IsADirectoryError: [Errno 21] ...'."""
    text = str(error)
    if "----------------------" in text:  # submitit's FailedJobError wraps the job's traceback in dashes
        text = text.split("----------------------")[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def execute_study(spec: StudySpec, backend, *, only: list[str] | None = None, max_minutes: float | None = None,
                  progress=print) -> StudyOutcome:
    """Run every selected run of `spec` that has no result yet through `backend`; see the module docstring."""
    from dlmstudy.runners.planning import estimate_runs
    from dlmstudy.study.estimate import SHIPPED_BENCH, load_bench

    started = time.time()
    data = prepare_data(spec, progress=progress)
    runs, sft_runs = study_runs(spec, data)
    write_study_index(spec, runs, sft_runs)
    chosen = select(runs, only) + select(sft_runs, only)
    pretrain = [r for r in chosen if r.stage == "pretrain"]
    estimates = estimate_runs(spec, pretrain, load_bench(SHIPPED_BENCH) if SHIPPED_BENCH.exists() else [])
    seconds = {r.run_id: e.total_seconds for r, e in zip(pretrain, estimates)}
    study = StudyProgress(tokens={r.run_id: training_tokens(r) for r in chosen},
                          estimates={r.run_id: seconds.get(r.run_id) for r in chosen})
    outcome = StudyOutcome()
    pending = []
    for run in chosen:
        if is_done(run):
            study.finished(run.run_id)
            outcome.finished.append(read_result(run))
        else:
            pending.append(run)
    progress(f"{spec.name}: {len(chosen)} runs, {len(chosen) - len(pending)} finished earlier; {backend.describe()}")
    flights: dict[str, InFlight] = {}
    for run in pending:
        job = backend.attach(run)
        if job is not None:
            flights[run.run_id] = InFlight(run, job, Placement())
            study.started(run.run_id, read_job_record(run.dir).get("submitted_at"))
            progress(f"{run.run_id}: following its job {job.job_id} of an earlier invocation")
    pending = [r for r in pending if r.run_id not in flights]
    stop = _StopRequest(backend, flights)
    budget_spent = False
    try:
        while True:
            for run_id, flight in list(flights.items()):
                if flight.job.done():
                    del flights[run_id]
                    backend.free(flight.placement)
                    _collect(flight, backend, study, outcome, progress)
            budget_spent = max_minutes is not None and time.time() - started > 60 * max_minutes
            if not stop.requested and not budget_spent:
                placed = []
                for run in [r for r in pending if r.ready()]:
                    placement = backend.place(run)
                    if placement is not None:
                        placed.append((run, placement))
                if placed:
                    for (run, placement), job in zip(placed, backend.submit(placed)):
                        flights[run.run_id] = InFlight(run, job, placement)
                        pending.remove(run)
                        study.started(run.run_id)
                        update_job_record(run.dir, executor=backend.name, job_id=str(job.job_id),
                                          folder=str(job.paths.folder), log=str(job.paths.stdout),
                                          errors=str(job.paths.stderr),
                                          submitted_at=time.time(), where=backend.where(placement), state=None,
                                          submitted_from=socket.gethostname())
                        progress(f"{run.run_id}: submitted to {backend.where(placement)} as job {job.job_id}")
            if not flights:
                break
            time.sleep(backend.poll_s)
    finally:
        stop.restore()
    for run in pending:
        outcome.not_started.append(run.run_id)
        why = ("a stop signal came" if stop.requested else f"the {max_minutes:g}-minute budget is spent"
               if budget_spent else f"waiting for {waited_for(run)}")
        progress(f"{run.run_id}: not started, {why}")
    outcome.interrupted = stop.requested
    return outcome


def _collect(flight: InFlight, backend, study: StudyProgress, outcome: StudyOutcome, progress) -> None:
    """Read a finished job's outcome, record it and print its line."""
    run, job = flight.run, flight.job
    now = time.time()
    error, returned = None, None
    if backend.name == "local" and not job.paths.result_pickle.exists():
        error = "its process ended without a result (killed?)"
    else:
        try:
            returned = job.result()
        except Exception as err:  # the job's own exception, or submitit's word that it never finished
            error = error_line(err)
    if error is None and returned["action"] != "skipped" and is_done(run):
        result = read_result(run)
        seconds = now - flight.submitted_at  # the run's cost to the study: start-up, waits and evaluation included
        update_job_record(run.dir, state="finished", started_at=returned["started_at"], ended_at=returned["ended_at"],
                          host=returned["host"])
        study.finished(run.run_id, seconds if returned["action"] == "trained" else None)
        outcome.finished.append(result)
        took = f" in {format_duration(seconds)}" if returned["action"] == "trained" else " (finished earlier)"
        progress(f"{study.line()} {result_line(run.run_id, result)}{took}")
        return
    study.stopped(run.run_id)
    if error is None:
        update_job_record(run.dir, state="skipped", ended_at=now)
        outcome.not_started.append(run.run_id)
        progress(f"{run.run_id}: {returned['message'] or returned['action']}, skipped")
        return
    if error.startswith(f"{Interrupted.__module__}.{Interrupted.__name__}:"):  # stopped on a signal, checkpoint saved
        update_job_record(run.dir, state="stopped", ended_at=now)
        outcome.not_started.append(run.run_id)
        progress(f"{run.run_id}: stopped on a signal with a checkpoint; it resumes next time")
        return
    update_job_record(run.dir, state="failed", error=error, ended_at=now)
    outcome.failed.append(run.run_id)
    progress(f"{study.line()} {run.run_id}: FAILED ({error}); log {job.paths.stderr}")


class _StopRequest:
    """SIGTERM to this process: start no new run and ask the backend to stop the runs in flight."""

    def __init__(self, backend, flights: dict[str, InFlight]):
        self.requested = False
        self.backend, self.flights = backend, flights
        self.previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.backend.stop(list(self.flights.values()))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)

