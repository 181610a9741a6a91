"""Run statistics, the live progress line and the end-of-run summary.

The live line counts acknowledgements (fast, approximate); the summary is
read from the output on disk (what a reader will get).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from matrix_hpc.runtime.driver import RunResult

#: How a run ended.
FINISHED = "finished"  # every input id is in the output, once
INTERRUPTED = "interrupted"  # stopped by a signal or drain: rerun to resume
INCOMPLETE = "incomplete"  # ran to the end (or failed) with input ids missing or duplicated

DUPLICATE_EXAMPLES = 3  # repeated input ids named in the summary


@dataclass
class RunStats:
    t_start: float = field(default_factory=time.time)
    by_status: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)  # error type -> one message
    error_counts: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    skipped_done: int = 0  # ids already in the output (resume)
    retried_failed: int = 0  # ids whose `failed` row runs again (run.retry=failed)
    duplicates: int = 0  # input rows whose id an earlier input row had (run once)
    duplicate_examples: list[str] = field(default_factory=list)  # "id at file:line (first at file:line)"
    readmitted: int = 0  # tasks re-admitted after a timeout / lost worker / lost sink / failed send
    lost_sends: int = 0  # tasks in batches between peers that failed (re-admitted)
    verify_readmitted: int = 0  # ids missing from the output at the end, admitted again
    in_flight: int = 0
    total_input: int | None = None  # for the ETA, counted in the background
    t_admit_start: float | None = None  # first admission (after Ray and actors are up)
    t_end: float | None = None

    @property
    def done(self) -> int:
        return sum(self.by_status.values())

    def elapsed_s(self) -> float:
        return max(1e-9, time.time() - self.t_start)

    def record(self, status: str, error_type: str | None, error: str | None, tokens: int) -> None:
        self.by_status[status] += 1
        self.tokens += tokens
        if error_type:
            self.error_counts[error_type] += 1
            self.error_examples.setdefault(error_type, error or "")

    def note_duplicate(self, task_id: str, where: str, first_where: str) -> None:
        self.duplicates += 1
        if len(self.duplicate_examples) < DUPLICATE_EXAMPLES:
            self.duplicate_examples.append(f"{task_id!r} at {where or '?'} (first at {first_where})")

    def progress_line(self) -> str:
        rate = self.done / self.elapsed_s()
        eta = "?"
        if self.total_input is not None and rate > 0:
            remaining = max(0, self.total_input - self.skipped_done - self.done)
            eta = _hms(remaining / rate)
        return (f"[matrix] done {self.done} (ok {self.by_status['ok']}, filtered {self.by_status['filtered']}, "
                f"failed {self.by_status['failed']}) | in flight {self.in_flight} | {rate:,.1f} tasks/s | "
                f"{self.tokens / self.elapsed_s():,.0f} tok/s | ETA {eta}")


def render_summary(result: RunResult) -> str:
    """The one-screen end-of-run summary. Row counts come from the output on
    disk (``result.disk``), not from acknowledgements."""
    stats, disk = result.stats, result.disk
    by_status = Counter(disk.by_status if disk is not None else stats.by_status)
    tokens = disk.tokens if disk is not None else stats.tokens
    rows = sum(by_status.values())
    elapsed_s = (stats.t_end or time.time()) - stats.t_start
    lines = ["=" * 72, f"matrix_hpc run {_headline(result)}", f"  output:     {result.out_dir}",
             f"  run id:     {result.run_id}",
             f"  rows:       {rows} written by this run, read back from disk  (ok {by_status['ok']}, "
             f"filtered {by_status['filtered']}, failed {by_status['failed']})"]
    if disk is not None:
        lines.append(f"  on disk:    {disk.rows} rows, {disk.distinct_ids} distinct ids" + (
            f"  -- {disk.duplicate_ids} DUPLICATE ids (e.g. {', '.join(map(str, disk.duplicate_examples[:3]))})"
            if disk.duplicate_ids else ""))
    lines.append(f"  resumed:    {stats.skipped_done} ids already done"
                 + (f", {stats.retried_failed} failed rows run again" if stats.retried_failed else ""))
    lines.append(f"  input:      {stats.duplicates} repeated input ids run once"
                 + (f" (e.g. {'; '.join(stats.duplicate_examples)})" if stats.duplicate_examples else ""))
    lines.append(f"  recovered:  {stats.readmitted} tasks re-admitted (lost worker or sink, failed send, timeout), "
                 f"{stats.verify_readmitted} missing at the end and admitted again")
    lines.append(f"  time:       {_hms(elapsed_s)}  ({rows / max(elapsed_s, 1e-9):,.1f} tasks/s, "
                 f"{tokens / max(elapsed_s, 1e-9):,.0f} tokens/s, {tokens} tokens)")
    if result.missing is not None and len(result.missing):
        lines.append(f"  MISSING:    {len(result.missing)} input ids have no row (e.g. "
                     f"{', '.join(result.missing.examples())})")
    for problem in result.problems:
        lines.append(f"  PROBLEM:    {problem}")
    for etype, n in stats.error_counts.most_common(5):
        lines.append(f"  error {etype} x{n}: {stats.error_examples.get(etype, '')[:160]}")
    lines.append(f"  inspect:    matrix-hpc inspect {result.out_dir}")
    lines.append("=" * 72)
    return "\n".join(lines)


def _headline(result: RunResult) -> str:
    if result.outcome == FINISHED:
        return "finished: every input id is in the output, once"
    if result.outcome == INTERRUPTED:
        return "INTERRUPTED (rerun the same command to resume)"
    why = []
    if result.missing is not None and len(result.missing):
        why.append(f"{len(result.missing)} input ids missing")
    if result.disk is not None and result.disk.duplicate_ids:
        why.append(f"{result.disk.duplicate_ids} ids written twice")
    why += ["stopped by an error"] if result.problems else []
    return f"INCOMPLETE: {', '.join(why) or 'not verified'} (fix what is named below, then rerun the same command)"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressPrinter:
    """One line, rewritten in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def show(self, stats: RunStats) -> None:
        line = stats.progress_line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
