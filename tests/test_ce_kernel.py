"""The head's Triton kernel (run on CPU under Triton's interpreter): CE and its gradient by the formulas, and the
same losses and gradients as the torch chunk step."""

import pytest
import torch
import torch.nn.functional as F

from dlmstudy.errors import UserError
from dlmstudy.training import ce_kernel
from dlmstudy.training.heads import linear_cross_entropy

pytest.importorskip("triton")


@pytest.fixture
def interpreted():
    """conftest.py switches Triton's interpreter on before anything imports Triton."""
    assert ce_kernel.available(torch.empty(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gives_ce_and_scaled_softmax_minus_onehot(interpreted, dtype):
    torch.manual_seed(0)
    V = ce_kernel.BLOCK + 904  # two blocks, the second one partly masked
    z = (torch.randn(6, V) * 4).to(dtype)
    t = torch.tensor([0, V - 1, 5, ce_kernel.BLOCK, ce_kernel.BLOCK - 1, 17])
    scale = torch.rand(6)
    ce_ref = F.cross_entropy(z.float(), t, reduction="none")
    dz_ref = scale[:, None] * (torch.softmax(z.float(), -1) - F.one_hot(t, V))
    dz = z.clone()
    ce = ce_kernel.softmax_ce_grad_(dz, t, scale)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16 output: its rounding only
    torch.testing.assert_close(dz.float(), dz_ref, atol=tol, rtol=0)
    untouched = z.clone()
    torch.testing.assert_close(ce_kernel.softmax_ce_grad_(untouched, t), ce_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(untouched, z)  # without a scale only the CE is computed


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kernel_step_equals_torch_step(interpreted, reduction):
    torch.manual_seed(0)
    h0, w0 = torch.randn(37, 16), torch.randn(300, 16)
    t = torch.randint(0, 300, (37,))
    out = {}
    for kernel in ("torch", "triton"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, t, weights=torch.rand(37, generator=torch.Generator().manual_seed(1)),
                                    reduction=reduction, chunk=8, kernel=kernel)
        (loss if reduction == "sum" else loss.pow(2).sum()).backward()
        out[kernel] = (loss.detach(), h.grad, w.grad)
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_triton_kernel_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="CUDA"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(32, 8), torch.zeros(4, dtype=torch.long), kernel="triton")
    assert not ce_kernel.available(torch.randn(2))
