"""SFT data, as the tutorial builds it: Alpaca rows (instruction, input, output) -> chat messages -> the
tokenizer's chat template -> input_ids, labels (prompt = -100), prompt_len; saved with `save_to_disk`.

A row's ids are the prompt (the template up to the assistant's turn, tokenized alone, exactly what a
model is given at inference) followed by the answer and one EOS. The collator pads a batch to its longest
row with the padding scheme's tail (sft_padding.py; LLaDA's: EOS): the diffusion arm trains on the padding,
the AR arm scores the answer up to its first EOS only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from dlmstudy.data.corpus import holdout_split
from dlmstudy.data.sft_padding import PADDINGS, tail
from dlmstudy.data.sources import iter_rows, parse_source, source_fingerprint, source_kind, source_splits
from dlmstudy.data.tokenizer import tokenizer_fingerprint
from dlmstudy.errors import UserError

IGNORE = -100
SFT_VERSION = "sft-v1"


def alpaca_messages(row: dict) -> list[dict[str, str]]:
    """An Alpaca row as a user turn (instruction, a blank line, input if any) and an assistant turn (output)."""
    if "messages" in row:
        return row["messages"]
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise UserError(f"an SFT row has no text field {key!r} (Alpaca rows need instruction, input, output; "
                            f"row keys: {', '.join(map(str, row))})")
    prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def tokenize_messages(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int] | int]:
    """input_ids = prompt (with the assistant header) + answer + EOS; labels = input_ids with the prompt -100."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids,
            "prompt_len": len(prompt_ids)}


def read_alpaca_rows(source: str, *, seed: int = 0) -> dict[str, list[dict]]:
    """Rows of an SFT source by split: `train`, and `test` where the source has a test split or a test:M slice
    (from one table: M rows held out by a seeded shuffle; both splits keep file order)."""
    ref = parse_source(source)
    train_split, test_split = source_splits(ref.location)
    n_train, n_test = ref.slices.get("train"), ref.slices.get("test")
    if test_split is not None:
        return {"train": list(iter_rows(ref.location, split=train_split, limit=n_train)),
                "test": list(iter_rows(ref.location, split=test_split, limit=n_test))}
    rows = list(iter_rows(ref.location, limit=None if n_train is None else n_train + (n_test or 0)))
    if not rows:
        raise UserError(f"{source}: the SFT data is empty")
    if n_test is None:
        return {"train": rows}
    test_idx, train_idx = holdout_split(len(rows), seed, rows=n_test)
    return {"train": [rows[i] for i in sorted(train_idx)], "test": [rows[i] for i in sorted(test_idx)]}


