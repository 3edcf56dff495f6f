"""Devices: cpu, cuda and Ascend npu behind one small interface (torch_npu is imported lazily).

Only `resolve_device` touches torch_npu; once it has chosen "npu" it also imports
`torch_npu.contrib.transfer_to_npu`, which remaps hard-coded cuda calls in libraries onto the NPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import resource
import sys

import torch

from dlmstudy.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "npu")
NPU_INSTALL = "pip install 'dlmstudy[npu]' (torch-npu matching your torch) and source the CANN toolkit's set_env.sh"


def _import_torch_npu() -> str | None:
    """Import torch_npu; returns None on success, else why it failed (one line)."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return f"device 'npu' needs torch_npu, which is not installed: {NPU_INSTALL}"
    except Exception as err:  # a broken CANN install fails with OSError/RuntimeError, not ImportError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"device 'npu': torch_npu failed to import ({first}); check: {NPU_INSTALL}"
    return None


def npu_available() -> bool:
    """True when torch_npu imports and sees at least one NPU (honours ASCEND_RT_VISIBLE_DEVICES)."""
    if _import_torch_npu() is not None:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_device(name: str = "auto") -> str:
    """'auto' picks cuda, then npu, then cpu; an unavailable explicit choice is a one-line UserError."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        name = "npu" if npu_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but torch sees no CUDA GPU (check CUDA_VISIBLE_DEVICES)")
    if name == "npu":
        problem = _import_torch_npu()
        if problem:
            raise UserError(problem)
        if not torch.npu.is_available():
            visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "<unset>")
            raise UserError(f"device 'npu': torch_npu sees no NPU (ASCEND_RT_VISIBLE_DEVICES={visible}; "
                            "check npu-smi info)")
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
    return name


def distributed_backend(device: str) -> str:
    """The collective backend for a device: nccl (cuda), hccl (npu), gloo (cpu)."""
    return {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}[device]


def supports_bf16(device: str) -> bool:
    """Whether bf16 autocast is the default for training on this device (accelerators yes, CPU no)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    if device == "npu":
        check = getattr(torch.npu, "is_bf16_supported", None)
        return bool(check()) if check else True
    return False


def autocast(device: str, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on devices that train in bf16 by default (or when `enabled`), a no-op otherwise."""
    if enabled is None:
        enabled = supports_bf16(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def synchronize(device: str) -> None:
    """Wait for queued device work (for honest timings)."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "npu":
        torch.npu.synchronize()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    """A human-readable name of the device in use, for reports (e.g. 'NVIDIA H200', 'Ascend910B3')."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    if device == "npu":
        return torch.npu.get_device_name()
    return cpu_name()


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window on an accelerator (CPU's peak RSS cannot be reset)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif device == "npu":
        torch.npu.reset_peak_memory_stats()


def peak_memory(device: str) -> int:
    """Peak bytes: allocated device memory since the last reset (cuda, npu); the process's peak RSS (cpu)."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "npu":
        return int(torch.npu.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes
