"""Answer scoring: exact match of the first line, SQuAD token F1 of free-form answers; sampler settings compared
probe by probe."""

from __future__ import annotations

import pytest

from dlmstudy.analysis.paired import paired_comparison, reference_setting
from dlmstudy.evaluation.qa import cut_at_eos, extract_answer, token_f1


def test_token_f1_counts_shared_words_after_normalising():
    assert token_f1("The cat sat.", "a cat sat") == 1.0            # case, punctuation and articles ignored
    assert token_f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # P 2/4, R 2/2
    assert token_f1("dog dog", "dog cat") == pytest.approx(0.5)    # a repeated word counts once per match
    assert token_f1("nothing shared", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_exact_match_uses_the_first_line_up_to_eos():
    assert extract_answer("  Paris \nmore text") == "Paris"
    assert cut_at_eos([5, 6, 1, 7], eos_id=1) == [5, 6]
    assert cut_at_eos([5, 6], eos_id=1) == [5, 6]


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
