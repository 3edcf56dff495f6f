"""Corpora: the documents a study trains on, in the fixed order that makes unique-token prefixes nested.

`builtin:biographies` needs no files and is held in memory. Any other source (`dlmstudy.data.sources`)
is streamed: its documents are tokenized in source order into a cached pool, shuffled once with the
data seed at the document level, and split into held-out validation documents and the training
stream whose prefixes are the unique-token budgets. So every training prefix is nested in the larger
ones and disjoint from the validation documents.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from dlmstudy.data import biographies as bio
from dlmstudy.data.packing import TokenStream, cached_stream, select_documents, stream_key
from dlmstudy.data.sources import SourceRef, iter_texts, parse_source, source_fingerprint, source_splits
from dlmstudy.errors import UserError

BUILTIN = "builtin:biographies"


@dataclass
class Corpus:
    """Training documents in prefix order, held-out validation documents, and (built-in only) QA probes.

    groups[i] is the person of train_docs[i] (built-in), so `unique_people: k` is the prefix
    ending with person k's last document. probes[k] are the QA items of person k whose QA pairs
    are not in the training text (knowledge only stated name-first in biographies).
    A file corpus keeps its documents in `source` (read lazily by `corpus_streams`); its lists are empty.
    """

    train_docs: list[str]
    validation_docs: list[str]
    groups: list[int] | None = None
    probes: dict[int, list[bio.QAItem]] = field(default_factory=dict)
    qa_train_rows: list[dict[str, str]] = field(default_factory=list)
    source: SourceRef | None = None
    text_field: str = "text"
    seed: int = 0

    def tokenizer_texts(self) -> Iterator[str]:
        """Documents to train a BPE on, in source order (a file corpus: its training rows, read lazily)."""
        if self.source is None:
            return iter(self.train_docs)
        train_split, _ = source_splits(self.source.location)
        return iter_texts(self.source.location, text_field=self.text_field, split=train_split, limit=pool_rows(self.source))


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


def pool_rows(ref: SourceRef) -> int | None:
    """Rows read for the training pool: train:N (+ test:M held out of the same table), or all."""
    if "train" not in ref.slices:
        return None
    return ref.slices["train"] + (ref.slices.get("test", 0) if source_splits(ref.location)[1] is None else 0)


def holdout_split(n: int, seed: int, *, rows: int | None = None, lengths: np.ndarray | None = None,
                  tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) indices of n items shuffled once with `seed`: the permutation's first `rows`
    items, or its first items holding at least `tokens` tokens (whole documents)."""
    order = np.random.default_rng(seed).permutation(n)
    k = rows if rows is not None else int(np.searchsorted(np.cumsum(lengths[order]), tokens)) + 1
    if k >= n:
        raise UserError(f"the corpus ({n:,} documents) is too small to hold out "
                        f"{f'{rows:,} rows' if rows is not None else f'{tokens:,} validation tokens'} and still train")
    return order[:k], order[k:]


def load_corpus(source: str, *, text_field: str = "text", people: int = 2000, per_person: int = 1,
                qa_fraction: float = 0.5, seed: int = 0) -> Corpus:
    """The study's corpus from a spec's `data.pretrain` settings (a file source is checked, not read)."""
    if source == BUILTIN:
        return builtin_corpus(people, per_person=per_person, qa_fraction=qa_fraction, seed=seed)
    if source.startswith("builtin:"):
        raise UserError(f"unknown built-in source {source!r}; known: {BUILTIN}")
    ref = parse_source(source)
    train_split, _ = source_splits(ref.location)
    if next(iter_texts(ref.location, text_field=text_field, split=train_split, limit=1), None) is None:
        raise UserError(f"{source}: the corpus is empty")
    return Corpus([], [], source=ref, text_field=text_field, seed=seed)


def corpus_streams(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, cache_dir: Path, *,
                   validation_tokens: int, insert_eos: bool = True,
                   num_proc: int = 1) -> tuple[TokenStream, TokenStream]:
    """(training stream, validation stream), tokenized and cached under cache_dir by content hash.

    A file corpus: the pool (its training rows in source order) is tokenized once, then documents are
    shuffled with the data seed; the held-out ones are the source's test split, or the first test:M
    documents of the shuffle, or the first ones holding `validation_tokens`; the rest, in shuffled
    order, are the training stream.
    """
    if corpus.source is None:
        return (cached_stream(corpus.train_docs, tokenizer, cache_dir, name="train", insert_eos=insert_eos,
                              num_proc=num_proc),
                cached_stream(corpus.validation_docs, tokenizer, cache_dir, name="validation",
                              insert_eos=insert_eos, num_proc=num_proc))
    ref, field_ = corpus.source, corpus.text_field

    def stream(split: str | None, limit: int | None, name: str) -> tuple[TokenStream, str]:
        content = f"{source_fingerprint(ref.location, split, limit)}:{field_}"
        docs = iter_texts(ref.location, text_field=field_, split=split, limit=limit)
        return cached_stream(docs, tokenizer, cache_dir, name=name, insert_eos=insert_eos, num_proc=num_proc,
                             content_key=content), content

    train_split, test_split = source_splits(ref.location)
    pool, content = stream(train_split, pool_rows(ref), "pool")
    if len(pool) == pool.n_docs * insert_eos:
        raise UserError(f"{ref}: the corpus holds no text")
    if test_split is not None:
        validation, _ = stream(test_split, ref.slices.get("test"), "heldout")
        train_idx = np.random.default_rng(corpus.seed).permutation(pool.n_docs)
        val_idx, val_key = None, "split"
    else:
        rows = ref.slices.get("test")
        val_idx, train_idx = holdout_split(pool.n_docs, corpus.seed, rows=rows, lengths=pool.doc_lengths(),
                                           tokens=validation_tokens)
        val_key = f"rows={rows}" if rows is not None else f"tokens={validation_tokens}"
    key = stream_key(tokenizer, insert_eos, f"{content}:seed={corpus.seed}:{val_key}")
    train = select_documents(pool, train_idx, cache_dir / f"train-{key}")
    if val_idx is not None:
        validation = select_documents(pool, val_idx, cache_dir / f"validation-{key}")
    return train, validation
