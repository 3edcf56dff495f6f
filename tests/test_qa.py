"""Answer scoring: exact match of the first line, SQuAD token F1 of free-form answers; probe batching; sampler
settings compared probe by probe."""

from __future__ import annotations

import types

import pytest
import torch

from dlmstudy.analysis.paired import paired_comparison, reference_setting
from dlmstudy.data import biographies as bio
from dlmstudy.data.tokenizer import train_bpe
from dlmstudy.evaluation import qa
from dlmstudy.data.sft import padding_tokens
from dlmstudy.evaluation.qa import DecodeSettings, answer_questions, extract_answer, token_f1
from dlmstudy.sampling.end_tokens import cut_at_stop, end_tokens


def test_token_f1_counts_shared_words_after_normalising():
    assert token_f1("The cat sat.", "a cat sat") == 1.0            # case, punctuation and articles ignored
    assert token_f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # P 2/4, R 2/2
    assert token_f1("dog dog", "dog cat") == pytest.approx(0.5)    # a repeated word counts once per match
    assert token_f1("nothing shared", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_exact_match_uses_the_first_line_up_to_the_first_end_token():
    assert extract_answer("  Paris \nmore text") == "Paris"
    assert cut_at_stop([5, 6, 1, 7, 2], {1, 2}) == [5, 6]
    assert cut_at_stop([5, 6], {1}) == [5, 6]


def test_answers_end_at_any_end_token_and_the_eos_options_reach_the_sampler(monkeypatch):
    """After SFT an answer ends at EOS, <|im_end|> or a padding token; the diffusion sampler gets all of them."""
    items = [q for p in bio.generate_people(2, seed=0) for q in bio.qa_items(p)][:3]
    tokenizer, pads = padding_tokens(train_bpe([qa.qa_prompt(q) for q in items] * 4, vocab_size=300), "rainbow", 2)
    ends = end_tokens(tokenizer)
    paris = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    tails = [[ends.eot, *paris], [pads[1], *paris], [tokenizer.eos_token_id, *paris]]
    seen = {}

    def fake_sample(model, prompt, **options):
        seen.update(options)
        return torch.cat([prompt, torch.tensor([paris + t for t in tails][: prompt.shape[0]])], dim=1)

    monkeypatch.setattr(qa, "sample", fake_sample)
    model = types.SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]),
                                  config=types.SimpleNamespace(mask_token_id=tokenizer.mask_token_id))
    settings = DecodeSettings(steps=4, gen_length=4, block_length=4, batch_size=3, confidence_eos_eot_inf=True)
    rows = answer_questions(model, tokenizer, items, sampler="diffusion", settings=settings)
    assert [r["text"] for r in rows] == ["Paris"] * 3 and [r["answer_tokens"] for r in rows] == [len(paris)] * 3
    assert set(seen["eos_id"]) == {tokenizer.eos_token_id, tokenizer.pad_token_id, *pads}
    assert seen["eot_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") and seen["confidence_eos_eot_inf"]
    assert not seen["logits_eos_inf"] and not any(r["empty"] for r in rows)


def test_paired_comparison_counts_identical_answers_and_the_paired_error_of_the_difference():
    reference = [{"answer": a, "correct": c} for a, c in [("x", True), ("y", False), ("z", True), ("w", False)]]
    rows = [{"answer": a, "correct": c} for a, c in [("x", True), ("q", True), ("r", False), ("w", False)]]
    paired = paired_comparison(rows, reference)
    assert paired["same_answers"] == 0.5
    diff = [0.0, 1.0, -1.0, 0.0]  # mean 0, sample variance 2/3
    assert paired["accuracy_diff_se"] == pytest.approx((2 / 3 / len(diff)) ** 0.5)
    assert paired_comparison(reference, reference) == {"same_answers": 1.0, "accuracy_diff_se": 0.0}


def test_the_sampler_grids_reference_is_the_plain_sampler_with_the_most_steps():
    grid = [(8, 16, None, True), (16, 16, 0.9, False), (16, 16, None, True), (4, 16, None, False),
            (16, 16, None, False)]
    assert reference_setting(grid) == 4
    assert reference_setting(grid[:3]) == 2  # all compiled or parallel: the most steps without a threshold


@pytest.mark.parametrize("compiled", [False, True])
def test_compiled_probes_share_one_prompt_length_across_batches(monkeypatch, compiled):
    items = [q for p in bio.generate_people(3, seed=0) for q in bio.qa_items(p)]
    tokenizer = train_bpe([qa.qa_prompt(q) for q in items] * 4, vocab_size=300)
    widths = []

    def fake_sample(model, prompt, **options):  # answers nothing: records the prompt width of every batch
        widths.append(prompt.shape[1])
        return torch.cat([prompt, prompt.new_full((prompt.shape[0], 4), tokenizer.eos_token_id)], dim=1)

    monkeypatch.setattr(qa, "sample", fake_sample)
    model = types.SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]),
                                  config=types.SimpleNamespace(mask_token_id=0))
    rows = answer_questions(model, tokenizer, items, sampler="diffusion",
                            settings=DecodeSettings(steps=4, gen_length=4, block_length=4, batch_size=2,
                                                    compiled=compiled))
    assert len(rows) == len(items) and len(widths) == -(-len(items) // 2)
    longest = max(len(tokenizer(qa.qa_prompt(q), add_special_tokens=False)["input_ids"]) for q in items)
    if compiled:
        assert set(widths) == {longest}
    else:
        assert len(set(widths)) > 1 and max(widths) == longest
