"""Reading SwanLab offline logs back without the cloud: `swanlog/run-*/run-<id>.swanlab` files.

SwanLab has no public API that reads a log offline (`swanlab.Api` and `swanlab sync` need the cloud),
so the file format is decoded here, for the swanlab versions pyproject allows (0.10.x, whose logs the
tests decode: files written by 0.10.0 and 0.10.3 in tests/data/swanlab/; 0.9.8 writes the same format).
A `.swanlab` file is a LevelDB-style log (format version 2): a 7-byte file header (":SWL", magic 0xE1D6,
version), then records in 32 KiB blocks, each record a 7-byte header (crc32, length, type
FULL/FIRST/MIDDLE/LAST) and a chunk of one serialised protobuf `Record`. The framing is decoded here;
the protobuf schema comes from the installed swanlab package. Without swanlab, with a version outside
that range, or with another format version, nothing is decoded and the scalar mirror is the only source.

Keys come back under the Trainer's own log names, as in the scalar mirror: transformers' SwanLabCallback
logs `loss` as `train/loss`, `eval_x` as `eval/x` and the end-of-training figures as `single_value/x`.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pandas as pd

SUPPORTED = ("0.10.",)  # swanlab versions whose logs (and protobuf schema) are decoded: pyproject's range
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
    """swanlab's protobuf Record class, or None when swanlab is not installed or not a supported version."""
    try:
        import swanlab
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    except ImportError:
        return None
    return Record if swanlab.__version__.startswith(SUPPORTED) else None


def swanlab_available() -> bool:
    """True when the installed swanlab is a supported version, so its protobuf schema decodes the logs."""
    return _record_class() is not None


def trainer_key(key: str) -> str | None:
    """The Trainer's log name of a SwanLab key (`train/loss` -> `loss`, `eval/x` -> `eval_x`); None for the step
    counter transformers logs beside every line."""
    for prefix, name in (("train/", ""), ("single_value/", ""), ("eval/", "eval_")):
        if key.startswith(prefix):
            key = name + key[len(prefix):]
            break
    return None if key == "global_step" else key


def _records(path: str | Path):
    """The decoded protobuf records of a `.swanlab` file (none without a supported swanlab)."""
    Record = _record_class()
    if Record is None:
        return
    from google.protobuf.message import DecodeError

    for data in iter_records(path):
        record = Record()
        try:
            record.ParseFromString(data)
        except DecodeError:  # a record the schema cannot read: trust nothing after it
            return
        yield record


def run_info(path: str | Path) -> dict[str, str]:
    """Project, experiment name and id of the SwanLab run a `.swanlab` file logs (empty when not decoded)."""
    for record in _records(path):
        if record.HasField("start"):
            return {"project": record.start.project, "name": record.start.name, "id": record.start.id}
    return {}


def read_swanlab_file(path: str | Path) -> pd.DataFrame:
    """Every scalar in one `.swanlab` file as a long frame (step, key, value), keys as the Trainer logs them."""
    rows = []
    for record in _records(path):
        if record.HasField("scalar"):
            key = trainer_key(record.scalar.key)
            if key is not None:
                rows.append((record.scalar.step, key, record.scalar.value.number))
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
    system metrics (`__swanlab__.*`) and the final evaluation (`final/*`, in result.json) are left out."""
    if long.empty:
        return pd.DataFrame()
    long = long[~long["key"].str.startswith(("__swanlab__.", "final/"))]
    return long.pivot_table(index="step", columns="key", values="value", aggfunc="last").reset_index().rename_axis(
        columns=None)
