"""Objectives against hand-computed values: LLaDA pretraining and SFT, AR pretraining and SFT, the noise.

Logits are built from chosen probabilities, so every cross-entropy is a multiple of ln 2:
a target of probability 1/2, 1/4, 1/8 costs 1, 2, 3 ln 2.
"""

from __future__ import annotations

import math

import pytest
import torch

from dlmstudy.errors import UserError
from dlmstudy.training import objectives
from dlmstudy.training.objectives import (IGNORE, ARObjective, MDMObjective, ar_loss, batch_generator,
                                          mask_positions, mask_tokens, mdm_loss, sequence_noise)
from dlmstudy.training.registry import build_objective

LN2 = math.log(2)
V, MASK = 4, 3  # vocabulary of 4 ids; id 3 is the mask token




def logits_for(targets: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] giving targets[b, i] probability q[b, i], the rest spread evenly."""
    probs = ((1 - q) / (V - 1))[..., None].expand(*targets.shape, V).clone()
    probs.scatter_(-1, targets[..., None], q[..., None])
    return probs.log()


class FixedLogits(torch.nn.Module):
    """A stand-in model: returns fixed logits (cut to the input's length) and records every input it sees."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        return type("Out", (), {"logits": self.logits[: input_ids.shape[0], : input_ids.shape[1]]})()


# The 2x4 SFT example. Row 0: prompt of 1, answer of 3, p = 0.5, positions 1 and 3 masked (CE 1 and 2 ln 2).
# Row 1: prompt of 2, answer of 2, p = 0.25, position 2 masked (CE 3 ln 2).
TARGETS = torch.tensor([[0, 1, 2, 1], [2, 0, 1, 0]])
Q = torch.tensor([[0.9, 1 / 2, 0.9, 1 / 4], [0.9, 0.9, 1 / 8, 0.9]])
MASKED = torch.tensor([[False, True, False, True], [False, False, True, False]])
P = torch.tensor([[0.5] * 4, [0.25] * 4])
ANSWER_LEN = torch.tensor([3, 2])
# Weighted sums per row: (1 + 2) ln2 / 0.5 = 6 ln2 and 3 ln2 / 0.25 = 12 ln2.


def test_mdm_loss_pretraining_weights_by_one_over_p_and_divides_by_b_times_l():
    loss = mdm_loss(logits_for(TARGETS, Q), TARGETS, MASKED, P)
    assert loss.item() == pytest.approx((6 + 12) / 8 * LN2, rel=1e-6)  # 2.25 ln 2


def test_mdm_loss_sft_sequence_norm_divides_each_row_by_its_answer_length():
    loss = mdm_loss(logits_for(TARGETS, Q), TARGETS, MASKED, P, norm="sequence", answer_len=ANSWER_LEN)
    assert loss.item() == pytest.approx((6 / 3 + 12 / 2) / 2 * LN2, rel=1e-6)  # 4 ln 2


def test_mdm_loss_sft_token_norm_divides_by_all_answer_tokens():
    loss = mdm_loss(logits_for(TARGETS, Q), TARGETS, MASKED, P, norm="token", answer_len=ANSWER_LEN)
    assert loss.item() == pytest.approx((6 + 12) / (3 + 2) * LN2, rel=1e-6)  # 3.6 ln 2


def test_mdm_loss_ignores_unmasked_positions():
    q = Q.clone()
    q[~MASKED] = 0.01  # terrible predictions where nothing is masked change nothing
    assert mdm_loss(logits_for(TARGETS, q), TARGETS, MASKED, P).item() == pytest.approx(2.25 * LN2, rel=1e-6)


def test_mdm_loss_rejects_unknown_norm():
    with pytest.raises(ValueError):
        mdm_loss(logits_for(TARGETS, Q), TARGETS, MASKED, P, norm="batch", answer_len=ANSWER_LEN)


def test_forward_process_on_fixed_uniforms():
    """LLaDA's forward process: mask_positions draws the masks, mask_tokens writes them into the sequence."""
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    t = torch.tensor([0.5, 0.0])
    u = torch.tensor([[0.1, 0.6, 0.4, 0.9], [0.0005, 0.002, 0.0, 0.5]])
    masked, p = mask_positions(t, u, eps=0.1)
    noisy = mask_tokens(ids, masked, MASK)
    assert torch.allclose(p, torch.tensor([[0.55] * 4, [0.1] * 4]))  # p = (1 - eps) t + eps
    assert masked.tolist() == [[True, False, True, False], [True, True, True, False]]
    assert noisy.tolist() == [[MASK, 6, MASK, 8], [MASK, MASK, MASK, 8]]


def test_sft_noising_never_masks_outside_the_answer(monkeypatch):
    ids = torch.arange(10).repeat(3, 1) + 4
    answer = torch.arange(10).repeat(3, 1) >= torch.tensor([[2], [5], [9]])  # prompts of 2, 5 and 9 tokens
    monkeypatch.setattr(objectives, "sequence_noise", lambda batch, seed: (torch.ones(3), torch.zeros(3, 10)))
    c = MDMObjective(mask_id=MASK).corrupt({"input_ids": ids, "index": [0, 1, 2], "loss_mask": answer.long()})
    assert torch.equal(c.masked, answer)  # p = 1: every answer token masked, no prompt token
    assert torch.equal(c.noisy[~answer], ids[~answer])


def test_forward_process_masks_at_the_rate_p():
    """Statistical, on the objective's own noise: p ~ U(eps, 1) over rows; each row is masked at its rate p."""
    b, l, eps = 4000, 64, 0.2
    t, u = sequence_noise({"input_ids": torch.zeros(b, l, dtype=torch.long), "index": torch.arange(b)}, seed=0)
    masked, p = mask_positions(t, u, eps=eps)
    row_p, row_rate = p[:, 0], masked.float().mean(1)
    assert row_p.min() >= eps and row_p.max() <= 1
    assert row_rate.mean().item() == pytest.approx(eps + (1 - eps) / 2, abs=0.02)  # E[p] = 0.6
    assert (row_p < eps + (1 - eps) / 4).float().mean().item() == pytest.approx(0.25, abs=0.03)  # p uniform
    assert (row_rate - row_p).abs().mean().item() < 0.06  # binomial spread at L = 64 is about 0.05
    assert torch.corrcoef(torch.stack([row_rate, row_p]))[0, 1] > 0.95


def test_sequence_noise_depends_only_on_seed_and_index():
    a = {"input_ids": torch.zeros(3, 8, dtype=torch.long), "index": torch.tensor([7, 8, 9])}
    torch.manual_seed(123)
    t1, u1 = sequence_noise(a, seed=5)
    torch.manual_seed(456)  # the global RNG plays no part
    other_tokens = {"input_ids": torch.ones(3, 8, dtype=torch.long), "index": torch.tensor([7, 8, 9])}
    t2, u2 = sequence_noise(other_tokens, seed=5)
    assert torch.equal(t1, t2) and torch.equal(u1, u2)
    regrouped = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "index": torch.tensor([9, 8])}
    t3, u3 = sequence_noise(regrouped, seed=5)  # a row's noise does not depend on its batch
    assert torch.equal(t3, t1[[2, 1]]) and torch.equal(u3, u1[[2, 1]])
    t4, _ = sequence_noise(a, seed=6)
    assert not torch.equal(t4, t1)
    assert len(set(t1.tolist())) == 3  # different indices, different draws


