"""The diffusion likelihood bound (LLaDA's stratified Monte-Carlo estimator) and the exact AR NLL."""

import math
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch

from dlmstudy.evaluation.validation import answer_nll
from dlmstudy.evaluation.likelihood import ar_nll, mdm_loglikelihood, mdm_nll_bound, stratified_mask_counts
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model

MASK = 2
TOKENS = SpecialTokens(vocab_size=16, pad_token_id=0, eos_token_id=1, mask_token_id=MASK)


def tiny_model(causal: bool):
    """A tiny model with sharp, context-dependent predictions, so a wrongly weighted estimator shows."""
    model = build_model(build_config("llada", ModelSize(hidden_size=32, num_layers=2, num_heads=4), TOKENS, causal=causal), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model.eval()


@torch.no_grad()
def exact_bound(model, prefix: list[int], target: list[int]) -> float:
    """E_l E_{|M|=l} [(L/l) Σ_{i∈M} log p(y_i | prefix, y masked at M)], every l and every M enumerated."""
    L, P = len(target), len(prefix)
    total = 0.0
    for l in range(1, L + 1):
        subsets = list(combinations(range(L), l))
        for M in subsets:
            noisy = prefix + [MASK if i in M else t for i, t in enumerate(target)]
            log_p = model(torch.tensor([noisy])).logits[0].float().log_softmax(-1)
            total += (L / l) * sum(log_p[P + i, target[i]].item() for i in M) / len(subsets) / L
    return total


@pytest.mark.parametrize("L,B", [(1, 4), (5, 8), (7, 7), (100, 32), (10, 1)])
def test_stratified_counts_in_range_cover_and_uniform(L, B):
    g = torch.Generator().manual_seed(0)
    counts = stratified_mask_counts(torch.full((4000,), L), B, generator=g)
    assert counts.min() >= 1 and counts.max() <= L
    if B >= L:  # each stratum sweeps the whole range 1..L
        assert all(set(row.tolist()) == set(range(1, L + 1)) for row in counts[:50])
    elif B > 1:  # B evenly spaced counts: neighbours differ by about L/B
        gaps = counts[:50].sort(dim=1).values.diff(dim=1)
        assert gaps.max() <= L // B + 1
    # every draw is marginally U{1..L}, which keeps the estimator unbiased
    freq = torch.bincount(counts[:, -1], minlength=L + 1)[1:].double() / len(counts)
    assert (freq - 1 / L).abs().max() < 4 * (1 / L / len(counts)) ** 0.5 + 1e-9


def test_loglikelihood_mean_agrees_with_enumerated_estimator():
    model = tiny_model(causal=False)
    prefix, target = [5, 9, 3, 12], [7, 4, 11, 6, 8]
    exact = exact_bound(model, prefix, target)
    estimate, stderr = mdm_loglikelihood(model, prefix, target, mask_id=MASK, mc_num=256, batch_size=64,
                                         return_stderr=True, generator=torch.Generator().manual_seed(0))
    assert stderr > 0
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)
    assert exact < 0


def test_nll_bound_batched_with_padding_agrees_with_enumeration():
    model = tiny_model(causal=False)
    seqs = [[5, 9, 3, 12, 7], [4, 11, 6]]
    ids = torch.tensor([seqs[0], seqs[1] + [0, 0]])
    attention_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    exact = -sum(exact_bound(model, [], s) for s in seqs) / 8  # nats per token, 8 real tokens
    nll, stderr = mdm_nll_bound(model, ids, mask_id=MASK, mc_num=128, batch_size=64,
                                attention_mask=attention_mask, generator=torch.Generator().manual_seed(1))
    assert stderr > 0
    assert abs(nll - exact) < 4 * stderr, (nll, exact, stderr)


def test_single_draw_has_no_stderr_and_a_finite_bound():
    model = tiny_model(causal=False)
    value, stderr = mdm_loglikelihood(model, [5], [7, 4], mask_id=MASK, mc_num=1, return_stderr=True)
    assert torch.isfinite(torch.tensor(value)) and torch.isnan(torch.tensor(stderr))


def test_ar_nll_equals_hand_loop():
    torch.manual_seed(0)
    model = tiny_model(causal=True)
    seqs = [[5, 9, 3, 12, 7, 4], [11, 6, 8]]
    ids = torch.tensor([seqs[0], seqs[1] + [0, 0, 0]])
    attention_mask = (torch.arange(6) < torch.tensor([[6], [3]])).long()
    nlls = []
    with torch.no_grad():
        for s in seqs:
            for t in range(1, len(s)):
                log_p = model(torch.tensor([s[:t]])).logits[0, -1].float().log_softmax(-1)
                nlls.append(-log_p[s[t]].item())
    expected = sum(nlls) / len(nlls)
    assert ar_nll(model, ids, attention_mask, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert ar_nll(model, ids, attention_mask) == pytest.approx(expected, rel=1e-5)


class PositionLogits(torch.nn.Module):
    """A 'model' whose logits depend only on the position: the first `confident` positions put 0.9 on token 3,
    later positions are uniform over the vocabulary, so an answer after them has NLL log(V) per token exactly."""

    def __init__(self, vocab: int, confident: int):
        super().__init__()
        self.vocab, self.confident = vocab, confident
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b, l = input_ids.shape
        logits = torch.zeros(b, l, self.vocab)
        logits[:, : self.confident, 3] = torch.log(torch.tensor(0.9 * (self.vocab - 1) / 0.1))
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_answer_nll_scores_only_the_answer_tokens_given_the_prompt(objective):
    """Prompts are 4 tokens of 3 (which the model predicts confidently), answers uniform: scoring the prompt
    too would pull the NLL below log V; right padding (attention_mask 0) is neither masked nor counted."""
    vocab, prompt = 16, 4
    ids = torch.tensor([[3, 3, 3, 3, 7, 8, 9, 1], [3, 3, 3, 3, 5, 1, 0, 0]])
    attention_mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    labels = ids.masked_fill(torch.arange(8)[None, :] < prompt, -100).masked_fill(attention_mask == 0, -100)
    model = PositionLogits(vocab, confident=prompt - (1 if objective == "ar" else 0))  # AR: logits at j predict j+1
    out = answer_nll(model, objective, ids, attention_mask, labels, mask_id=2, mc_num=8, batch_size=4)
    assert out["answer_nll"] == pytest.approx(math.log(vocab), rel=1e-6)
