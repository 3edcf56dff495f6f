"""Atomic writes: a temporary file renamed into place, so no reader (or killed run) sees half a file; a folder
built beside its destination and swapped in the same way."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(built: str | Path, dest: str | Path) -> Path:
    """Put the folder `built` at `dest`, replacing what is there, so that `dest` is always either the old folder
    whole or the new one whole: one atomic exchange where the system has it, else two renames with the old folder
    kept as `.<name>.old` until the new one is in place (`restore_folder` puts it back after a kill between them)."""
    built, dest = Path(built), Path(dest)
    if not dest.exists():
        os.replace(built, dest)
        return dest
    if _exchange(built, dest):
        shutil.rmtree(built)
        return dest
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(built, dest)
    shutil.rmtree(old)
    return dest


def restore_folder(dest: str | Path) -> None:
    """Undo a `replace_folder` killed between its two renames: the old folder goes back to `dest`."""
    dest = Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    if old.is_dir() and not dest.exists():
        os.replace(old, dest)
