"""Corpora: the documents a study trains on, in the fixed order that makes unique-token prefixes nested.

`builtin:biographies` needs no files; any other source is read by `dlmstudy.data.sources`.
The validation documents are disjoint from every training prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dlmstudy.data import biographies as bio
from dlmstudy.errors import UserError

BUILTIN = "builtin:biographies"


@dataclass
class Corpus:
    """Training documents in prefix order, held-out validation documents, and (built-in only) QA probes.

    groups[i] is the person of train_docs[i] (built-in), so `unique_people: k` is the prefix
    ending with person k's last document. probes[k] are the QA items of person k whose QA pairs
    are not in the training text (knowledge only stated name-first in biographies).
    """

    train_docs: list[str]
    validation_docs: list[str]
    groups: list[int] | None = None
    probes: dict[int, list[bio.QAItem]] = field(default_factory=dict)
    qa_train_rows: list[dict[str, str]] = field(default_factory=list)


def builtin_corpus(people: int, *, per_person: int = 1, qa_fraction: float = 0.5, seed: int = 0) -> Corpus:
    """Biographies of `people` people (+ QA text for a `qa_fraction` of them) and held-out validation people."""
    n_val = max(10, people // 10)
    everyone = bio.generate_people(people + n_val, seed)
    train_people, val_people = everyone[:people], everyone[people:]
    rng = random.Random(seed + 2)
    qa_train = {i for i in range(people) if rng.random() < qa_fraction}
    bios = bio.biographies(train_people, per_person=per_person, seed=seed)
    docs, groups, probes, qa_rows = [], [], {}, []
    for i, person in enumerate(train_people):
        docs += bios[i * per_person:(i + 1) * per_person]
        groups += [i] * per_person
        items = bio.qa_items(person)
        if i in qa_train:
            docs += [bio.qa_document(q) for q in items]
            groups += [i] * len(items)
            qa_rows += bio.alpaca_rows(items)
        else:
            probes[i] = items
    val_docs = bio.biographies(val_people, per_person=1, seed=seed + 3)
    return Corpus(docs, val_docs, groups, probes, qa_rows)


def split_validation(docs: list[str], validation_chars: int, seed: int) -> Corpus:
    """Shuffle documents once (seeded) and hold out the first ones as validation (about `validation_chars`)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val, taken = [], 0
    while order and taken < validation_chars:
        i = order.pop(0)
        val.append(docs[i])
        taken += len(docs[i])
    if not order:
        raise UserError("the corpus is too small to hold out a validation set and still train")
    return Corpus([docs[i] for i in order], val)


def load_corpus(source: str, *, text_field: str = "text", people: int = 2000, per_person: int = 1,
                qa_fraction: float = 0.5, validation_chars: int = 65536, seed: int = 0) -> Corpus:
    """The study's corpus from a spec's `data.pretrain` settings."""
    if source == BUILTIN:
        return builtin_corpus(people, per_person=per_person, qa_fraction=qa_fraction, seed=seed)
    if source.startswith("builtin:"):
        raise UserError(f"unknown built-in source {source!r}; known: {BUILTIN}")
    from dlmstudy.data.sources import read_texts

    docs = read_texts(source, text_field=text_field)
    if not docs:
        raise UserError(f"{source}: the corpus is empty")
    return split_validation(docs, validation_chars, seed)
