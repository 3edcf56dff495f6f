"""Reading local corpora: jsonl / json (also .gz, .xz), txt, parquet and `save_to_disk` folders."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

from dlmstudy.errors import UserError


def _open_text(path: Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_texts(source: str, *, text_field: str = "text") -> list[str]:
    """All documents of a local source; a missing path or text field is a one-line UserError."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"data source not found: {source} (give a local path; no hub is reached at run time)")
    stem = path.name.removesuffix(".xz").removesuffix(".gz")
    if stem.endswith(".txt"):
        with _open_text(path) as f:
            return [block.strip() for block in f.read().split("\n\n") if block.strip()]
    if stem.endswith((".jsonl", ".json")):
        docs = []
        with _open_text(path) as f:
            rows = json.load(f) if stem.endswith(".json") else (json.loads(line) for line in f if line.strip())
            for n, row in enumerate(rows):
                if text_field not in row:
                    raise UserError(f"{source}: row {n} has no text field {text_field!r} (set data.pretrain.text_field)")
                docs.append(row[text_field])
        return docs
    raise UserError(f"{source}: unsupported corpus format (use .jsonl, .json, .txt, optionally .gz/.xz)")
