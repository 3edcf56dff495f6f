"""Sampler settings compared probe by probe: the same questions answered two ways.

Two accuracies on n probes each have a standard error of about sqrt(p (1 - p) / n) (2.6 points at n = 360 and
p = 0.5), but settings that agree on most answers differ far less than that: the paired error of the difference,
sd(correct_i - reference_i) / sqrt(n), is what "equal accuracy" is judged against. Torch-free, so reports use it.
"""

from __future__ import annotations

import math


def paired_comparison(rows: list[dict], reference: list[dict]) -> dict[str, float]:
    """The same probes answered two ways: the share of identical answers, and the standard error of the mean of
    (correct - reference correct), i.e. of the accuracy difference measured pair by pair."""
    if len(rows) != len(reference):
        raise ValueError(f"{len(rows)} answers against {len(reference)} reference answers")
    same = [a["answer"] == r["answer"] for a, r in zip(rows, reference)]
    diff = [float(a["correct"]) - float(r["correct"]) for a, r in zip(rows, reference)]
    n, mean = len(diff), sum(diff) / max(len(diff), 1)
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n) if n > 1 else float("nan")
    return {"same_answers": sum(same) / max(n, 1), "accuracy_diff_se": se}


def reference_setting(grid: list[tuple]) -> int:
    """Index of the plain sampler in a grid of (steps, block_length, threshold, compiled): no threshold, eager,
    the most steps (the first such; falling back to the most steps when every setting is compiled or parallel)."""
    def key(i: int) -> tuple:
        steps, _, threshold, compiled = grid[i]
        return threshold is not None, bool(compiled), -steps, i
    return min(range(len(grid)), key=key)