def test_batch_generator_depends_only_on_seed_and_first_index():
    def draw(index, seed):
        batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "index": torch.tensor(index)}
        return torch.rand(4, generator=batch_generator(batch, seed))

    torch.manual_seed(1)
    first = draw([10, 11], 0)
    torch.manual_seed(2)
    assert torch.equal(first, draw([10, 99], 0))
    assert not torch.equal(first, draw([11, 12], 0))
    assert not torch.equal(first, draw([10, 11], 1))


def test_mdm_batches_without_index_are_refused():
    with pytest.raises(ValueError, match="index"):
        MDMObjective(mask_id=MASK)(FixedLogits(torch.zeros(1, 4, V)), {"input_ids": torch.zeros(1, 4).long()})


def pretraining_batch(b: int, l: int, first: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, MASK, (b, l), generator=torch.Generator().manual_seed(first)),
            "index": torch.arange(first, first + b)}


def test_mdm_pretraining_random_length_cut():
    """Ratio 1: every batch is cut to a length in [1, L] and the loss divides by B times that length."""
    b, l = 2, 16
    model = FixedLogits(torch.zeros(b, l, V))  # CE = ln 4 at every position
    cut = MDMObjective(mask_id=MASK, eps=0.999, random_length_ratio=1.0)  # p >= 0.999: nearly everything masked
    lengths = []
    for first in range(0, 80, 2):
        loss, metrics = cut(model, pretraining_batch(b, l, first))
        noisy = model.inputs[-1]
        n_masked = int((noisy == MASK).sum())
        lengths.append(noisy.shape[1])
        assert loss.item() == pytest.approx(n_masked * math.log(V) / (b * noisy.shape[1]), rel=2e-3)
        assert metrics["masked_fraction"].item() == pytest.approx(n_masked / noisy.numel())
    assert min(lengths) >= 1 and max(lengths) <= l and len(set(lengths)) > 4
    never = MDMObjective(mask_id=MASK, random_length_ratio=0.0)
    for first in range(0, 80, 2):
        never(model, pretraining_batch(b, l, first))
    assert {x.shape[1] for x in model.inputs[len(lengths):]} == {l}


