"""Reading corpora lazily, row by row: local jsonl / json (also .gz, .xz), parquet, txt, folders written
by `datasets`' `save_to_disk`, and a hub dataset name only when the hub is reachable.

A source string may end in the tutorial's slice, `path[train:1_000_000,test:1000]`: the first N rows
of the training rows and M held-out rows (`docs/data.md` says how a single file is split).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dlmstudy.errors import UserError

SLICE = re.compile(r"^(?P<location>.+)\[(?P<slices>[^\[\]]*)\]$")
SLICE_NAMES = ("train", "test")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
FORMATS = (".jsonl", ".json", ".txt", ".parquet")
FILE_NAME = re.compile(r"\.(jsonl|json|txt|parquet)(\.gz|\.xz)?$", re.IGNORECASE)
# Errors a damaged or mislabelled file raises while it is read.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError, json.JSONDecodeError)


@dataclass(frozen=True)
class SourceRef:
    """A parsed source string: where the rows live and how many rows of each split to take (absent = all)."""

    location: str
    slices: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        inner = ",".join(f"{k}:{v}" for k, v in self.slices.items())
        return f"{self.location}[{inner}]" if self.slices else self.location


def parse_source(source: str) -> SourceRef:
    """Split `path[train:N,test:M]` into the location and its row counts (underscores in numbers allowed)."""
    source = os.path.expanduser(source.strip())
    m = SLICE.match(source)
    if m is None or Path(source).exists():
        return SourceRef(source)
    slices = {}
    for part in m["slices"].split(","):
        name, sep, count = (s.strip() for s in part.partition(":"))
        if not sep or name not in SLICE_NAMES:
            raise UserError(f"{source}: bad slice {part.strip()!r}; write {m['location']}[train:N,test:M]")
        try:
            slices[name] = int(count)
        except ValueError:
            raise UserError(f"{source}: slice {name!r} needs a whole number of rows, got {count!r}") from None
        if slices[name] < 1:
            raise UserError(f"{source}: slice {name!r} must take at least one row")
    return SourceRef(m["location"].strip(), slices)


def hub_reachable(timeout: float = 1.5) -> bool:
    """False when an offline variable is set or the hub's host does not answer within `timeout` seconds
    (the DNS lookup included: it runs in a daemon thread, so a hanging resolver cannot hang the study)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered)


def source_kind(location: str) -> str:
    """One of jsonl, json, txt, parquet, dataset, datasetdict (save_to_disk folders) or hub."""
    path = Path(location)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return "datasetdict"
        if (path / "state.json").is_file():
            return "dataset"
        raise UserError(f"{location}: a folder source must be written by datasets' save_to_disk")
    if path.exists():
        name = path.name.lower()
        if name.endswith(".parquet"):
            return "parquet"
        name = name.removesuffix(".gz").removesuffix(".xz")
        for ext in FORMATS[:3]:
            if name.endswith(ext):
                return ext[1:]
        raise UserError(f"{location}: unsupported corpus format (use .jsonl, .json, .txt (each optionally .gz/.xz), "
                        f".parquet or a save_to_disk folder)")
    if location.startswith(("/", ".")) or not HUB_NAME.match(location) or FILE_NAME.search(location):
        raise UserError(f"data source not found: {location}")
    if not hub_reachable():
        raise UserError(f"data source {location!r} is not a local path and the Hugging Face hub is not reachable "
                        f"(offline); save a copy elsewhere with datasets.load_dataset({location!r}).save_to_disk(DIR) "
                        f"or export it to jsonl, and set the source to that local path")
    return "hub"


def split_names(location: str) -> list[str]:
    """The named splits of a save_to_disk DatasetDict or a hub dataset; [] for a single table."""
    kind = source_kind(location)
    if kind == "datasetdict":
        return list(json.loads((Path(location) / "dataset_dict.json").read_text())["splits"])
    if kind == "hub":
        from datasets import get_dataset_split_names

        return list(get_dataset_split_names(location))
    return []