def _publish(dd: datasets.DatasetDict, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    try:
        tmp.replace(folder)
    except OSError:  # another process saved the same dataset first
        shutil.rmtree(tmp, ignore_errors=True)


def _check_preprocessed(dd: datasets.DatasetDict, source: str, tokenizer: PreTrainedTokenizerBase) -> datasets.DatasetDict:
    """A preprocessed dataset needs input_ids and prompt_len (or labels to derive it) and ids the tokenizer knows."""
    out = {}
    for name, ds in dd.items():
        if "input_ids" not in ds.column_names or not {"prompt_len", "labels"} & set(ds.column_names):
            raise UserError(f"{source}: a preprocessed SFT dataset needs columns input_ids and prompt_len "
                            f"(or labels); split {name!r} has {', '.join(ds.column_names)}")
        if "prompt_len" not in ds.column_names:
            ds = ds.map(keep_in_memory=True, function=lambda r: {"prompt_len": next((i for i, x in enumerate(r["labels"]) if x != IGNORE),
                                                      len(r["labels"]))})
        top = pc.max(pc.list_flatten(ds.data.column("input_ids"))).as_py() if len(ds) else None
        if top is not None and top >= len(tokenizer):
            raise UserError(f"{source}: token id {top} is outside the tokenizer's {len(tokenizer):,} ids "
                            f"(preprocessed with another tokenizer?)")
        out[name] = ds
    return datasets.DatasetDict(out)


def load_sft_dataset(source: str | list[dict], tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                     load_preprocessed_data: bool = False, cache_dir: Path | None = None, seed: int = 0,
                     num_proc: int = 1, progress: Callable[[str], None] = print) -> datasets.DatasetDict:
    """Tokenized SFT splits (input_ids, labels, prompt_len); rows longer than `max_length` are dropped.

    source: Alpaca rows (a list, e.g. `Corpus.qa_train_rows`), or a path with an optional slice; with
    `load_preprocessed_data` a `save_to_disk` folder already holding tokens. With `cache_dir` the
    tokenized dataset is saved there (`save_to_disk`, keyed by content hash) and reused.
    """
    if load_preprocessed_data:
        if isinstance(source, list) or source_kind(str(source)) not in ("dataset", "datasetdict"):
            raise UserError(f"{source}: load_preprocessed_data needs a folder written by save_to_disk")
        dd = datasets.load_from_disk(str(source))
        dd = dd if isinstance(dd, datasets.DatasetDict) else datasets.DatasetDict({"train": dd})
        dd = _check_preprocessed(dd, str(source), tokenizer)
    else:
        if isinstance(source, list):
            content = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
        else:
            content = f"{source}:{source_fingerprint(parse_source(source).location)}"
        key = hashlib.sha256(f"{SFT_VERSION}:{content}:{tokenizer_fingerprint(tokenizer)}:{seed}".encode())
        folder = cache_dir / f"sft-{key.hexdigest()[:16]}" if cache_dir is not None else None
        if folder is not None and (folder / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(folder))
        else:
            splits = {"train": source} if isinstance(source, list) else read_alpaca_rows(source, seed=seed)
            dd = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
            dd = dd.map(lambda r: tokenize_messages(alpaca_messages(r), tokenizer), remove_columns=dd["train"].column_names,
                        num_proc=num_proc if num_proc > 1 else None, desc="Mapping dataset to SFT format")
            if folder is not None:
                _publish(dd, folder)
    kept = dd.filter(lambda r: len(r["input_ids"]) <= max_length, keep_in_memory=True)
    for name in dd:
        if len(kept[name]) < len(dd[name]):
            progress(f"sft: dropped {len(dd[name]) - len(kept[name]):,} of {len(dd[name]):,} {name} rows "
                     f"longer than max_length {max_length}")
    if len(kept["train"]) == 0:
        raise UserError(f"no SFT training row fits in max_length {max_length}")
    return kept


class SFTDataset(torch.utils.data.Dataset):
    """Item i is the i-th row of the run's fixed order, with its position (used to seed the noise)."""

    def __init__(self, rows: datasets.Dataset, order: np.ndarray):
        self.rows = rows
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[int(self.order[i])]
        return {"input_ids": row["input_ids"], "prompt_len": row["prompt_len"], "index": i}


def padding_tokens(tokenizer: PreTrainedTokenizerBase, padding: str, pad_tokens: int = 7
                   ) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """The tokenizer with the padding scheme's tail tokens (a copy with them added as special tokens where it lacks
    them; the tokenizer itself otherwise) and the tail's ids in cycle order ([EOS] for LLaDA's padding)."""
    names = PADDINGS[padding].tail_tokens(pad_tokens)
    if not names:
        return tokenizer, [tokenizer.eos_token_id]
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids(names)


@dataclass
class SFTCollator:
    """Pad a batch to its longest row: after each row's EOS, `tail_ids` in a cycle (default: EOS, as LLaDA pads).

    loss_mask (MDM): 1 from prompt_len to the end, padding included; labels (AR): the answer and its
    first EOS, -100 for the prompt and the padding; attention_mask: 1 on each row's own tokens. With
    `always_masked` (the `masked_pad` scheme) the batch also holds `always_masked`: 1 on the padding, which the
    diffusion objective masks in every draw.
    """

    eos_token_id: int
    tail_ids: list[int] | None = None
    always_masked: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        prompt_len = torch.tensor([int(f["prompt_len"]) for f in features])
        b, l = len(features), int(lengths.max())
        tail_ids = self.tail_ids or [self.eos_token_id]
        input_ids = torch.tensor([list(f["input_ids"]) + tail(tail_ids, l - len(f["input_ids"])) for f in features],
                                 dtype=torch.long).reshape(b, l)
        pos = torch.arange(l)[None, :]
        own = pos < lengths[:, None]
        answer = pos >= prompt_len[:, None]
        batch = {"input_ids": input_ids, "loss_mask": answer.long(),
                 "labels": input_ids.masked_fill(~(answer & own), IGNORE), "attention_mask": own.long(),
                 "prompt_len": prompt_len, "index": torch.tensor([int(f["index"]) for f in features])}
        if self.always_masked:
            batch["always_masked"] = (~own).long()
        return batch
