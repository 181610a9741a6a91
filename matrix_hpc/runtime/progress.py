"""Run statistics, the live progress line and the end-of-run summary.

The live line counts acknowledgements (fast, approximate); the summary is
read from the output on disk (what a reader will get).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
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


class ProgressMode(Enum):
    """How the live progress is shown (``run.progress``)."""

    auto = "auto"  # bar on a terminal, lines otherwise (a Slurm log, a pipe, a file)
    bar = "bar"  # one line redrawn in place: a bar of the status mix, counts, rates, ETA
    lines = "lines"  # one greppable line per interval, starting "[matrix] done"


BAR_REDRAW_S = 1.0  # a bar redraws at least this often, whatever run.progress_interval_s says
BAR_MIN_CELLS = 10
RATE_WINDOW_MIN_S = 0.5  # the "now" rate is measured over at least this long
BAR_MAX_CELLS = 40
#: The bar's cells per status (ok, filtered, failed, then any other); pending cells are blank.
BAR_CHARS = {"ok": "█", "filtered": "▒", "failed": "░"}
BAR_OTHER = "▓"


class ProgressPrinter:
    """The live progress on ``stream``: a bar redrawn in place (carriage
    return) on a terminal, appended greppable lines elsewhere; ``mode``
    overrides the choice."""

    def __init__(self, stream: TextIO | None = None, mode: ProgressMode | str = ProgressMode.auto) -> None:
        self.stream = stream if stream is not None else sys.stderr
        mode = ProgressMode(mode.value if isinstance(mode, Enum) else mode)
        self.bar = mode == ProgressMode.bar or (mode == ProgressMode.auto and _isatty(self.stream))
        self._last: tuple[float, int] | None = None  # (time, done) at the start of the rate's window
        self._rate = 0.0  # tasks/s over the last window
        self._drawn = False

    def interval_s(self, configured_s: float) -> float:
        """How often to show: a bar redraws at least every second."""
        return min(configured_s, BAR_REDRAW_S) if self.bar else configured_s

    def show(self, stats: RunStats) -> None:
        if self.bar:
            self.stream.write("\r\x1b[2K" + self.bar_line(stats, _columns(self.stream)))
            self._drawn = True
        else:
            self.stream.write(stats.progress_line() + "\n")
        self.stream.flush()

    def bar_line(self, stats: RunStats, columns: int, now: float | None = None) -> str:
        """``[matrix] [██████▒░    ]  61% 6,100/10,000 | ok 6,000 filtered 60 failed 40 | ETA 0:00:05 |
        820.3/s | in flight 1,000 | 45,000 tok/s | avg 790.1/s``, fitted to ``columns``: the bar
        narrows first, then the least useful fields go (avg, tok/s, in flight)."""
        now = time.time() if now is None else now
        done = stats.done
        elapsed_s = max(1e-9, now - stats.t_start)
        avg = done / elapsed_s
        if self._last is None or now - self._last[0] >= RATE_WINDOW_MIN_S:
            self._rate = avg if self._last is None else (done - self._last[1]) / (now - self._last[0])
            self._last = (now, done)
        total = None if stats.total_input is None else max(0, stats.total_input - stats.skipped_done)
        fields = [" ".join(f"{s} {n:,}" for s, n in _status_mix(stats.by_status)) or "nothing done yet"]
        if total:
            pace = self._rate if self._rate > 0 else avg  # the recent rate: start-up time no longer counts
            fields.append(f"ETA {_hms(max(0, total - done) / pace) if pace > 0 else '?'}")
        fields += [f"{self._rate:,.1f}/s", f"in flight {stats.in_flight:,}", f"{stats.tokens / elapsed_s:,.0f} tok/s",
                   f"avg {avg:,.1f}/s"]
        width = max(columns - 1, 1)
        while True:
            tail = "".join(f" | {f}" for f in fields)
            if not total:
                line = f"[matrix] done {done:,}{tail}"
            else:
                head = f"[matrix] [] {min(done / total, 1):4.0%} {done:,}/{total:,}"
                cells = max(BAR_MIN_CELLS, min(BAR_MAX_CELLS, width - len(head) - len(tail)))
                line = head.replace("[]", f"[{_cells(stats.by_status, total, cells)}]") + tail
            if len(line) <= width or len(fields) <= 1:
                return line[:width]
            fields.pop()

    def end(self) -> None:
        if self.bar and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream
        return False


def _columns(stream: TextIO) -> int:
    """The terminal's width (the bar must fit one line, or a redraw cannot erase it)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size().columns


def _status_mix(by_status: Counter[str]) -> list[tuple[str, int]]:
    first = [s for s in BAR_CHARS if by_status.get(s)]
    return [(s, by_status[s]) for s in first + sorted(s for s in by_status if s not in BAR_CHARS and by_status[s])]


def _cells(by_status: Counter[str], total: int, cells: int) -> str:
    """``cells`` characters: each status's share of ``total``, then blanks for what is pending."""
    out = ""
    done = 0
    for status, n in _status_mix(by_status):
        done += n
        out += BAR_CHARS.get(status, BAR_OTHER) * (round(cells * min(done, total) / total) - len(out))
    return out + " " * (cells - len(out))
