"""pytest-benchmark micro-benchmarks (`pytest tests/test_bench_micro.py --benchmark-enable`); with the
project's default --benchmark-disable each runs once, as a plain test of what it measures."""

from __future__ import annotations

import math

import pytest
import torch

from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
from dlmstudy.sampling import generate
from dlmstudy.training.objectives import ar_loss, mask_positions, mdm_loss

B, L, V = 8, 128, 512


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_bench_losses(benchmark, kind):
    """Loss plus its backward to the logits (the output-head-sized tensor both arms pay for), at uniform logits."""
    torch.manual_seed(0)
    ids = torch.randint(3, V, (B, L))
    logits = torch.zeros(B, L, V, requires_grad=True)
    masked, p_mask = mask_positions(torch.rand(B), torch.rand(B, L), eps=1e-3)

    def step() -> torch.Tensor:
        logits.grad = None
        loss = mdm_loss(logits, ids, masked, p_mask) if kind == "mdm" else ar_loss(logits, ids)
        loss.backward()
        return loss.detach()

    loss = benchmark(step)
    # uniform logits: CE is log V at every scored position
    expected = math.log(V) * (p_mask[masked].reciprocal().sum() / (B * L)) if kind == "mdm" else math.log(V)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_bench_sampler_step(benchmark):
    """One diffusion sampler step (forward, Gumbel-max, confidence, top-k commit) on a tiny bidirectional model."""
    tokens = SpecialTokens(vocab_size=128, pad_token_id=0, eos_token_id=1, mask_token_id=2)
    model = build_model(build_config("llada", ModelSize(hidden_size=64, num_layers=2, num_heads=4), tokens, causal=False), seed=0).eval()
    prompt = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))

    out = benchmark(generate, model, prompt, steps=1, gen_length=16, block_length=16, temperature=1.0, mask_id=2)
    assert torch.equal(out[:, :16], prompt) and not (out[:, 16:] == 2).any()
