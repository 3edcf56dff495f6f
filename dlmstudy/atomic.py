"""Atomic file writes: a temporary file renamed into place, so no reader (or killed run) sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a per-process temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps) -> Path:
    """`obj` as indented JSON, atomically (non-JSON values through `default=str` unless given)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, **{"default": str, **dumps}))
