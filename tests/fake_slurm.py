"""A stand-in Slurm for tests: sbatch, sacct, scancel, scontrol and srun that run job scripts on this machine.

`install(bin_dir, state_dir)` writes the five commands into bin_dir (put it first on PATH). They keep
their state as JSON files in state_dir (one per job, or per array task: `<id>` or `<id>_<index>`):

- `sbatch SCRIPT` reads the script's `#SBATCH --array=0-N%P`, allocates a job id, prints
  "Submitted batch job <id>" and starts one detached runner per job (array task). A runner waits
  while P tasks of its array run, then runs the script with bash and Slurm's variables
  (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURM_PROCID, ...); when the script
  ends it reruns it if the job was requeued meanwhile, else records COMPLETED or FAILED.
- `srun [--unbuffered] [--output F] [--error F] CMD` writes its pid to the job's state and
  replaces itself with CMD, its output appended to F (%j, %A, %a and %t expanded as Slurm does).
- `sacct -o JobID,State,NodeList --parsable2 -j ID ...` prints those jobs' states.
- `scancel ID --signal SIG` sends SIG to the job's srun task (as Slurm signals job steps);
  `scancel ID` cancels it (SIGTERM, then state CANCELLED).
- `scontrol requeue ID` marks the job to be run again once its script has ended.

Each job's state records `runs`, how many times its script was started.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

COMMANDS = ("sbatch", "sacct", "scancel", "scontrol", "srun")


def install(bin_dir: Path, state_dir: Path) -> None:
    """Write the stand-in commands into bin_dir, keeping their state in state_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nFAKE_SLURM_DIR={state_dir} exec {sys.executable} {Path(__file__).resolve()} "
                        f"{name} \"$@\"\n")
        path.chmod(0o755)


def job_state(state_dir: Path, key: str) -> dict:
    """The recorded state of job (or array task) `key`."""
    return json.loads((state_dir / f"{key}.json").read_text())


@contextmanager
def _locked(state: Path):
    with open(state / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _update(folder: Path, key: str, **fields) -> dict:
    with _locked(folder):
        path = folder / f"{key}.json"
        record = {**(json.loads(path.read_text()) if path.exists() else {}), **fields}
        path.write_text(json.dumps(record))
        return record


def sbatch(state: Path, script: str) -> None:
    text = Path(script).read_text()
    array = re.search(r"^#SBATCH --array=0-(\d+)%(\d+)", text, re.M)
    with _locked(state):
        counter = state / "next_id"
        job_id = int(counter.read_text()) if counter.exists() else 1000
        counter.write_text(str(job_id + 1))
    keys = [f"{job_id}_{i}" for i in range(int(array.group(1)) + 1)] if array else [str(job_id)]
    for key in keys:
        _update(state, key, state="PENDING", runs=0, requeue=False, parallel=int(array.group(2)) if array else 1)
        subprocess.Popen([sys.executable, __file__, "_runner", key, str(Path(script).resolve())],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "FAKE_SLURM_DIR": str(state)})
    print(f"Submitted batch job {job_id}")


def runner(state: Path, key: str, script: str) -> None:
    main, _, index = key.partition("_")
    env = {**os.environ, "SLURM_JOB_ID": main, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}
    if index:
        env.update(SLURM_ARRAY_JOB_ID=main, SLURM_ARRAY_TASK_ID=index)
    while True:
        while True:  # the array's parallelism
            with _locked(state):
                siblings = [json.loads(p.read_text()) for p in state.glob(f"{main}_*.json")]
                me = json.loads((state / f"{key}.json").read_text())
                if sum(s["state"] == "RUNNING" for s in siblings) < me["parallel"]:
                    me.update(state="RUNNING", runs=me["runs"] + 1, requeue=False)
                    (state / f"{key}.json").write_text(json.dumps(me))
                    break
            time.sleep(0.2)
        code = subprocess.run(["bash", script], env=env).returncode
        me = job_state(state, key)
        if me.get("cancelled"):
            _update(state, key, state="CANCELLED", exit_code=code)
            return
        if me["requeue"]:
            _update(state, key, state="PENDING")
            continue
        _update(state, key, state="COMPLETED" if code == 0 else "FAILED", exit_code=code)
        return


def srun(state: Path, args: list[str]) -> None:
    files = {}
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            files[flag] = args.pop(0)
    main = os.environ["SLURM_JOB_ID"]
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    key = f"{main}_{task}" if task else main
    _update(state, key, task_pid=os.getpid())

    def expand(pattern: str) -> str:
        return pattern.replace("%A", main).replace("%a", task or "").replace("%j", main).replace("%t", "0")

    for flag, fd in (("--output", 1), ("--error", 2)):
        if flag in files:
            path = Path(expand(files[flag]))
            path.parent.mkdir(parents=True, exist_ok=True)
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    os.execvp(args[0], args)


def sacct(state: Path, args: list[str]) -> None:
    wanted = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for path in sorted(state.glob("*.json")):
        if path.stem.partition("_")[0] in wanted or path.stem in wanted:
            print(f"{path.stem}|{json.loads(path.read_text())['state']}|localhost")


def scancel(state: Path, args: list[str]) -> None:
    key = next(a for a in args if not a.startswith("-") and a[0].isdigit())
    named = [a.split("=", 1)[1] for a in args if a.startswith("--signal=")]
    named += [args[i + 1] for i, a in enumerate(args) if a == "--signal"]
    if named:
        os.kill(job_state(state, key)["task_pid"], getattr(signal, "SIG" + named[0].removeprefix("SIG")))
        return
    _update(state, key, cancelled=True)
    os.kill(job_state(state, key)["task_pid"], signal.SIGTERM)


def scontrol(state: Path, args: list[str]) -> None:
    if args[:1] != ["requeue"]:
        sys.exit(f"fake scontrol: only 'requeue ID' is simulated, got {args}")
    _update(state, args[1], requeue=True)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    state_dir = Path(os.environ["FAKE_SLURM_DIR"])
    if command == "sbatch":
        sbatch(state_dir, rest[-1])
    elif command == "_runner":
        runner(state_dir, rest[0], rest[1])
    else:
        {"srun": srun, "sacct": sacct, "scancel": scancel, "scontrol": scontrol}[command](state_dir, rest)
