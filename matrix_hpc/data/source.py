"""The rows an export or a curation reads from an output directory.

The committed part files come from the store's own listing
(:func:`matrix_hpc.store.layout.data_files`: temp files, ``_matrix/`` and
its quarantine are never data). Rows are selected by status (``ok`` by
default) and read row group by row group, so memory stays flat however
large the output is.

A run in progress: its committed files are complete and never rewritten, so
reading them is safe; rows committed after the listing are not included, and
a file the run's compaction deletes while we read is reported (rerun then).

    src = OutputSource.open(Path("out/run1"), statuses=("ok",))
    for batch in src.batches(src.files[0]): ...
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from matrix_hpc.store.layout import META_DIR, data_files
from matrix_hpc.store.lock import LOCK_FILE, _held_here, _held_lock, describe_holder, read_holder

STATUSES = ("ok", "filtered", "failed")
BATCH_ROWS = 10_000


class SourceError(RuntimeError):
    """An output directory (or a destination) that cannot be used as asked; the text says why."""


@dataclass(frozen=True)
class OutputSource:
    out_dir: Path
    files: list[Path]  # committed part files at the time of opening, sorted
    statuses: tuple[str, ...] | None  # None = every row
    live_holder: dict[str, Any] | None  # the lock holder when a run is writing the output now

    @classmethod
    def open(cls, out_dir: Path, statuses: Sequence[str] | None = ("ok",)) -> OutputSource:
        out_dir = Path(out_dir)
        if not out_dir.is_dir():
            raise SourceError(f"{out_dir} is not a directory (expected a matrix-hpc output.dir)")
        files = data_files(out_dir)
        if not files and not (out_dir / META_DIR).is_dir():
            raise SourceError(f"{out_dir} is not a matrix-hpc output directory (no {META_DIR}/, no shard=*/ files)")
        picked = tuple(statuses) if statuses is not None else None
        return cls(out_dir, files, picked, live_holder(out_dir))

    def live_note(self) -> str | None:
        """The line to print when a run is writing the output (None otherwise)."""
        if self.live_holder is None:
            return None
        return (f"note: {self.out_dir} is being written by {describe_holder(self.live_holder)}; reading the "
                f"{len(self.files)} part file(s) committed now (rows committed later are not included)")

    def schema(self) -> pa.Schema:
        """The unified schema of every part file (older files may lack newer columns)."""
        schemas = [self._read(f, lambda p: pq.read_schema(p)) for f in self.files]
        if not schemas:
            raise SourceError(f"{self.out_dir} holds no committed rows yet")
        return pa.unify_schemas(schemas, promote_options="default")

    def batches(self, path: Path, columns: list[str] | None = None, row_groups: list[int] | None = None,
                schema: pa.Schema | None = None) -> Iterator[pa.RecordBatch]:
        """The selected rows of one part file, a row group at a time, conformed to ``schema`` when given."""
        with self._read(path, pq.ParquetFile) as f:
            names = set(f.schema_arrow.names)
            wanted = [c for c in (columns or f.schema_arrow.names) if c in names]
            read = wanted + (["status"] if self.statuses is not None and "status" not in wanted else [])
            for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=read, row_groups=row_groups):
                yield self._conform(self.select(batch).select(wanted), columns, schema)

    def select(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.statuses is None:
            return batch
        mask = pc.fill_null(pc.is_in(batch.column("status"), pa.array(self.statuses)), False)
        return batch.filter(mask)

    @staticmethod
    def _conform(batch: pa.RecordBatch, columns: list[str] | None, schema: pa.Schema | None) -> pa.RecordBatch:
        if schema is None:
            return batch
        target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        arrays = [batch.column(f.name).cast(f.type) if f.name in batch.schema.names
                  else pa.nulls(batch.num_rows, f.type) for f in target]
        return pa.RecordBatch.from_arrays(arrays, schema=target)

    def _read(self, path: Path, reader: Any) -> Any:
        try:
            return reader(path)
        except FileNotFoundError as e:
            raise SourceError(f"{path} disappeared while reading {self.out_dir} (the run writing it compacted its "
                              "files); run the command again") from e
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}); `matrix-hpc inspect "
                              f"{self.out_dir}` quarantines unreadable part files, then run this again") from e


def parse_statuses(spec: str | None, all_rows: bool) -> tuple[str, ...] | None:
    """``--status ok,failed`` / ``--all`` -> the statuses to keep (None = every row)."""
    if all_rows:
        return None
    picked = tuple(s.strip() for s in (spec or "ok").split(",") if s.strip())
    unknown = [s for s in picked if s not in STATUSES]
    if unknown or not picked:
        raise SourceError(f"--status {spec!r}: unknown status {unknown or spec!r}; valid: {', '.join(STATUSES)} "
                          "(comma-separated), or --all")
    return picked


def live_holder(out_dir: Path) -> dict[str, Any] | None:
    """The holder record when a live process holds the output's lock, else None.

    Tested with a shared record lock on a read-only descriptor: it conflicts
    with the writer's exclusive lock and writes nothing into the output.
    """
    lock_file = Path(out_dir) / META_DIR / LOCK_FILE
    with _held_lock:
        if lock_file.resolve() in _held_here:  # ours: closing a descriptor would drop our own lock
            return read_holder(out_dir)
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return read_holder(out_dir)
        raise
    finally:
        os.close(fd)  # also drops the shared lock we may have taken
    return None


def check_destination(out_dir: Path, dest: Path, force: bool) -> None:
    """Refuse a destination inside the output (or holding it), or an existing one without ``force``."""
    out, target = Path(out_dir).resolve(), Path(dest).resolve()
    if target == out or out in target.parents or target in out.parents:
        raise SourceError(f"destination {dest} overlaps the output directory {out_dir}; the output is never "
                          "written to: choose a destination outside it")
    if Path(dest).exists() and not force:
        raise SourceError(f"{dest} exists; pass --force to replace it")
