"""Where things live in an output directory, and how a file is committed.

    OUT/shard=00003/part-<run>-<sink>-<incarnation>-p<seq>.parquet   rows (readable as one dataset)
    OUT/shard=00003/part-<run>-<sink>-<incarnation>-c<seq>.parquet   a compaction of this sink's files
    OUT/_rejected/shard=00003/...                                    filtered/failed rows when output.keep=ok
    OUT/_matrix/identity.json, config.yaml                           what the first run recorded
    OUT/_matrix/lock, lock.json                                      the writer lock and its holder
    OUT/_matrix/quarantine/, history/                                unreadable files, superseded failed rows
    OUT/_matrix/runs/<run_id>/...                                    per-run config copy, summary

Names starting with ``_`` or ``.`` are ignored by pyarrow, DuckDB and HF
``datasets`` when they read the directory, so temp files and metadata never
look like data.

A committed file is never replaced: :func:`publish` links the complete temp
file to its final name, which fails if that name exists.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

META_DIR = "_matrix"
REJECTED_DIR = "_rejected"  # filtered / failed rows when output.keep=ok
QUARANTINE_DIR = "quarantine"  # under META_DIR: part files that could not be read
HISTORY_DIR = "history"  # under META_DIR: failed rows superseded by run.retry=failed
TMP_PREFIX = ".tmp-"
COMPACTED_FROM = b"matrix_hpc.compacted_from"

# The one parser of part file names. ``inc`` (8 hex) is absent in names written
# before sink incarnations existed; ``kind`` is "c" for a compaction, "p" (or
# empty in old names) for a commit. A user's ``x-corrupt.parquet`` does not match.
PART_NAME = re.compile(
    r"^part-(?P<run>.+?)-(?P<sink>\d{3})(?:-(?P<inc>[0-9a-f]{8}))?-(?P<kind>[pc]?)(?P<seq>\d{6})\.parquet$")


@dataclass(frozen=True)
class PartName:
    run_id: str
    sink: int
    incarnation: str | None
    compacted: bool
    seq: int

    def __str__(self) -> str:
        return part_file_name(self.run_id, self.sink, self.incarnation or "", self.seq, self.compacted)


def parse_part_name(name: str) -> PartName | None:
    """The parts of a file name written by a sink, or None for any other name."""
    m = PART_NAME.match(name)
    if m is None:
        return None
    return PartName(m["run"], int(m["sink"]), m["inc"], m["kind"] == "c", int(m["seq"]))


def part_file_name(run_id: str, sink: int, incarnation: str, seq: int, compacted: bool = False) -> str:
    kind = "c" if compacted else "p"
    return f"part-{run_id}-{sink:03d}-{incarnation}-{kind}{seq:06d}.parquet"


def shard_of(task_id: str, num_shards: int) -> int:
    """Stable shard of a task id (crc32, identical in every process and run)."""
    return zlib.crc32(task_id.encode()) % num_shards


def sink_of(task_id: str, num_shards: int, num_sinks: int) -> int:
    """The sink that owns a task's shard (every shard has exactly one)."""
    return shard_of(task_id, num_shards) % num_sinks


