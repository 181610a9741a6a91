"""Sink: owns a set of shards, buffers finished tasks, commits them as
Parquet files and acknowledges each committed id to the driver.

Run as an async Ray actor (see the runtime's driver); the class itself has no
Ray dependency so its commit logic is unit-testable.

The commit protocol (docs/output.md):

- every file name carries this sink's incarnation (a fresh random id each
  time the actor starts), so a restarted sink never reuses a name;
- a file is written under a temp name unique to the incarnation, fsynced and
  published with ``os.link``, which cannot replace an existing file;
- ids count as committed only after their file is published; a restarted
  sink rebuilds the ids this run committed in its shards from the files;
- a commit that fails keeps its rows buffered and is retried with capped
  exponential backoff, loudly; its rows stay in flight meanwhile (the
  driver stops admitting once too many are in flight);
- a row that cannot be encoded becomes a ``failed`` row naming the column.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import pickle
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from matrix_hpc import metrics
from matrix_hpc.background import supervise
from matrix_hpc.store.ids import GrowingHashSet, hash_ids
from matrix_hpc.store.layout import (
    REJECTED_DIR,
    compact_files,
    parse_part_name,
    part_file_name,
    read_columns,
    repair_compactions,
    shard_dir,
    shard_of,
    write_table_atomic,
)
from matrix_hpc.store.rows import TaskLike, encode_rows

log = logging.getLogger(__name__)

#: What the driver learns of each committed row: (id, status, error_type, error, tokens).
#: A task written twice in one run (re-admitted) is acknowledged as "duplicate".
Ack = tuple[str, str, str | None, str | None, int]
DUPLICATE = "duplicate"

#: Test hook (read once when a sink starts): the first N commit attempts of the
#: sink raise OSError(ENOSPC), as on a full disk. With FAULT_SINK_ENV set, only
#: the sink of that index fails. Never set it outside tests.
FAULT_COMMIT_FAIL_ENV = "MATRIX_HPC_FAULT_COMMIT_FAIL_N"
FAULT_SINK_ENV = "MATRIX_HPC_FAULT_COMMIT_FAIL_SINK"
#: A failed commit is retried after 2x this, doubling (a full disk freed is
#: noticed within a second, whatever ``flush_interval_s``).
COMMIT_RETRY_BASE_S = 0.2


@dataclass
class SinkSettings:
    out_dir: str
    num_shards: int
    run_id: str
    flush_interval_s: float
    max_buffered_rows: int
    compression: str
    keep: str = "all"  # "ok": filtered / failed rows go to _rejected/ (still counted for resume)
    compact_min_files: int = 64  # merge a shard's small files of this run once it has this many
    compact_max_rows: int = 200_000  # files this big are left alone by compaction
    commit_retry_max_s: float = 30.0  # a failing commit is retried after 2 x COMMIT_RETRY_BASE_S, doubling up to this
    workflow: str = ""  # the metrics' workflow label (matrix_hpc.metrics)


class CommitFailed(RuntimeError):
    """A shard's commit failed; its rows stay buffered for the next attempt."""

    def __init__(self, shard: int, error: BaseException) -> None:
        super().__init__(f"shard {shard}: {type(error).__name__}: {error}")
        self.shard = shard
        self.error = error


