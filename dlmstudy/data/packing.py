"""Token streams, nested unique-token prefixes and repeated epochs.

Documents are tokenized in batches (in a pool of `num_proc` workers, order preserved), EOS is
appended to each, and the ids are appended to a file on disk, so a corpus larger than memory
streams through; the result is cached by content hash and memory-mapped.

A run with U unique tokens and R epochs trains on the first U tokens of the corpus stream (packed
into `max_length` chunks, tail dropped), seen R times with a fresh chunk order each epoch. The
order depends only on (data seed, U, R), so every arm sees the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dlmstudy.damaged import set_aside
from dlmstudy.data.tokenizer import tokenizer_fingerprint
from dlmstudy.errors import UserError

STREAM_VERSION = "stream-v2"
TOKEN_DTYPE = np.int32


@dataclass
class TokenStream:
    """Concatenated documents (EOS after each) and the end offset of every document."""

    tokens: np.ndarray
    doc_ends: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ends)

    def doc_lengths(self) -> np.ndarray:
        """Tokens of each document (its EOS included)."""
        return np.diff(np.asarray(self.doc_ends), prepend=0)

    def document(self, i: int) -> np.ndarray:
        """The ids of document i."""
        start = int(self.doc_ends[i - 1]) if i else 0
        return np.asarray(self.tokens[start:int(self.doc_ends[i])])


# Set in the parent before a fork, so pool workers inherit the tokenizer instead of unpickling it.
_ENCODER: tuple[PreTrainedTokenizerBase, int | None] | None = None


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch: (its documents' ids concatenated, EOS after each if set; the documents' lengths)."""
    tokenizer, eos = _ENCODER
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if eos is not None:
        ids = [x + [eos] for x in ids]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
    return flat, lengths


