"""Sink: owns a set of shards, buffers finished tasks, commits them as
Parquet files and acknowledges each committed id to the driver.

Run as an async Ray actor (see :func:`start_sinks`); the class itself has no
Ray dependency so its commit logic is unit-testable.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.store.layout import REJECTED_DIR, compact_files, shard_dir, shard_of, write_table_atomic
from matrix_hpc.store.rows import tasks_to_table

#: What the driver learns of each committed row: (id, status, error_type, error, tokens).
#: A task written twice in one run (re-admitted) is acknowledged as "duplicate".
Ack = tuple[str, str, str | None, str | None, int]
DUPLICATE = "duplicate"


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


class ShardSink:
    """Buffers rows per shard; a flush writes one file per non-empty shard."""

    def __init__(self, settings: SinkSettings, schema: pa.Schema, index: int) -> None:
        self.s = settings
        self.schema = schema
        self.out_dir = Path(settings.out_dir)
        self.index = index
        self._buffers: dict[int, list[TaskState]] = {}
        self._buffered = 0
        # ids written by this run: a re-admitted task is written once (also after a restart of this sink)
        self._seen: set[str] = self._ids_already_written()
        self._acks: list[Ack] = []
        self._acks_ready: asyncio.Event | None = None
        self._seq = itertools.count()
        self._small_files: dict[Path, list[tuple[Path, int]]] = {}  # shard dir -> (file, rows) of this run
        self._flush_lock: asyncio.Lock | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.rows_written = 0
        self.files_written = 0
        self.duplicates_dropped = 0
        self.files_compacted = 0

    def _ids_already_written(self) -> set[str]:
        import pyarrow.parquet as pq

        mine = f"part-{self.s.run_id}-{self.index:03d}-*.parquet"
        files = [*self.out_dir.glob(f"shard=*/{mine}"), *self.out_dir.glob(f"{REJECTED_DIR}/shard=*/{mine}")]
        return {i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}

    def _ensure_loop_state(self) -> None:
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
            self._acks_ready = asyncio.Event()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())

    async def write(self, tasks: list[TaskState]) -> None:
        self._ensure_loop_state()
        for task in tasks:
            if task.id in self._seen:
                self.duplicates_dropped += 1
                self._acks.append((task.id, DUPLICATE, None, None, 0))
                continue
            self._seen.add(task.id)
            self._buffers.setdefault(shard_of(task.id, self.s.num_shards), []).append(task)
            self._buffered += 1
        if self._buffered >= self.s.max_buffered_rows:
            await self.flush()
        elif self._acks and self._acks_ready is not None:
            self._acks_ready.set()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.s.flush_interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Commit everything buffered, then acknowledge it."""
        self._ensure_loop_state()
        assert self._flush_lock is not None and self._acks_ready is not None
        async with self._flush_lock:  # one commit at a time keeps file names and acks in order
            if not self._buffers:
                return
            buffers, self._buffers, self._buffered = self._buffers, {}, 0
            acks = await asyncio.to_thread(self._commit, buffers)
            self._acks.extend(acks)
            self._acks_ready.set()

    def _commit(self, buffers: dict[int, list[TaskState]]) -> list[Ack]:
        acks: list[Ack] = []
        for shard, tasks in sorted(buffers.items()):
            for base, rows in self._split(tasks):
                path = shard_dir(base, shard) / self._file_name()
                table = tasks_to_table(rows, self.s.run_id, self.schema)
                write_table_atomic(table, path, self.s.compression)
                self.files_written += 1
                self.rows_written += len(rows)
                self._note_file(path, len(rows))
                acks.extend(_acks_of(table))
        return acks

    def _file_name(self, compacted: bool = False) -> str:
        kind = "c" if compacted else ""
        return f"part-{self.s.run_id}-{self.index:03d}-{kind}{next(self._seq):06d}.parquet"

    def _note_file(self, path: Path, rows: int) -> None:
        files = self._small_files.setdefault(path.parent, [])
        files.append((path, rows))
        if len(files) >= self.s.compact_min_files:
            self._compact(path.parent)

    def _compact(self, directory: Path) -> None:
        """Merge this run's small files of one shard into one (see compaction in layout)."""
        files = [(p, n) for p, n in self._small_files.get(directory, []) if n < self.s.compact_max_rows]
        if len(files) < 2:
            return
        merged = compact_files([p for p, _ in files], directory / self._file_name(compacted=True),
                               self.s.compression)
        rows = sum(n for _, n in files)
        keep = [(p, n) for p, n in self._small_files[directory] if (p, n) not in files]
        self._small_files[directory] = keep + [(merged, rows)]
        self.files_compacted += len(files)

    def _split(self, tasks: list[TaskState]) -> list[tuple[Path, list[TaskState]]]:
        """Where rows go: all in the dataset, or with keep=ok the others in _rejected/."""
        if self.s.keep != "ok":
            return [(self.out_dir, tasks)]
        ok = [t for t in tasks if t.status == "ok"]
        rest = [t for t in tasks if t.status != "ok"]
        return [(d, rows) for d, rows in ((self.out_dir, ok), (self.out_dir / REJECTED_DIR, rest)) if rows]

    async def wait_commits(self, timeout_s: float = 1.0) -> list[Ack]:
        """Long poll: the acks of rows committed since the last call."""
        self._ensure_loop_state()
        assert self._acks_ready is not None
        if not self._acks:
            try:
                await asyncio.wait_for(self._acks_ready.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        acks, self._acks = self._acks, []
        self._acks_ready.clear()
        return acks

    async def close(self) -> dict[str, Any]:
        await self.flush()
        for directory in list(self._small_files):
            await asyncio.to_thread(self._compact, directory)
        if self._flusher is not None:
            self._flusher.cancel()
        return {"rows": self.rows_written, "files": self.files_written, "files_compacted": self.files_compacted,
                "duplicates_dropped": self.duplicates_dropped, "t": time.time()}


def _acks_of(table: pa.Table) -> list[Ack]:
    """Acks read off the committed table (token totals were summed once, for the row)."""
    c = table.select(["id", "status", "error_type", "error", "reason", "prompt_tokens", "completion_tokens"]).to_pydict()
    return [(i, st or "failed", et, (err or why or "")[:300], (pt or 0) + (ct or 0))
            for i, st, et, err, why, pt, ct in zip(c["id"], c["status"], c["error_type"], c["error"], c["reason"],
                                                   c["prompt_tokens"], c["completion_tokens"])]