class ShardSink:
    """Buffers rows per shard; a flush writes one file per non-empty shard."""

    def __init__(self, settings: SinkSettings, schema: pa.Schema, index: int) -> None:
        self.s = settings
        metrics.set_run(settings.run_id, settings.workflow)
        self.schema = schema
        self.out_dir = Path(settings.out_dir)
        self.index = index
        self._incarnation = uuid.uuid4().hex[:8]
        self._seq = itertools.count()
        self._buffers: dict[int, list[TaskLike]] = {}
        self._buffered_ids: set[str] = set()  # bounded by max_buffered_rows: a second copy waits for the first
        self._committed = GrowingHashSet(self._hashes_committed_by_this_run())
        self._confirmed: tuple[int, set[str]] | None = None  # one shard's exact committed ids (rare path)
        self._acks: list[Ack] = []
        self._acks_ready: asyncio.Event | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._small_files: dict[Path, list[tuple[Path, int]]] = {}  # shard dir -> (file, rows) of this incarnation
        self._fault_commits_left = _injected_commit_failures(index)
        self.commit_failures = 0  # consecutive
        self.last_error: str | None = None
        self._retry_at = 0.0
        self.rows_written = 0
        self.bytes_written = 0  # published files, for the metrics
        self.rows_unencodable = 0
        self.files_written = 0
        self.duplicates_dropped = 0
        self.files_compacted = 0

    # -- what this run already committed (a restarted sink) -------------------
    def _my_files(self, shard: int | None = None) -> list[Path]:
        pattern = "shard=*" if shard is None else shard_dir(Path("."), shard).name
        files = [*self.out_dir.glob(f"{pattern}/part-*.parquet"),
                 *self.out_dir.glob(f"{REJECTED_DIR}/{pattern}/part-*.parquet")]
        mine = []
        for f in files:
            name = parse_part_name(f.name)
            if name is not None and name.run_id == self.s.run_id and name.sink == self.index:
                mine.append(f)
        return sorted(mine)

    def _hashes_committed_by_this_run(self) -> Any:
        import numpy as np

        files = self._my_files()
        # A killed incarnation may have published a compaction and not yet deleted its
        # sources: their rows are on disk twice until deleted. Only dead incarnations of
        # this index wrote these files, so nothing else is compacting them now.
        removed = repair_compactions(self.out_dir, files)
        if removed:
            log.warning("sink %d (incarnation %s): finished a compaction a killed incarnation had left "
                        "(deleted its merged sources)", self.index, self._incarnation)
            gone = set(removed)
            files = [f for f in files if f not in gone]
        parts = [hash_ids(ids) for ids in (_read_ids(f) for f in files) if ids is not None]
        if parts:
            log.info("sink %d (incarnation %s): %d ids of run %s already committed in its shards",
                     self.index, self._incarnation, sum(len(p) for p in parts), self.s.run_id)
        return np.concatenate(parts) if parts else None

    async def _is_committed(self, task_id: str) -> bool:
        """Exact, for an id whose hash is among the committed ones (rare: re-admitted tasks)."""
        shard = shard_of(task_id, self.s.num_shards)  # confirm against the shard's real ids
        if self._confirmed is None or self._confirmed[0] != shard:
            assert self._flush_lock is not None
            async with self._flush_lock:  # no commit or compaction of ours moves files while we list them
                self._confirmed = (shard, self._ids_in_my_files(shard))
        return task_id in self._confirmed[1]

    def _ids_in_my_files(self, shard: int) -> set[str]:
        ids: set[str] = set()
        for f in self._my_files(shard):
            column = _read_ids(f)
            ids.update(column.to_pylist() if column is not None else [])
        return ids

    # -- the actor's methods -----------------------------------------------
    def _ensure_loop_state(self) -> None:
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
            self._acks_ready = asyncio.Event()
            self._flusher = supervise(self._flush_periodically, f"sink {self.index} flusher")

    async def incarnation(self) -> str:
        """Changes whenever the sink process restarts (the driver compares)."""
        return self._incarnation

    async def incarnation_id(self) -> str:
        """The same as :meth:`incarnation` (both names are in use)."""
        return self._incarnation

    async def health(self) -> dict[str, Any]:
        """For the driver's watch: a sink stuck failing shows commit_failures > 0."""
        return {"sink": self.index, "incarnation": self._incarnation, "rows_buffered": len(self._buffered_ids),
                "commit_failures": self.commit_failures, "last_error": self.last_error,
                "rows_written": self.rows_written, "rows_unencodable": self.rows_unencodable}

    async def write(self, batch: bytes | list[TaskLike]) -> None:
        """Buffer finished tasks: a list, or a list pickled by the sender (the
        runtime's ``pack_tasks``: cheaper for Ray to carry than the list)."""
        self._ensure_loop_state()
        tasks: list[TaskLike] = pickle.loads(batch) if isinstance(batch, bytes) else batch
        for task in tasks:
            if task.id not in self._buffered_ids and not self._committed.maybe_contains(task.id):
                self._buffered_ids.add(task.id)  # the common case, without a coroutine per task
                self._buffers.setdefault(shard_of(task.id, self.s.num_shards), []).append(task)
            else:
                await self._take(task)
        if len(self._buffered_ids) >= self.s.max_buffered_rows and time.monotonic() >= self._retry_at:
            await self.flush()
        elif self._acks and self._acks_ready is not None:
            self._acks_ready.set()

    async def _take(self, task: TaskLike) -> None:
        if task.id in self._buffered_ids:
            return  # the first copy's ack (after its commit) answers for both
        if self._committed.maybe_contains(task.id):
            if await self._is_committed(task.id):
                self.duplicates_dropped += 1
                self._acks.append((task.id, DUPLICATE, None, None, 0))
                return
            if task.id in self._buffered_ids:  # another write() buffered a copy while we confirmed
                return
        self._buffered_ids.add(task.id)
        self._buffers.setdefault(shard_of(task.id, self.s.num_shards), []).append(task)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(max(self.s.flush_interval_s, self._retry_at - time.monotonic()))
            await self.flush()

    async def flush(self) -> None:
        """Commit everything buffered, then acknowledge it. A failed commit
        keeps its rows buffered and schedules a retry (it does not raise)."""
        self._ensure_loop_state()
        assert self._flush_lock is not None
        async with self._flush_lock:  # one commit at a time keeps file names and acks in order
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        assert self._acks_ready is not None
        if not self._buffers:
            return
        batch = {shard: list(tasks) for shard, tasks in self._buffers.items()}
        t0, bytes0 = time.perf_counter(), self.bytes_written
        acks, failure = await asyncio.to_thread(self._commit, batch)
        self._record_commit(time.perf_counter() - t0, len(acks), self.bytes_written - bytes0, failure)
        self._forget_committed({a[0] for a in acks})
        self._acks.extend(acks)
        if acks:
            self._acks_ready.set()
        self._note_outcome(failure)

    @staticmethod
    def _record_commit(seconds: float, rows: int, nbytes: int, failure: CommitFailed | None) -> None:
        if rows:
            metrics.SINK_COMMIT_S.observe(seconds)
            metrics.SINK_COMMIT_ROWS.observe(rows)
            metrics.SINK_COMMIT_BYTES.observe(nbytes)
            metrics.SINK_ROWS.inc(rows)
        if failure is not None:
            metrics.SINK_COMMIT_FAILURES.inc()

    def _forget_committed(self, ids: set[str]) -> None:
        """Drop committed rows from the buffers (by id: with keep=ok one file of
        a shard may be published and the other not)."""
        if not ids:
            return
        for shard in list(self._buffers):
            rest = [t for t in self._buffers[shard] if t.id not in ids]
            if rest:
                self._buffers[shard] = rest
            else:
                del self._buffers[shard]
        self._buffered_ids.difference_update(ids)
        self._committed.add_many(ids)
        if self._confirmed is not None:
            shard = self._confirmed[0]
            self._confirmed[1].update(i for i in ids if shard_of(i, self.s.num_shards) == shard)

    def _note_outcome(self, failure: CommitFailed | None) -> None:
        if failure is None:
            if self.commit_failures:
                log.warning("sink %d: commit succeeded again after %d failed attempts", self.index,
                            self.commit_failures)
            self.commit_failures, self.last_error, self._retry_at = 0, None, 0.0
            return
        self.commit_failures += 1
        self.last_error = str(failure)
        delay_s = min(self.s.commit_retry_max_s, COMMIT_RETRY_BASE_S * 2 ** self.commit_failures)
        self._retry_at = time.monotonic() + delay_s
        log.error("sink %d: commit failed (%s) with %d rows buffered under %s; keeping them and retrying in "
                  "%.1f s (attempt %d). Free space or fix the error; nothing is lost while the run lives.",
                  self.index, failure, len(self._buffered_ids), self.out_dir, delay_s, self.commit_failures,
                  exc_info=not isinstance(failure.error, OSError))

    def _commit(self, batch: dict[int, list[TaskLike]]) -> tuple[list[Ack], CommitFailed | None]:
        """Runs in a thread: commit shard by shard, stop at the first failure.
        The acks name exactly the rows whose file was published."""
        acks: list[Ack] = []
        for shard, tasks in sorted(batch.items()):
            try:
                self._commit_shard(shard, tasks, acks)
            except Exception as e:  # kept buffered and retried: a failed commit must never drop rows
                return acks, CommitFailed(shard, e)
        return acks, None

    def _commit_shard(self, shard: int, tasks: list[TaskLike], acks: list[Ack]) -> None:
        self._maybe_inject_failure(shard)
        table, unencodable = encode_rows(tasks, self.s.run_id, self.schema)
        if unencodable:
            log.error("sink %d: %d row(s) of shard %d could not be encoded; writing them as failed rows "
                      "(error_type=OutputEncodingError, the error names the column)", self.index, unencodable, shard)
        for base, part in self._split(table):
            path = shard_dir(base, shard) / self._file_name()
            write_table_atomic(part, path, self.s.compression, self._incarnation)
            self.files_written += 1
            self.rows_written += part.num_rows
            self.bytes_written += path.stat().st_size
            self.rows_unencodable += _count_unencodable(part) if unencodable else 0
            acks.extend(_acks_of(part))
            self._note_file(path, part.num_rows)

    def _maybe_inject_failure(self, shard: int) -> None:
        if self._fault_commits_left > 0:
            self._fault_commits_left -= 1
            reason = f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_COMMIT_FAIL_ENV}, a test hook)"
            raise OSError(errno.ENOSPC, reason, str(shard_dir(self.out_dir, shard)))

    def _file_name(self, compacted: bool = False) -> str:
        return part_file_name(self.s.run_id, self.index, self._incarnation, next(self._seq), compacted)

    def _note_file(self, path: Path, rows: int) -> None:
        files = self._small_files.setdefault(path.parent, [])
        files.append((path, rows))
        if len(files) >= self.s.compact_min_files:
            try:
                self._compact(path.parent)
            except Exception:  # the small files are committed; merging them can wait for the next try
                log.exception("sink %d: compaction of %s failed; its files stay as they are", self.index,
                              path.parent)

    def _compact(self, directory: Path) -> None:
        """Merge this incarnation's small files of one shard into one (see compaction in layout)."""
        files = [(p, n) for p, n in self._small_files.get(directory, []) if n < self.s.compact_max_rows]
        if len(files) < 2:
            return
        merged = compact_files([p for p, _ in files], directory / self._file_name(compacted=True),
                               self.s.compression, self._incarnation)
        rows = sum(n for _, n in files)
        keep = [(p, n) for p, n in self._small_files[directory] if (p, n) not in files]
        self._small_files[directory] = keep + [(merged, rows)]
        self.files_compacted += len(files)

    def _split(self, table: pa.Table) -> list[tuple[Path, pa.Table]]:
        """Where rows go: all in the dataset, or with keep=ok the others in _rejected/."""
        if self.s.keep != "ok":
            return [(self.out_dir, table)]
        is_ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
        parts = ((self.out_dir, table.filter(is_ok)), (self.out_dir / REJECTED_DIR, table.filter(pc.invert(is_ok))))
        return [(d, t) for d, t in parts if t.num_rows]

    async def wait_commits(self, timeout_s: float = 1.0) -> list[Ack]:
        """Long poll: the acks of rows committed since the last call."""
        self._ensure_loop_state()
        assert self._acks_ready is not None
        if not self._acks:
            try:
                await asyncio.wait_for(self._acks_ready.wait(), timeout_s)
            except TimeoutError:
                pass
        acks, self._acks = self._acks, []
        self._acks_ready.clear()
        return acks

    async def close(self) -> dict[str, Any]:
        """Commit what is buffered, stop the flusher and merge this incarnation's small files.

        All of it under the flush lock. The driver closes the sinks while the workers
        still live, so a re-admitted task's second copy can arrive now; its check
        against the files (:meth:`_is_committed`) takes the same lock, and so never
        lists the small files that the compaction is about to delete (CI 2026-11-30:
        such a copy counted as new and was written twice). The flusher is cancelled
        while we hold the lock, so never in the middle of a commit of its own."""
        self._ensure_loop_state()
        assert self._flush_lock is not None
        async with self._flush_lock:
            await self._flush_locked()
            if self._flusher is not None:
                self._flusher.cancel()
            if self._buffers:
                log.error("sink %d: closing with %d rows not committed (%s); rerun the same command to write them",
                          self.index, len(self._buffered_ids), self.last_error)
            for directory in list(self._small_files):
                try:
                    await asyncio.to_thread(self._compact, directory)
                except Exception:
                    log.exception("sink %d: final compaction of %s failed; its files stay as they are", self.index,
                                  directory)
        return {"rows": self.rows_written, "files": self.files_written, "files_compacted": self.files_compacted,
                "duplicates_dropped": self.duplicates_dropped, "rows_unencodable": self.rows_unencodable,
                "rows_not_committed": len(self._buffered_ids), "incarnation": self._incarnation, "t": time.time()}


