"""Where things live in an output directory, and how a file is committed.

    OUT/shard=00003/part-<run>-<seq>.parquet   rows (readable as one dataset)
    OUT/_matrix/config.yaml                    resolved config of the first run
    OUT/_matrix/runs/<run_id>/...              per-run config copy, summary

Names starting with ``_`` or ``.`` are ignored by pyarrow, DuckDB and HF
``datasets`` when they read the directory, so temp files and metadata never
look like data.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

META_DIR = "_matrix"
REJECTED_DIR = "_rejected"  # filtered / failed rows when output.keep=ok
TMP_PREFIX = ".tmp-"


def shard_of(task_id: str, num_shards: int) -> int:
    """Stable shard of a task id (crc32, identical in every process and run)."""
    return zlib.crc32(task_id.encode()) % num_shards


def shard_dir(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard={shard:05d}"


def data_files(out_dir: Path, include_rejected: bool = True) -> list[Path]:
    """Committed Parquet files (temp files and metadata excluded)."""
    if not out_dir.exists():
        return []
    patterns = ["shard=*/*.parquet"] + ([f"{REJECTED_DIR}/shard=*/*.parquet"] if include_rejected else [])
    files = [p for pat in patterns for p in out_dir.glob(pat)]
    return sorted(p for p in files if not p.name.startswith((".", "_")))


def remove_temp_files(out_dir: Path) -> int:
    """Delete temp files left by a killed run; they were never visible."""
    removed = 0
    for pat in (f"shard=*/{TMP_PREFIX}*", f"{REJECTED_DIR}/shard=*/{TMP_PREFIX}*"):
        for p in out_dir.glob(pat):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def write_table_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write ``table`` so that ``path`` appears only complete: temp name,
    fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression=compression)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
