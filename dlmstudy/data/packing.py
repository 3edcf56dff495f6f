"""Token streams, nested unique-token prefixes and repeated epochs.

A run with U unique tokens and R epochs trains on the first U tokens of the corpus stream (packed
into `max_length` chunks, tail dropped), seen R times with a fresh chunk order each epoch. The
order depends only on (data seed, U, R), so every arm sees the same batches in the same order.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from dlmstudy.errors import UserError


@dataclass
class TokenStream:
    """Concatenated documents (EOS after each) and the end offset of every document."""

    tokens: np.ndarray
    doc_ends: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_stream(docs: list[str], tokenizer: PreTrainedTokenizerBase, *, insert_eos: bool = True,
                    batch_size: int = 1000) -> TokenStream:
    """Tokenize documents in order and join them into one stream."""
    pieces, ends, total = [], [], 0
    eos = [tokenizer.eos_token_id] if insert_eos else []
    for start in range(0, len(docs), batch_size):
        for ids in tokenizer(docs[start:start + batch_size], add_special_tokens=False)["input_ids"]:
            ids = ids + eos
            pieces.append(np.asarray(ids, dtype=np.int32))
            total += len(ids)
            ends.append(total)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return TokenStream(tokens, np.asarray(ends, dtype=np.int64))


def cached_stream(docs: list[str], tokenizer: PreTrainedTokenizerBase, cache_dir: Path, *, name: str,
                  insert_eos: bool = True) -> TokenStream:
    """`tokenize_stream`, cached on disk by content hash and memory-mapped when reused."""
    h = hashlib.sha256(f"{tokenizer.name_or_path}:{len(tokenizer)}:{insert_eos}:".encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    folder = cache_dir / f"{name}-{h.hexdigest()[:16]}"
    if not (folder / "tokens.npy").exists():
        stream = tokenize_stream(docs, tokenizer, insert_eos=insert_eos)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "tokens.npy", stream.tokens)
        np.save(tmp / "doc_ends.npy", stream.doc_ends)
        tmp.replace(folder)
    return TokenStream(np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "doc_ends.npy"))


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