def source_splits(location: str) -> tuple[str | None, str | None]:
    """(train split, held-out split) of a source: named splits where it has them, (None, None) for one table."""
    names = split_names(location)
    if not names:
        return None, None
    if "train" not in names:
        raise UserError(f"{location}: has no 'train' split (splits: {', '.join(names)})")
    test = next((s for s in ("test", "validation") if s in names), None)
    return "train", test


def _open_text(path: Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}: line {n} is not valid JSON") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {n} is not a JSON object")
            yield row


def _json_rows(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: a .json corpus must be a list of objects (use .jsonl for one object per line)")
    yield from rows


def _txt_rows(path: Path) -> Iterator[dict]:
    """Documents separated by blank lines."""
    with _open_text(path) as f:
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield {"text": "".join(block).strip()}
                block = []
        if block:
            yield {"text": "".join(block).strip()}


def _parquet_rows(path: Path, columns: list[str] | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    missing = [c for c in columns or [] if c not in table.schema_arrow.names]
    if missing:
        raise UserError(f"{path}: has no column {missing[0]!r} (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(batch_size=1024, columns=columns):
        yield from batch.to_pylist()


def _datasets_rows(location: str, kind: str, split: str | None, columns: list[str] | None) -> Iterator[dict]:
    import datasets

    if kind == "hub":
        ds = datasets.load_dataset(location, split=split or "train", streaming=True)
    else:
        ds = datasets.load_from_disk(location)
        if kind == "datasetdict":
            ds = ds[split or "train"]
    names = ds.column_names or []
    missing = [c for c in columns or [] if names and c not in names]
    if missing:
        raise UserError(f"{location}: has no column {missing[0]!r} (columns: {', '.join(names)})")
    yield from ds


def iter_rows(location: str, *, split: str | None = None, limit: int | None = None,
              columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of a source, lazily and in order, at most `limit`; `columns` are checked (and read alone from parquet)."""
    kind = source_kind(location)
    if split is not None and kind not in ("datasetdict", "hub"):
        raise UserError(f"{location}: a single table has no split {split!r}")
    path = Path(location)
    readers = {"jsonl": lambda: _jsonl_rows(path), "json": lambda: _json_rows(path), "txt": lambda: _txt_rows(path),
               "parquet": lambda: _parquet_rows(path, columns)}
    rows = readers[kind]() if kind in readers else _datasets_rows(location, kind, split, columns)
    try:
        yield from rows if limit is None else itertools.islice(rows, limit)
    except READ_ERRORS as err:
        raise UserError(f"{location}: unreadable ({type(err).__name__}: {err})") from None


def iter_texts(location: str, *, text_field: str = "text", split: str | None = None,
               limit: int | None = None) -> Iterator[str]:
    """The text of each row (a .txt file's blocks ignore `text_field`); a missing or non-string field is a UserError."""
    field_ = "text" if source_kind(location) == "txt" else text_field
    for n, row in enumerate(iter_rows(location, split=split, limit=limit, columns=[field_])):
        text = row.get(field_)
        if not isinstance(text, str):
            what = "has no text field" if text is None else "has a non-string text field"
            raise UserError(f"{location}: row {n} {what} {field_!r} (set data.pretrain.text_field; "
                            f"row keys: {', '.join(map(str, row))})")
        yield text


def read_texts(source: str, *, text_field: str = "text", limit: int | None = None) -> list[str]:
    """All documents of a local source (no slice) as a list; for small corpora and tests."""
    return list(iter_texts(source, text_field=text_field, limit=limit))


def source_fingerprint(location: str, split: str | None = None, limit: int | None = None) -> str:
    """Content hash of a source's files (a hub dataset: its name only), with the split and row limit read."""
    h = hashlib.sha256(f"source-v1:{split}:{limit}:".encode())
    path = Path(location)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    if not files:
        h.update(f"hub:{location}".encode())
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]
