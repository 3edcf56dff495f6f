"""The fast head's chunk step after the matmul as one Triton kernel: per row of logits z, the CE and, in place,
dz = scale (softmax(z) - onehot(t)).

Each program walks one row twice. Pass 1 is the online softmax normaliser (Milakov & Gimelshein, 2018):
m <- max(m, max_j z_j), s <- s exp(m_old - m) + sum_j exp(z_j - m), so lse = m + log s and CE = lse - z_t.
Pass 2 overwrites z with scale (exp(z - lse) - [j == t]) in z's dtype. That is two reads and one write per
logit (with hundreds of 253 KB rows in flight, the second read mostly misses L2: 3.3 ms for [16368, 126464]
bf16 on an H200, about three passes at DRAM speed, docs/benchmarks.md), where torch.compile's
kernel for the same step made about four times the traffic on an H200 (docs/performance.md).

Triton comes with PyTorch's CUDA wheels; on CPU the kernel runs only under Triton's interpreter
(TRITON_INTERPRET=1), which is how tests check it against the formulas.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BLOCK = 4096
NUM_WARPS = 8


def available(z: torch.Tensor) -> bool:
    """Whether the kernel can run on z: CUDA with Triton installed, or any device under Triton's interpreter
    (which must be switched on before Triton is first imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return z.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use so importing dlmstudy never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_ce_grad(z_ptr, t_ptr, scale_ptr, ce_ptr, stride, V, GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_ptr += row * stride
        t = tl.load(t_ptr + row)
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(ce_ptr + row, lse - tl.load(z_ptr + t).to(tl.float32))
        if GRAD:
            scale = tl.load(scale_ptr + row)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                z = tl.load(z_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                dz = scale * (tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0))
                tl.store(z_ptr + cols, dz.to(z_ptr.dtype.element_ty), mask=cols < V)

    return softmax_ce_grad


def softmax_ce_grad_(z: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """CE_i = logsumexp(z_i) - z_i[t_i] in fp32 [N]; with scale [N], z [N, V] becomes scale_i (softmax(z_i) -
    onehot(t_i)) in place (the gradient of sum_i scale_i CE_i), in z's dtype."""
    if z.stride(1) != 1:
        raise ValueError("softmax_ce_grad_ needs rows of z contiguous")
    n, vocab = z.shape
    ce = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        grad = scale is not None
        _kernel()[(n,)](z, targets.contiguous(), scale.float().contiguous() if grad else ce, ce, z.stride(0), vocab,
                        GRAD=grad, BLOCK=min(BLOCK, 1 << (vocab - 1).bit_length()), num_warps=NUM_WARPS)
    return ce
