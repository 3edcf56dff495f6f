"""The report's first screen: what was compared, how many runs of each stage there are, the study's scale in one
line, and one sentence per claim (its verdict and the number it rests on)."""

from __future__ import annotations

import pandas as pd

from dlmstudy.analysis.claims import CLAIMS
from dlmstudy.analysis.frames import StudyFrames
from dlmstudy.analysis.noise import ASSUMED_SEED_SD
from dlmstudy.analysis.verdicts import INCONCLUSIVE, NOT_TESTABLE, Verdict
from dlmstudy.reports.page import escape
from dlmstudy.study.plan import short_count

STAGES = {"pretrain": "pretraining", "tune": "learning-rate sweeps", "sft": "SFT"}


def _stage(row: pd.Series) -> str:
    stage = row.get("stage")
    if isinstance(stage, str) and stage in STAGES:
        return stage
    return "sft" if str(row.get("run_id", "")).startswith("sft-") else "pretrain"


def stage_counts(frames: StudyFrames) -> dict[str, dict[str, int]]:
    """Per stage (pretrain, tune, sft): finished, diverged and missing runs (planned or started, no result)."""
    missing = [_stage(row) for _, row in frames.missing_runs.iterrows()] if len(frames.missing_runs) else []
    missing_ids = set(frames.missing)
    planned_sft = ({r for r, s in zip(frames.planned["run_id"], frames.planned["stage"]) if s == "sft"}
                   if {"run_id", "stage"} <= set(frames.planned.columns) else set())
    sft_seen = set()
    for frame in (frames.sft, frames.sft_scalars):
        if len(frame):
            sft_seen |= {run_id if isinstance(run_id, str) else f"{arm}/{name}"
                         for run_id, arm, name in zip(frame["run_id"], frame["arm"], frame["sft"])}
    tune_gone = frames.tune["diverged"].astype(bool) if len(frames.tune) else pd.Series(dtype=bool)
    return {"pretrain": {"finished": len(frames.runs), "diverged": len(frames.diverged),
                         "missing": missing.count("pretrain")},
            "tune": {"finished": int((~tune_gone).sum()), "diverged": int(tune_gone.sum()),
                     "missing": missing.count("tune")},
            "sft": {"finished": len((planned_sft - missing_ids) | sft_seen), "diverged": 0,
                    "missing": missing.count("sft")}}


def runs_line(counts: dict[str, dict[str, int]]) -> str:
    """"pretraining: 35 finished, 1 diverged, 0 missing; learning-rate sweeps: none; SFT: 9 finished, 0 missing"."""
    parts = []
    for stage, label in STAGES.items():
        c = counts[stage]
        if not any(c.values()):
            parts.append(f"{label}: none")
            continue
        diverged = f", {c['diverged']} diverged" if c["diverged"] or stage != "sft" else ""
        parts.append(f"{label}: {c['finished']} finished{diverged}, {c['missing']} missing")
    return "; ".join(parts)


def comparisons_line(verdicts: list[Verdict], listed: bool) -> str:
    """The pairs the claims compared, in order, and where they come from."""
    pairs = list(dict.fromkeys((v.diffusion, v.ar) for v in verdicts if v.diffusion != "—"))
    if not pairs:
        return "none (the study needs a diffusion arm and an AR arm)"
    source = "from the spec's `comparisons`" if listed else "every diffusion arm against every AR arm"
    return ", ".join(f"{d} vs {a}" for d, a in pairs) + f" ({source})"


def _values(series: pd.Series, fmt=short_count) -> str:
    values = sorted(series.dropna().unique())
    if len(values) > 5:
        return f"{fmt(values[0])}–{fmt(values[-1])}"
    return ", ".join(fmt(v) for v in values)


def scale_line(cells: pd.DataFrame, noise: pd.DataFrame) -> str:
    """The study's scale in one line: arms, sizes, data settings, the largest run, seeds."""
    if cells.empty:
        return "no finished runs with a final validation loss."
    arms = sorted(cells["arm"].unique())
    sizes = cells.groupby("size")["params"].mean().sort_values()
    seeds = cells["n_seeds"]
    replicated = int((seeds > 1).sum())
    measured = len(noise) and noise["dof"].gt(0).any()
    seed_text = ("one seed per setting" if not replicated else
                 f"{_values(seeds, lambda v: f'{v:g}')} seeds a setting, {replicated} of {len(seeds)} settings "
                 "replicated")
    noise_text = "seed noise measured" if measured else f"seed noise assumed, {ASSUMED_SEED_SD} nats/token"
    return (f"{len(arms)} arms ({', '.join(arms)}) × {len(sizes)} size{'s' if len(sizes) > 1 else ''} ("
            + ", ".join(f"{size}: {short_count(n)}" for size, n in sizes.items())
            + " non-embedding parameters); "
            f"U = {_values(cells['unique_tokens'])} unique tokens at {_values(cells['epochs'], lambda v: f'{v:g}')} "
            f"epochs; at most {short_count(cells['tokens'].max())} tokens and {cells['flops'].max():.2g} FLOPs a "
            f"run; {seed_text} ({noise_text}).")


def first_clause(text: str) -> str:
    """`text` up to its first "; " outside parentheses."""
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if depth == 0 and text.startswith("; ", i):
            return text[:i]
    return text


def short_reason(verdict: Verdict) -> str:
    """The first clause of a verdict's reason, without the test's name or the other tests' verdicts."""
    reason = first_clause(verdict.reason.split(" (other tests:")[0])
    for test in verdict.evidence:
        reason = reason.removeprefix(f"{test}: ")
    return reason


SHORT = 100  # characters: a not-testable verdict's numbers are shown when they are numbers and at most this long


def _pair(verdict: Verdict) -> str:
    """"llada vs qwen (the decisive number)"; a not-testable verdict's number only when it is short and a number
    (it decides nothing)."""
    name = f"{verdict.diffusion} vs {verdict.ar}" if verdict.diffusion != "—" else "every comparison"
    number = verdict.decisive if verdict.decisive not in ("—", "") else ""
    if verdict.verdict == NOT_TESTABLE and (len(number) > SHORT or not any(c.isdigit() for c in number)):
        number = ""
    return name + (f" ({escape(number)})" if number else "")


def claim_sentences(verdicts: list[Verdict]) -> list[str]:
    """One sentence per claim: its verdict for each comparison with the number it rests on; why, when the verdict
    is inconclusive or not testable. Comparisons with the same verdict and reason share one clause."""
    lines = []
    for key, (claim, _) in CLAIMS.items():
        groups: dict[tuple[str, str], list[Verdict]] = {}
        for v in (v for v in verdicts if v.claim == key):
            why = short_reason(v) if v.verdict in (NOT_TESTABLE, INCONCLUSIVE) else ""
            groups.setdefault((v.verdict, why), []).append(v)
        clauses = [f"*{verdict}* for {' and '.join(_pair(v) for v in members)}" + (f": {escape(why)}" if why else "")
                   for (verdict, why), members in groups.items()]
        lines.append(f"- **({key}) {escape(claim)}**: " + "; ".join(clauses) + ".")
    return lines
