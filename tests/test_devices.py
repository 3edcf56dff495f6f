"""Devices: the NPU path tested without Ascend hardware (a fake torch_npu package), CPU helpers for real."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from dlmstudy.errors import UserError
from dlmstudy.runners import device as dev

# Stands in for the real torch_npu: importing it registers `torch.npu`, as torch_npu does; the number
# of visible cards and an import failure are steered by environment variables.
FAKE_TORCH_NPU = '''
import os, types, torch
if os.environ.get("FAKE_NPU_BROKEN"):
    raise RuntimeError("libascendcl.so: cannot open shared object file")
count = int(os.environ.get("FAKE_NPU_COUNT", "1"))
torch.npu = types.SimpleNamespace(
    is_available=lambda: count > 0, device_count=lambda: count, get_device_name=lambda *a: "Ascend910B3",
    synchronize=lambda: None, is_bf16_supported=lambda: True, max_memory_allocated=lambda: 3 * 2**30,
    reset_peak_memory_stats=lambda: None)
'''
FAKE_TRANSFER = "import torch_npu\ntorch_npu.transferred = True\n"


@pytest.fixture
def fake_npu(tmp_path, monkeypatch):
    """A torch_npu package on sys.path; yields a function that imports it (None when not imported yet)."""
    pkg = tmp_path / "torch_npu"
    (pkg / "contrib").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_TORCH_NPU))
    (pkg / "contrib" / "__init__.py").write_text("")
    (pkg / "contrib" / "transfer_to_npu.py").write_text(FAKE_TRANSFER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch, "npu", None, raising=False)  # restored (removed) after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield lambda: sys.modules.get("torch_npu")
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]


def test_npu_resolves_when_torch_npu_sees_a_card(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_COUNT", "2")
    assert dev.resolve_device("npu") == "npu"
    assert getattr(fake_npu(), "transferred", False)  # cuda calls in libraries now land on the NPU
    assert dev.distributed_backend("npu") == "hccl"
    assert dev.supports_bf16("npu")
    assert dev.device_name("npu") == "Ascend910B3"
    assert dev.peak_memory("npu") == 3 * 2**30


def test_auto_picks_the_npu_when_there_is_no_cuda(fake_npu):
    assert dev.resolve_device("auto") == "npu"


def test_cpu_never_imports_torch_npu(fake_npu):
    assert dev.resolve_device("cpu") == "cpu"
    assert fake_npu() is None


def test_auto_falls_back_to_cpu_when_torch_npu_sees_no_card(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_COUNT", "0")
    assert dev.resolve_device("auto") == "cpu"
    assert not getattr(fake_npu(), "transferred", False)


def test_npu_without_a_visible_card_names_ascend_rt_visible_devices(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_COUNT", "0")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    with pytest.raises(UserError, match=r"sees no NPU \(ASCEND_RT_VISIBLE_DEVICES=4,5") as err:
        dev.resolve_device("npu")
    assert "\n" not in str(err.value)


def test_npu_without_torch_npu_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ImportError
    with pytest.raises(UserError, match=r"needs torch_npu, which is not installed: pip install 'dlmstudy\[npu\]'"):
        dev.resolve_device("npu")
    assert not dev.npu_available()


def test_a_broken_torch_npu_is_one_clear_line(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_BROKEN", "1")
    with pytest.raises(UserError, match=r"torch_npu failed to import \(libascendcl.so: cannot open") as err:
        dev.resolve_device("npu")
    assert "\n" not in str(err.value)
    assert dev.resolve_device("auto") == "cpu"


def test_unknown_or_missing_devices_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        dev.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        dev.resolve_device("cuda")


def test_backends_per_device():
    assert [dev.distributed_backend(d) for d in ("cuda", "npu", "cpu")] == ["nccl", "hccl", "gloo"]


def test_cpu_trains_in_float32_and_autocast_can_be_forced():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert not dev.supports_bf16("cpu")
    with dev.autocast("cpu"):
        assert (a @ b).dtype == torch.float32
    with dev.autocast("cpu", enabled=True):
        assert (a @ b).dtype == torch.bfloat16


def test_cpu_name_and_peak_memory_in_bytes():
    assert dev.device_name("cpu")
    dev.reset_peak_memory("cpu")  # a no-op on CPU, must not fail
    assert dev.peak_memory("cpu") > 50e6  # a process with torch loaded holds far more than 50 MB (KiB would fail)
