"""The verdict rules, in one place: how a test's settings and a claim's tests become a verdict.

A test looks at one or more *settings* (a model size and data setting, a U, a pooled fit); each setting
points toward the claim (+1), against it (−1), nowhere beyond the noise (0), or cannot decide (None).
A test's verdict:

- **supported** / **contradicted**: every setting that points somewhere points the same way, and at least
  REPLICATED_SETTINGS of them are replicated (several seeds, so the noise is measured, not assumed);
- **suggested** / **contradiction suggested**: the same, with fewer replicated settings (a single seed, or
  one setting);
- **inconclusive**: settings point both ways, or none is beyond the noise;
- **not testable**: no setting can decide (the grid lacks what the test needs; the reason says what).

A claim's verdict combines its deciding tests the same way: tests that are not testable are set aside;
tests pointing both ways give inconclusive; otherwise the strongest verdict among the tests pointing one way
stands (a test within the noise does not cancel one beyond it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

SUPPORTED = "supported"
SUGGESTED = "suggested"
CONTRADICTED = "contradicted"
CONTRADICTION_SUGGESTED = "contradiction suggested"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable"
REPLICATED_SETTINGS = 2  # replicated settings a strong verdict needs
DIRECTION = {SUPPORTED: 1, SUGGESTED: 1, CONTRADICTED: -1, CONTRADICTION_SUGGESTED: -1, INCONCLUSIVE: 0}
STRONG = {SUPPORTED, CONTRADICTED}


@dataclass(frozen=True)
class Setting:
    """One setting's outcome in a test: direction +1 (toward the claim), −1, 0 (nowhere beyond the noise) or
    None (cannot decide); `replicated` when its numbers rest on several seeds; `note` says why a setting
    points nowhere when that is more than "within the noise"."""

    label: str
    direction: int | None
    replicated: bool
    note: str = ""


def judge(settings: list[Setting], *, needed: int = REPLICATED_SETTINGS) -> tuple[str, str]:
    """A test's (verdict, reason) from its settings (`needed`: replicated settings a strong verdict needs)."""
    decided = [s for s in settings if s.direction is not None]
    if not decided:
        return NOT_TESTABLE, "no setting can decide"
    pointing = {s.direction for s in decided} - {0}
    if len(pointing) == 2:
        toward = ", ".join(s.label for s in decided if s.direction == 1)
        against = ", ".join(s.label for s in decided if s.direction == -1)
        return INCONCLUSIVE, f"settings disagree (toward the claim: {toward}; against: {against})"
    if not pointing:
        return INCONCLUSIVE, "; ".join(f"{s.label}: {s.note or 'within the noise'}" for s in decided)
    direction = pointing.pop()
    agreeing = [s for s in decided if s.direction == direction]
    replicated = [s for s in agreeing if s.replicated]
    within = len(decided) - len(agreeing)
    tail = f"; {within} other setting(s) pointing nowhere" if within else ""
    if len(replicated) >= needed:
        return ((SUPPORTED if direction > 0 else CONTRADICTED),
                f"beyond the measured noise in {len(replicated)} replicated setting(s){tail}")
    weak = SUGGESTED if direction > 0 else CONTRADICTION_SUGGESTED
    if not replicated:
        return weak, (f"{len(agreeing)} setting(s) beyond the noise, each from a single seed (seed noise not "
                      f"replicated there); a strong verdict needs {needed} replicated settings{tail}")
    return weak, (f"{len(replicated)} replicated setting(s) beyond the measured noise; a strong verdict needs "
                  f"{needed}{tail}")


@dataclass
class Finding:
    """One test of one claim for one comparison: verdict, the decisive number (short), why, and its evidence
    frame; `decides` is False for context the verdict does not use."""

    claim: str
    test: str
    verdict: str
    decisive: str
    reason: str
    evidence: pd.DataFrame = field(default_factory=pd.DataFrame)
    decides: bool = True


def combine(results: list[Finding]) -> tuple[str, str, str]:
    """A claim's (verdict, decisive number, reason) from its tests (rules in the module docstring)."""
    deciding = [r for r in results if r.decides]
    testable = [r for r in deciding if r.verdict != NOT_TESTABLE]
    if not testable:
        why = "; ".join(f"{r.test}: {r.reason}" for r in deciding) or "no test applies"
        return NOT_TESTABLE, "; ".join(r.decisive for r in deciding) or "—", why
    pointing = {DIRECTION[r.verdict] for r in testable} - {0}
    if len(pointing) == 2:
        return INCONCLUSIVE, "; ".join(r.decisive for r in testable), "tests disagree: " + "; ".join(
            f"{r.test} {r.verdict}" for r in testable)
    if not pointing:
        return INCONCLUSIVE, "; ".join(r.decisive for r in testable), "; ".join(
            f"{r.test}: {r.reason}" for r in testable)
    direction = pointing.pop()
    agreeing = [r for r in testable if DIRECTION[r.verdict] == direction]
    best = max(agreeing, key=lambda r: r.verdict in STRONG)
    others = [f"{r.test}: {r.verdict}" for r in testable if r is not best]
    return best.verdict, best.decisive, f"{best.test}: {best.reason}" + (
        f" (other tests: {'; '.join(others)})" if others else "")


@dataclass
class Verdict:
    """The structured verdict on one claim for one comparison (diffusion arm, AR arm): the verdict, the
    decisive number as a short string, the reason, and the evidence: one small frame per test."""

    claim: str
    diffusion: str
    ar: str
    verdict: str
    decisive: str
    reason: str
    evidence: dict[str, pd.DataFrame] = field(default_factory=dict)
