"""Gradient clipping inside the fused optimizer step gives clip_grad_norm_'s clipping and norm."""

from __future__ import annotations

import pytest
import torch

from dlmstudy.training.clipping import clip_grad_norm, clip_in_step, folds_clipping


def params_with_grads(scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 2, 4))]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g)
    return params


def adamw(params, fused: bool) -> torch.optim.AdamW:
    """AdamW with a large eps, so its update depends on the gradients' scale and clipping shows in the weights."""
    return torch.optim.AdamW(params, lr=0.1, eps=0.1, weight_decay=0.01, fused=fused)


def train(params, step_fn, scales=(10.0, 1e-3, 30.0)) -> list[torch.Tensor]:
    """Three steps whose gradients are rescaled to norms far above and below the limit of 1; the norms seen."""
    norms = []
    for scale in scales:
        for p in params:
            p.grad = p.grad / p.grad.norm() * scale
        norms.append(step_fn())
    return norms


def test_clip_in_step_equals_clip_grad_norm_then_step():
    ref, ours, unclipped = params_with_grads(1.0), params_with_grads(1.0), params_with_grads(1.0)
    ref_opt, opt, free_opt = adamw(ref, fused=True), adamw(ours, fused=True), adamw(unclipped, fused=True)

    def ref_step():
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        return norm

    def our_step():
        norm = clip_in_step(opt, ours, 1.0)
        opt.step()
        assert opt.grad_scale is None  # the scale applied to that step only
        return norm

    ref_norms, our_norms = train(ref, ref_step), train(ours, our_step)
    train(unclipped, lambda: free_opt.step())
    assert [n.item() for n in our_norms] == pytest.approx([n.item() for n in ref_norms], rel=1e-6)
    for p, q, u in zip(ref, ours, unclipped):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(u, p, rtol=1e-3)  # clipping changed these weights


def test_clipping_falls_back_where_the_step_cannot_clip():
    fused, unfused = params_with_grads(10.0), params_with_grads(10.0)
    assert folds_clipping(adamw(fused, fused=True))
    opt = adamw(unfused, fused=False)
    assert not folds_clipping(opt)
    norm = clip_grad_norm(opt, unfused, 1.0)
    assert norm.item() > 1
    total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in unfused]))
    assert total.item() == pytest.approx(1.0, rel=1e-5)  # clipped in place, before the step
    assert not folds_clipping(torch.optim.SGD(fused, lr=0.1))