def encode_batches(batches: Iterable[list[str]], tokenizer: PreTrainedTokenizerBase, *, insert_eos: bool = True,
                   num_proc: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`_encode` over document batches, in order; with num_proc > 1 in a forked pool, at most 2 batches per
    worker in flight (so a lazy input is never read far ahead)."""
    global _ENCODER
    _ENCODER = (tokenizer, tokenizer.eos_token_id if insert_eos else None)
    if num_proc <= 1:
        yield from map(_encode, batches)
        return
    # Each worker runs one tokenizer thread: the parallelism is the pool's.
    with multiprocessing.get_context("fork").Pool(num_proc, os.environ.__setitem__,
                                                   ("TOKENIZERS_PARALLELISM", "false")) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[Path]:
    """A temporary folder that becomes `folder` only when the block finishes (removed if it fails); if
    another process published the same folder first, theirs is kept."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        tmp.replace(folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stream_problem(folder: Path) -> str | None:
    """What is damaged in a cached stream folder (None when its meta.json parses and each array file holds
    exactly the values it names)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        sizes = {"tokens.bin": int(meta["tokens"]) * np.dtype(TOKEN_DTYPE).itemsize,
                 "doc_ends.bin": int(meta["documents"]) * np.dtype(np.int64).itemsize}
    except (OSError, ValueError, KeyError, TypeError):
        return "meta.json is not readable"
    for name, size in sizes.items():
        have = (folder / name).stat().st_size if (folder / name).is_file() else None
        if have != size:
            return f"{name} holds {have if have is not None else 'no'} bytes, its meta.json says {size:,}"
    return None


def _reusable(folder: Path) -> bool:
    """A finished cache folder to reuse; a damaged one is set aside (and reported) so that it is built again."""
    if not (folder / "meta.json").is_file():
        return False
    problem = stream_problem(folder)
    if problem is None:
        return True
    moved = set_aside(folder)
    print(f"{folder}: damaged ({problem}); set aside as {moved.name}, building it again", flush=True)
    return False


def load_stream(folder: Path) -> TokenStream:
    """A cached stream, memory-mapped (nothing is read until used)."""
    meta = json.loads((folder / "meta.json").read_text())

    def mapped(name: str, dtype, n: int) -> np.ndarray:
        return np.memmap(folder / name, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)

    return TokenStream(mapped("tokens.bin", TOKEN_DTYPE, meta["tokens"]), mapped("doc_ends.bin", np.int64, meta["documents"]))


def write_stream(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, folder: Path, *, insert_eos: bool = True,
                 num_proc: int = 1, batch_size: int = 256, desc: str = "tokenizing") -> TokenStream:
    """Tokenize documents in order, appending ids to `folder/tokens.bin` batch by batch (never all in memory)."""
    n_tokens = n_docs = 0
    with _building(folder) as tmp:
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "doc_ends.bin", "wb") as fd, \
                tqdm(desc=desc, unit="doc", disable=None) as bar:
            for flat, lengths in encode_batches(_batched(texts, batch_size), tokenizer, insert_eos=insert_eos,
                                                num_proc=num_proc):
                flat.tofile(ft)
                (n_tokens + np.cumsum(lengths)).tofile(fd)
                n_tokens += int(lengths.sum())
                n_docs += len(lengths)
                bar.update(len(lengths))
        (tmp / "meta.json").write_text(json.dumps({"version": STREAM_VERSION, "tokens": n_tokens,
                                                   "documents": n_docs, "insert_eos": insert_eos}))
    return load_stream(folder)


def tokenize_stream(docs: list[str], tokenizer: PreTrainedTokenizerBase, *, insert_eos: bool = True,
                    batch_size: int = 1000) -> TokenStream:
    """Tokenize documents in order and join them into one in-memory stream."""
    pieces, ends = [np.zeros(0, TOKEN_DTYPE)], [np.zeros(0, np.int64)]
    total = 0
    for flat, lengths in encode_batches(_batched(docs, batch_size), tokenizer, insert_eos=insert_eos):
        pieces.append(flat)
        ends.append(total + np.cumsum(lengths))
        total += int(lengths.sum())
    return TokenStream(np.concatenate(pieces), np.concatenate(ends))


def stream_key(tokenizer: PreTrainedTokenizerBase, insert_eos: bool, content: str) -> str:
    """Cache key of a token stream: format version, tokenizer, EOS setting and a hash of the documents."""
    text = f"{STREAM_VERSION}:{tokenizer_fingerprint(tokenizer)}:{insert_eos}:{content}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def docs_hash(docs: Iterable[str]) -> str:
    """Content hash of a list of documents (order matters)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return h.hexdigest()


def cached_stream(docs: Iterable[str], tokenizer: PreTrainedTokenizerBase, cache_dir: Path, *, name: str,
                  insert_eos: bool = True, num_proc: int = 1, content_key: str | None = None) -> TokenStream:
    """`write_stream` cached under cache_dir by content hash and memory-mapped when reused.

    `content_key` (a hash of the source files) lets a lazy `docs` iterable be read only on a cache miss;
    without it `docs` must be a list, and is hashed.
    """
    key = stream_key(tokenizer, insert_eos, content_key or docs_hash(docs))
    folder = cache_dir / f"{name}-{key}"
    if _reusable(folder):
        return load_stream(folder)
    return write_stream(docs, tokenizer, folder, insert_eos=insert_eos, num_proc=num_proc, desc=f"tokenizing {name}")


def select_documents(stream: TokenStream, order: np.ndarray, folder: Path) -> TokenStream:
    """A new cached stream holding the documents `order` names, in that order (copied block by block)."""
    if _reusable(folder):
        return load_stream(folder)
    ends = np.asarray(stream.doc_ends)
    starts = np.concatenate([[0], ends[:-1]])
    n_tokens = 0
    with _building(folder) as tmp:
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "doc_ends.bin", "wb") as fd:
            for block in np.array_split(np.asarray(order), max(1, len(order) // 4096)):
                for i in block:
                    np.asarray(stream.tokens[starts[i]:ends[i]], dtype=TOKEN_DTYPE).tofile(ft)
                lengths = ends[block] - starts[block]
                (n_tokens + np.cumsum(lengths)).tofile(fd)
                n_tokens += int(lengths.sum())
        (tmp / "meta.json").write_text(json.dumps({"version": STREAM_VERSION, "tokens": n_tokens,
                                                   "documents": len(order)}))
    return load_stream(folder)


def prefix_chunks(stream: TokenStream, unique_tokens: int, max_length: int) -> np.ndarray:
    """The first `unique_tokens` tokens as [n, max_length] chunks (the partial tail chunk dropped)."""
    if unique_tokens > len(stream):
        raise UserError(f"unique tokens {unique_tokens:,} exceed the corpus ({len(stream):,} training tokens)")
    n = unique_tokens // max_length
    if n == 0:
        raise UserError(f"unique tokens {unique_tokens:,} hold no full sequence of max_length {max_length}")
    return np.asarray(stream.tokens[: n * max_length]).reshape(n, max_length)


def epoch_order(n_chunks: int, epochs: float, seed: int) -> np.ndarray:
    """Chunk indices for `epochs` passes, each full pass a fresh permutation; a fractional last pass is a prefix."""
    total = round(epochs * n_chunks)
    if total < 1:
        raise UserError(f"{epochs} epochs of {n_chunks} sequences is less than one sequence")
    passes = [np.random.default_rng([seed, e]).permutation(n_chunks) for e in range(math.ceil(total / n_chunks))]
    return np.concatenate(passes)[:total]


class PackedDataset(torch.utils.data.Dataset):
    """Item i is the i-th sequence of the run's fixed order, with its position (used to seed the noise)."""

    def __init__(self, chunks: np.ndarray, order: np.ndarray):
        self.chunks = chunks
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(np.array(self.chunks[self.order[i]], dtype=np.int64)),
                "index": torch.tensor(i)}


def measure_tokenization(texts: list[str], tokenizer: PreTrainedTokenizerBase, *, num_proc: int = 1,
                         repeats: int = 3, batch_size: int = 256) -> dict[str, float]:
    """Median throughput of tokenizing `texts` (docs/s, tokens/s, MB/s of UTF-8) over `repeats` runs."""
    mb = sum(len(t.encode()) for t in texts) / 1e6
    times, n_tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        n_tokens = sum(len(flat) for flat, _ in encode_batches(_batched(texts, batch_size), tokenizer,
                                                               num_proc=num_proc))
        times.append(time.perf_counter() - start)
    t = float(np.median(times))
    return {"docs": len(texts), "tokens": n_tokens, "mb": mb, "seconds": t, "docs_per_s": len(texts) / t,
            "tokens_per_s": n_tokens / t, "mb_per_s": mb / t}