def shard_dir(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard={shard:05d}"


def shard_number(directory: Path) -> int | None:
    """``shard=00003`` -> 3 (None for any other directory name)."""
    m = re.fullmatch(r"shard=(\d+)", directory.name)
    return int(m[1]) if m else None


def data_files(out_dir: Path, include_rejected: bool = True) -> list[Path]:
    """Committed Parquet files (temp files and metadata excluded)."""
    if not out_dir.exists():
        return []
    patterns = ["shard=*/*.parquet"] + ([f"{REJECTED_DIR}/shard=*/*.parquet"] if include_rejected else [])
    files = [p for pat in patterns for p in out_dir.glob(pat)]
    return sorted(p for p in files if not p.name.startswith((".", "_")))


def read_columns(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Columns of one Parquet file. ``ParquetFile.read`` rather than
    ``pq.read_table``: the latter goes through pyarrow.dataset, whose first
    use imports pandas when present (about a second)."""
    with pq.ParquetFile(path) as f:
        return f.read(columns=columns)


def temp_path(final: Path, incarnation: str) -> Path:
    """A temp name unique to one writer incarnation, so that no writer's
    start-up can take another writer's temp file for its own leftover."""
    return final.with_name(f"{TMP_PREFIX}{incarnation}-{final.name}")


def write_temp(table: pa.Table, tmp: Path, compression: str) -> None:
    """Write and fsync ``table`` at ``tmp`` (a hidden name readers ignore).

    Without Parquet's dictionary encoding (pyarrow's default is on): the compression
    codec already takes the repeats out of these rows (ids, prompts, transcripts), and
    the dictionary pages cost more than they save. Measured on the generate workflow's
    rows (zstd): a 16-row commit 1.9 against 2.8 ms of CPU and 6% smaller; a 221,000-row
    compaction written in 0.70 against 0.99 s, 3% smaller, and read back in 0.38
    against 0.84 s (docs/performance.md, "Sinks on a small machine")."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression=compression, row_group_size=50_000, use_dictionary=False)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Make the complete file ``tmp`` visible as ``final``, never replacing
    anything: ``os.link`` raises FileExistsError when ``final`` exists."""
    try:
        os.link(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)


def write_table_atomic(table: pa.Table, path: Path, compression: str = "zstd", incarnation: str = "w") -> None:
    """Write ``table`` so that ``path`` appears only complete and never
    replaces an existing file (FileExistsError)."""
    tmp = temp_path(path, incarnation)
    try:
        write_temp(table, tmp, compression)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)


def compact_files(sources: list[Path], target: Path, compression: str, incarnation: str = "w") -> Path:
    """Merge ``sources`` (one shard directory) into ``target``.

    The merged file names its sources in its metadata and is published
    (durable, visible) before they are deleted. A crash between the two leaves
    rows twice for a moment; :func:`repair_compactions` (run by every run
    and by ``inspect``) deletes such leftover sources.
    """
    table = pa.concat_tables([read_columns(p) for p in sources], promote_options="default")
    meta = dict(table.schema.metadata or {})
    meta[COMPACTED_FROM] = json.dumps([p.name for p in sources]).encode()
    write_table_atomic(table.replace_schema_metadata(meta), target, compression, incarnation)
    for p in sources:
        p.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return target


def compacted_sources(merged: Path) -> list[str]:
    """The source names a compacted file lists ([] for any other file)."""
    name = parse_part_name(merged.name)
    if name is None or not name.compacted:
        return []
    meta = pq.read_metadata(merged).metadata or {}
    return [str(n) for n in json.loads(meta.get(COMPACTED_FROM, b"[]"))]


def repair_compactions(out_dir: Path, files: list[Path] | None = None) -> list[Path]:
    """Delete sources that a finished compaction had not deleted yet (crash).

    ``files``: only these (a restarted sink's own files); default: all of ``out_dir``.
    Returns the deleted paths. A compacted file that cannot be read is left
    for the caller's quarantine; its sources then stay (they hold the rows).
    """
    removed: list[Path] = []
    for merged in data_files(out_dir) if files is None else files:
        try:
            names = compacted_sources(merged)
        except (OSError, pa.ArrowException):
            continue
        for name in names:
            leftover = merged.parent / name
            if leftover.exists():
                leftover.unlink(missing_ok=True)  # the live compactor may delete it at the same moment
                removed.append(leftover)
    if removed:
        for directory in {p.parent for p in removed}:
            fsync_dir(directory)
    return removed


def remove_temp_files(out_dir: Path) -> int:
    """Delete temp files left by killed writers (they were never visible).
    Call only while holding the output lock: a live writer's temp files
    look the same."""
    removed = 0
    for pat in (f"shard=*/{TMP_PREFIX}*", f"{REJECTED_DIR}/shard=*/{TMP_PREFIX}*"):
        for p in out_dir.glob(pat):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