def test_mdm_pretraining_loss_matches_formula_on_its_own_masks():
    """No cut: the loss is sum over masked of CE / p, divided by B L, on the masks the objective drew."""
    b, l = 2, 16
    q = torch.full((b, l), 0.5)
    batch = pretraining_batch(b, l, 0)
    model = FixedLogits(logits_for(batch["input_ids"], q))  # CE = ln 2 everywhere
    objective = MDMObjective(mask_id=MASK, eps=0.999, random_length_ratio=0.0)
    loss, _ = objective(model, batch)
    n_masked = int((model.inputs[-1] == MASK).sum())
    assert n_masked > 0
    assert loss.item() == pytest.approx(n_masked * LN2 / (b * l), rel=2e-3)


def sft_batch() -> dict[str, torch.Tensor]:
    """Two rows: prompts of 2 and 5 tokens, answers (EOS padding included) of 6 and 3 tokens."""
    input_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 1, 1], [2, 2, 0, 0, 1, 2, 0, 1]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]])
    return {"input_ids": input_ids, "loss_mask": loss_mask, "index": torch.tensor([0, 1])}


@pytest.mark.parametrize("norm, expected", [("sequence", (1 + 3) / 2 * LN2), ("token", (6 * 1 + 3 * 3) / 9 * LN2)])
def test_mdm_sft_masks_and_scores_only_the_answer(norm, expected):
    batch = sft_batch()
    q = torch.tensor([[0.5] * 8, [0.125] * 8])  # CE 1 ln 2 in row 0, 3 ln 2 in row 1
    q[batch["loss_mask"] == 0] = 0.01  # bad predictions on the prompt must not count
    model = FixedLogits(logits_for(batch["input_ids"], q))
    objective = MDMObjective(mask_id=MASK, eps=0.999, sft_norm=norm, random_length_ratio=1.0)
    loss, metrics = objective(model, batch)
    noisy = model.inputs[-1]
    prompt = batch["loss_mask"] == 0
    assert noisy.shape == batch["input_ids"].shape  # SFT batches are never cut
    assert torch.equal(noisy[prompt], batch["input_ids"][prompt])  # the prompt is never masked
    assert bool((noisy[~prompt] == MASK).all())  # p >= 0.999 masks the whole answer
    assert metrics["masked_fraction"].item() == 1.0
    assert loss.item() == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_always_masked_padding_is_masked_in_every_draw_and_weighted_one(monkeypatch, norm):
    """masked_pad: the padding is masked whatever the draw (here t = eps, so nothing else is) and counts with 1/p = 1."""
    batch = sft_batch()
    batch["always_masked"] = torch.tensor([[0] * 8, [0, 0, 0, 0, 0, 0, 1, 1]])  # row 1: two padding positions
    monkeypatch.setattr(objectives, "sequence_noise", lambda b, seed: (torch.zeros(2), torch.full((2, 8), 0.5)))
    q = torch.tensor([[0.5] * 8, [0.125] * 8])  # CE 3 ln 2 at row 1's padding
    model = FixedLogits(logits_for(batch["input_ids"], q))
    loss, _ = MDMObjective(mask_id=MASK, eps=0.01, sft_norm=norm)(model, batch)
    noisy = model.inputs[-1]
    assert (noisy == MASK).tolist() == batch["always_masked"].bool().tolist()
    expected = (2 * 3 * LN2 / 3) / 2 if norm == "sequence" else 2 * 3 * LN2 / 9  # answer lengths 6 and 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_mdm_sft_prompt_never_masked_at_any_noise_level():
    batch = sft_batch()
    model = FixedLogits(torch.zeros(2, 8, V))
    objective = MDMObjective(mask_id=MASK)
    prompt = batch["loss_mask"] == 0
    for start in range(0, 200, 2):
        batch["index"] = torch.tensor([start, start + 1])
        objective(model, batch)
        assert torch.equal(model.inputs[-1][prompt], batch["input_ids"][prompt])


