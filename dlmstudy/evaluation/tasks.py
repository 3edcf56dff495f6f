"""Offline lm_eval tasks on the built-in biographies, written as YAML + JSONL on first use.

bio_qa_forward / bio_qa_reverse: generate_until, exact match on the answer (person -> attribute,
and attribute -> person: the reversal curse). bio_mc: the same questions as multiple choice
(loglikelihood), the right answer against the same attribute of other people. bio_ppl: held-out
biographies (differently worded), loglikelihood_rolling with word and byte perplexity.
All four carry the tag `bio`. Data paths in the YAML are absolute, so lm_eval finds them from any
working directory; nothing here needs a network.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import yaml

from dlmstudy.atomic import write_text_atomic
from dlmstudy.data.biographies import (
    Person,
    QAItem,
    biographies,
    generate_people,
    qa_items,
    qa_prompt,
)

TASKS = ("bio_qa_forward", "bio_qa_reverse", "bio_mc", "bio_ppl")
TAG = "bio"
VERSION = 1
DEFAULT_PEOPLE = 40
# Held-out wordings come from a seed no study's pretraining uses by default.
HELD_OUT_SEED = 7919


def _take(rows: list[Any], max_items: int | None, rng: random.Random) -> list[Any]:
    """At most max_items rows, a seeded sample kept in the original order."""
    if max_items is None or len(rows) <= max_items:
        return rows
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), max_items))]


def _qa_rows(items: list[QAItem]) -> list[dict[str, str]]:
    return [{"prompt": qa_prompt(q), "answer": q.output, "person": q.person, "attribute": q.attribute} for q in items]


def _mc_rows(items: list[QAItem], n_choices: int, rng: random.Random) -> list[dict[str, Any]]:
    """Each question with its answer and up to n_choices - 1 distinct wrong answers of the same kind."""
    pool: dict[tuple[str, str], list[str]] = {}
    for q in items:
        values = pool.setdefault((q.attribute, q.direction), [])
        if q.output not in values:
            values.append(q.output)
    rows = []
    for q in items:
        wrong = [v for v in pool[(q.attribute, q.direction)] if v != q.output]
        if not wrong:
            continue
        choices = rng.sample(wrong, min(n_choices - 1, len(wrong))) + [q.output]
        rng.shuffle(choices)
        rows.append({"prompt": qa_prompt(q), "choices": choices, "label": choices.index(q.output),
                     "direction": q.direction, "attribute": q.attribute})
    return rows


def _yaml(task: str, data: Path, body: dict[str, Any]) -> str:
    config = {"task": task, "tag": [TAG], "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              **body, "metadata": {"version": VERSION}}
    return yaml.safe_dump(config, sort_keys=False)


def _qa_body(max_gen_toks: int) -> dict[str, Any]:
    return {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": max_gen_toks, "do_sample": False},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": False, "ignore_punctuation": False}],
    }


MC_BODY = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{prompt}}",
    "doc_to_choice": "choices",
    "doc_to_target": "label",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}
PPL_BODY = {
    "output_type": "loglikelihood_rolling",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
}


def write_tasks(
    out_dir: str | Path,
    people: list[Person],
    *,
    ppl_documents: list[str] | None = None,
    max_items: int | None = None,
    n_choices: int = 4,
    max_gen_toks: int = 32,
    seed: int = 0,
) -> Path:
    """Write the four bio tasks about `people` into out_dir and return it (an lm_eval include_path).

    max_items caps each task's documents (a seeded sample); ppl_documents replaces the held-out
    biographies (by default one fresh wording per person).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = [q for p in people for q in qa_items(p)]
    forward = [q for q in items if q.direction == "forward"]
    reverse = [q for q in items if q.direction == "reverse"]
    docs = ppl_documents if ppl_documents is not None else biographies(people, seed=HELD_OUT_SEED + seed)
    rows = {
        "bio_qa_forward": _take(_qa_rows(forward), max_items, rng),
        "bio_qa_reverse": _take(_qa_rows(reverse), max_items, rng),
        "bio_mc": _take(_mc_rows(items, n_choices, rng), max_items, rng),
        "bio_ppl": _take([{"text": d} for d in docs], max_items, rng),
    }
    bodies = {"bio_qa_forward": _qa_body(max_gen_toks), "bio_qa_reverse": _qa_body(max_gen_toks),
              "bio_mc": MC_BODY, "bio_ppl": PPL_BODY}
    for task in TASKS:
        data = out / f"{task}.jsonl"
        write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in rows[task]))
        write_text_atomic(out / f"{task}.yaml", _yaml(task, data, bodies[task]))
    return out


def cache_root() -> Path:
    """Where generated files live: $DLMSTUDY_CACHE, else ~/.cache/dlmstudy."""
    return Path(os.environ.get("DLMSTUDY_CACHE") or Path.home() / ".cache" / "dlmstudy")


def builtin_tasks_dir(n_people: int = DEFAULT_PEOPLE, seed: int = 0) -> Path:
    """The include_path of the default bio tasks (the first n_people built-in people), written on first use."""
    out = cache_root() / "tasks" / f"bio-v{VERSION}-people{n_people}-seed{seed}"
    if not all((out / f"{t}.yaml").exists() for t in TASKS):
        write_tasks(out, generate_people(n_people, seed), seed=seed)
    return out
