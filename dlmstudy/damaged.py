"""Damaged files are set aside, never fatal: renamed beside themselves with the time, reported in one line,
and recomputed by the stage that writes them (a run whose result.json cannot be read trains again).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DAMAGED = ".damaged-"


def set_aside(path: str | Path, into: str | Path | None = None) -> Path:
    """Rename `path` (a file or folder) to `<name>.damaged-<UTC time>` beside it, or inside `into` (for folders
    whose siblings are scanned by name, e.g. checkpoints); returns the new path."""
    path = Path(path)
    folder = Path(into) if into is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = folder / f"{path.name}{DAMAGED}{stamp}", 1
    while target.exists():
        target, n = folder / f"{path.name}{DAMAGED}{stamp}.{n}", n + 1
    os.replace(path, target)
    return target


def json_problem(path: Path, expect: Mapping[str, Any]) -> str | None:
    """Why `path` is not a JSON object holding `expect`'s values (None when it is)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"not readable JSON ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if not isinstance(record, dict):
        return "not a JSON object"
    wrong = [k for k, v in expect.items() if record.get(k) != v]
    return f"its {wrong[0]} is {record.get(wrong[0])!r}, not {expect[wrong[0]]!r}" if wrong else None


def read_record(path: str | Path, *, expect: Mapping[str, Any] | None = None,
                progress: Callable[[str], None] = print) -> dict | None:
    """The JSON object in `path`, or None when there is none; a damaged one (cut short, not an object, not holding
    `expect`'s values) is set aside and reported in one line, and None returned so its stage runs again."""
    path = Path(path)
    if not path.exists():
        return None
    problem = json_problem(path, expect or {})
    if problem is None:
        return json.loads(path.read_text(encoding="utf-8"))
    moved = set_aside(path)
    progress(f"{path}: damaged ({problem}); set aside as {moved.name}, recomputing it")
    return None