def test_ar_loss_by_hand():
    ids = torch.tensor([[0, 1, 2]])
    q = torch.tensor([[1 / 2, 1 / 4, 0.9]])  # position i predicts ids[i + 1]
    logits = logits_for(ids[:, [1, 2, 0]], q)
    assert ar_loss(logits, ids).item() == pytest.approx(1.5 * LN2, rel=1e-6)  # mean of 1 and 2 ln 2
    assert ar_loss(logits, torch.tensor([[0, IGNORE, 2]])).item() == pytest.approx(2 * LN2, rel=1e-6)


def test_ar_pretraining_and_sft_objectives():
    ids = torch.tensor([[0, 1, 2, 0]])
    q = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 0.9]])
    model = FixedLogits(logits_for(ids[:, [1, 2, 3, 0]], q))
    loss, _ = ARObjective()(model, {"input_ids": ids, "index": torch.tensor([0])})
    assert loss.item() == pytest.approx(2 * LN2, rel=1e-6)  # mean of 1, 2, 3 ln 2
    sft = {"input_ids": ids, "loss_mask": torch.tensor([[0, 0, 1, 1]]), "index": torch.tensor([0])}
    loss, _ = ARObjective()(model, sft)
    assert loss.item() == pytest.approx(2.5 * LN2, rel=1e-6)  # only the answer's labels: 2 and 3 ln 2
    assert torch.equal(model.inputs[-1], ids)  # AR inputs are never noised


def test_objective_settings_are_checked():
    assert isinstance(build_objective("mdm", mask_id=MASK), MDMObjective)
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("bd3lm")
    with pytest.raises(UserError, match="normalisation"):
        MDMObjective(mask_id=MASK, sft_norm="batch")
    with pytest.raises(UserError, match="eps"):
        MDMObjective(mask_id=MASK, eps=0.0)


def test_corrupt_finds_the_masked_rows_on_the_host():
    """Pretraining: the masked rows come with the noised batch (no device sync), also after a random-length cut;
    SFT: only answer tokens are masked and the rows are left to the caller."""
    ids = torch.randint(0, MASK, (4, 24))
    for ratio in (0.0, 1.0):
        c = MDMObjective(mask_id=MASK, random_length_ratio=ratio).corrupt({"input_ids": ids, "index": [3, 4, 5, 6]})
        assert torch.equal(c.rows, c.masked.flatten().nonzero().squeeze(1)) and len(c.rows) > 0
        assert (c.noisy[c.masked] == MASK).all() and torch.equal(c.noisy[~c.masked], c.input_ids[~c.masked])
    answer = torch.zeros(4, 24, dtype=torch.long)
    answer[:, 12:] = 1
    c = MDMObjective(mask_id=MASK).corrupt({"input_ids": ids, "index": torch.arange(4), "loss_mask": answer})
    assert c.rows is None and c.masked.any() and not c.masked[:, :12].any()
