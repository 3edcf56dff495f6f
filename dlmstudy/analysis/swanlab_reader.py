"""Reading SwanLab offline logs back without the cloud: `swanlog/run-*/run-<id>.swanlab` files.

A `.swanlab` file is a LevelDB-style log (SwanLab 0.10.3, format version 2): a 7-byte file header
(":SWL", magic 0xE1D6, version), then records in 32 KiB blocks, each record a 7-byte header
(crc32, length, type FULL/FIRST/MIDDLE/LAST) and a chunk of one serialised protobuf `Record`.
The framing is decoded here; the protobuf schema comes from the installed swanlab package. Without
swanlab, or with another format version, nothing is decoded and the scalar mirror is the only source.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pandas as pd

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
IDENT, MAGIC, VERSION = b":SWL", 0xE1D6, 2
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
COLUMNS = ["step", "key", "value"]


def _chunk_crc(data: bytes, kind: int) -> int:
    """SwanLab seeds each chunk's crc32 with the crc32 of its one-byte type."""
    return zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF


def iter_records(path: str | Path):
    """Yield each record's bytes; stops quietly at a torn or corrupt tail (a run killed mid-write)."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER.size or HEADER.unpack_from(raw) != (IDENT, MAGIC, VERSION):
        raise ValueError(f"{path}: not a SwanLab format-{VERSION} log")
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(raw):
        if BLOCK - pos % BLOCK < CHUNK.size:  # too little room left for a chunk header: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = CHUNK.unpack_from(raw, pos)
        data = raw[pos + CHUNK.size: pos + CHUNK.size + length]
        if len(data) < length or kind not in (FULL, FIRST, MIDDLE, LAST) or _chunk_crc(data, kind) != crc:
            return
        pos += CHUNK.size + length
        if kind == FULL:
            yield data
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        else:
            yield pending + data
            pending = b""


def _record_class():
    """swanlab's protobuf Record class, or None when swanlab is not installed."""
    try:
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    except ImportError:
        return None
    return Record


def swanlab_available() -> bool:
    """True when the installed swanlab provides the protobuf schema needed to decode logs."""
    return _record_class() is not None


def read_swanlab_file(path: str | Path) -> pd.DataFrame:
    """Every scalar in one `.swanlab` file as a long frame (step, key, value)."""
    Record = _record_class()
    if Record is None:
        return pd.DataFrame(columns=COLUMNS)
    from google.protobuf.message import DecodeError

    rows = []
    for data in iter_records(path):
        record = Record()
        try:
            record.ParseFromString(data)
        except DecodeError:  # a record the schema cannot read: trust nothing after it
            break
        if record.HasField("scalar"):
            rows.append((record.scalar.step, record.scalar.key, record.scalar.value.number))
    return pd.DataFrame(rows, columns=COLUMNS)


def read_swanlab_run(run_dir: str | Path) -> pd.DataFrame:
    """The scalars of a run folder's `swanlog/`: all SwanLab runs in time order (a resumed run has several);
    a later log's value replaces an earlier one at the same (key, step)."""
    files = sorted(Path(run_dir).glob("swanlog/run-*/run-*.swanlab"), key=lambda p: p.parent.name)
    frames = [read_swanlab_file(f) for f in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    long = pd.concat(frames, ignore_index=True).drop_duplicates(["key", "step"], keep="last")
    return long.sort_values(["key", "step"]).reset_index(drop=True)


def wide(long: pd.DataFrame) -> pd.DataFrame:
    """One row per step and one column per key, like the scalar mirror `scalars.jsonl`; SwanLab's own
    system metrics (`__swanlab__.*`) are left out."""
    if long.empty:
        return pd.DataFrame()
    long = long[~long["key"].str.startswith("__swanlab__.")]
    return long.pivot_table(index="step", columns="key", values="value", aggfunc="last").reset_index().rename_axis(
        columns=None)
