"""Devices: cpu, cuda and Ascend npu behind one small interface (torch_npu is imported lazily)."""

from __future__ import annotations

import importlib
import os

import torch

from dlmstudy.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "npu")


def npu_available() -> bool:
    """True when torch_npu imports and sees at least one NPU (honours ASCEND_RT_VISIBLE_DEVICES)."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_device(name: str = "auto") -> str:
    """'auto' picks cuda, then npu, then cpu; an unavailable explicit choice is a one-line UserError."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "npu" if npu_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if name == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            raise UserError("device 'npu' needs torch_npu: pip install 'dlmstudy[npu]' (torch-npu matching your torch)") from None
        if not torch.npu.is_available():
            visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "<unset>")
            raise UserError(f"device 'npu': torch_npu sees no NPU (ASCEND_RT_VISIBLE_DEVICES={visible})")
    return name


def distributed_backend(device: str) -> str:
    """The collective backend for a device: nccl (cuda), hccl (npu), gloo (cpu)."""
    return {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}[device]


def supports_bf16(device: str) -> bool:
    """Whether bf16 autocast is the default for training on this device (accelerators yes, CPU no)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device == "npu"


def synchronize(device: str) -> None:
    """Wait for queued device work (for honest timings)."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "npu":
        torch.npu.synchronize()
