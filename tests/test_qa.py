"""Answer scoring: exact match of the first line, SQuAD token F1 of free-form answers."""

from __future__ import annotations

import pytest

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
