"""Multi-device runs: re-execute a command under `accelerate launch` with one of the shipped configs.

The HF Trainer behind every run is data-parallel under accelerate (or torchrun) without code changes:
each process trains on its share of every global batch (per-device batch x processes) and gradients
are averaged before the optimizer step. `dlmstudy run SPEC --num_processes N` calls `relaunch`, which
starts N copies of the same command; inside them `is_launched()` is true, so they train instead of
launching again. Configs: ddp, fsdp2, zero2 (DeepSpeed, optional) and multi-npu, under dlmstudy/configs/.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

from dlmstudy.errors import UserError

LAUNCH_CONFIGS = ("ddp", "fsdp2", "zero2", "multi-npu")
LAUNCH_OPTIONS = ("--num_processes", "--launch_config")  # consumed by the launcher, not passed to the processes


def config_path(config: str) -> Path:
    """The YAML file of a shipped config name (ddp, fsdp2, zero2, multi-npu) or of a user's accelerate config."""
    if config in LAUNCH_CONFIGS:
        return Path(str(resources.files("dlmstudy") / "configs" / f"{config}.yaml"))
    path = Path(config)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path
    raise UserError(f"launch config {config!r}: use one of {', '.join(LAUNCH_CONFIGS)} or an accelerate config file")


def default_config(device: str) -> str:
    """multi-npu on Ascend, ddp otherwise (on cpu the ddp launcher starts gloo processes)."""
    return "multi-npu" if device == "npu" else "ddp"


def is_launched() -> bool:
    """True inside a process started by accelerate launch, torchrun or deepspeed (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def process_rank() -> int:
    """This process's global rank (0 when not launched), read from the launcher's environment."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes in the launched job (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes' rendezvous (parallel launches must not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(program: list[str], *, num_processes: int, config: str | None = None,
                   device: str = "auto") -> list[str]:
    """The argv of `accelerate launch` running `program` (a script and its arguments, or ['-m', module, ...])."""
    if num_processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {num_processes}")
    name = config or default_config(device)
    if name == "zero2" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("launch config zero2 needs DeepSpeed: pip install 'dlmstudy[deepspeed]'")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(name)),
            "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *program]


def strip_launch_options(argv: list[str]) -> list[str]:
    """argv without --num_processes/--launch_config and their values (either `--opt V` or `--opt=V`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            kept.append(arg)
    return kept


def relaunch(argv: list[str], *, num_processes: int, config: str | None = None, device: str = "auto") -> int:
    """Run `dlmstudy <argv>` as `num_processes` processes under accelerate; returns the launcher's exit status."""
    program = ["-m", "dlmstudy.cli", *strip_launch_options(argv)]
    return subprocess.run(launch_command(program, num_processes=num_processes, config=config, device=device)).returncode


class Ranks:
    """The processes of one `dlmstudy run`: one, or several under accelerate launch.

    Rank 0 decides what to do with each run (skip, wait, train) and does every write; all ranks train.
    """

    def __init__(self, device: str):
        self.multi = is_launched() and world_size() > 1
        self.state = None
        if self.multi:
            from accelerate import PartialState

            self.state = PartialState(cpu=device == "cpu")

    @property
    def main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def share(self, value):
        """Rank 0's value, on every rank."""
        if not self.multi:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait(self) -> None:
        """A barrier (no-op for one process)."""
        if self.multi:
            self.state.wait_for_everyone()

    def main_first(self):
        """Context in which rank 0 runs first (e.g. to fill a cache the others then read)."""
        from contextlib import nullcontext

        return self.state.main_process_first() if self.multi else nullcontext()
