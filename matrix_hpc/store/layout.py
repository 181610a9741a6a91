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


def sink_of(task_id: str, num_shards: int, num_sinks: int) -> int:
    """The sink that owns a task's shard (every shard has exactly one)."""
    return shard_of(task_id, num_shards) % num_sinks


def shard_dir(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard={shard:05d}"


def data_files(out_dir: Path, include_rejected: bool = True) -> list[Path]:
    """Committed Parquet files (temp files and metadata excluded)."""
    if not out_dir.exists():
        return []
    patterns = ["shard=*/*.parquet"] + ([f"{REJECTED_DIR}/shard=*/*.parquet"] if include_rejected else [])
    files = [p for pat in patterns for p in out_dir.glob(pat)]
    return sorted(p for p in files if not p.name.startswith((".", "_")))


COMPACTED_FROM = b"matrix_hpc.compacted_from"


def compact_files(sources: list[Path], target: Path, compression: str) -> Path:
    """Merge ``sources`` (one shard directory) into ``target``.

    The merged file names its sources in its metadata and becomes visible
    (atomic rename) before they are deleted. A crash between the two leaves
    rows twice for a moment; :func:`repair_compactions` (run by every run
    and by ``inspect``) deletes such leftover sources.
    """
    import json

    table = pa.concat_tables([pq.read_table(p) for p in sources], promote_options="default")
    meta = dict(table.schema.metadata or {})
    meta[COMPACTED_FROM] = json.dumps([p.name for p in sources]).encode()
    write_table_atomic(table.replace_schema_metadata(meta), target, compression)
    for p in sources:
        p.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return target


def repair_compactions(out_dir: Path) -> int:
    """Delete sources that a finished compaction had not deleted yet (crash)."""
    import json

    removed = 0
    for merged in data_files(out_dir):
        if not merged.stem.rsplit("-", 1)[-1].startswith("c"):  # only compacted files list sources
            continue
        meta = pq.read_metadata(merged).metadata or {}
        for name in json.loads(meta.get(COMPACTED_FROM, b"[]")):
            leftover = merged.parent / name
            if leftover.exists():
                leftover.unlink()
                removed += 1
    return removed


def remove_temp_files(out_dir: Path) -> int:
    """Delete temp files left by a killed run (they were never visible) and
    finish interrupted compactions."""
    removed = repair_compactions(out_dir)
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
        pq.write_table(table, f, compression=compression, row_group_size=50_000)
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