def _read_ids(path: Path) -> pa.Array | None:
    try:
        return read_columns(path, ["id"]).column("id").combine_chunks()
    except (OSError, pa.ArrowException) as e:  # quarantined by the next scan_output; its ids re-run
        log.error("cannot read the ids of %s (%s); its rows count as not written", path, e)
        return None


def _count_unencodable(table: pa.Table) -> int:
    from matrix_hpc.store.rows import ENCODING_ERROR

    return int(pc.sum(pc.equal(table.column("error_type"), ENCODING_ERROR)).as_py() or 0)


def _injected_commit_failures(index: int) -> int:
    only = os.environ.get(FAULT_SINK_ENV)
    if only not in (None, "") and int(only) != index:
        return 0
    return int(os.environ.get(FAULT_COMMIT_FAIL_ENV, "0") or 0)


def _acks_of(table: pa.Table) -> list[Ack]:
    """Acks read off the committed table (token totals were summed once, for the row)."""
    names = ["id", "status", "error_type", "error", "reason", "prompt_tokens", "completion_tokens"]
    c = table.select(names).to_pydict()
    return [(i, st or "failed", et, (err or why or "")[:300], (pt or 0) + (ct or 0))
            for i, st, et, err, why, pt, ct in zip(*(c[n] for n in names), strict=True)]


