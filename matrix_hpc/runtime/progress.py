"""Run statistics, the live progress line and the end-of-run summary."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class RunStats:
    t_start: float = field(default_factory=time.time)
    by_status: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)  # error type -> one message
    error_counts: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    skipped_done: int = 0  # ids already in the output (resume)
    duplicates: int = 0  # input ids seen twice in this run
    readmitted: int = 0  # tasks re-admitted after a timeout / lost worker
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

    def progress_line(self) -> str:
        rate = self.done / self.elapsed_s()
        eta = "?"
        if self.total_input is not None and rate > 0:
            remaining = max(0, self.total_input - self.skipped_done - self.done)
            eta = _hms(remaining / rate)
        return (f"[matrix] done {self.done} (ok {self.by_status['ok']}, filtered {self.by_status['filtered']}, "
                f"failed {self.by_status['failed']}) | in flight {self.in_flight} | {rate:,.1f} tasks/s | "
                f"{self.tokens / self.elapsed_s():,.0f} tok/s | ETA {eta}")

    def summary(self, out_dir: str, interrupted: bool) -> str:
        lines = [
            "=" * 72,
            f"matrix_hpc run {'INTERRUPTED (rerun the same command to resume)' if interrupted else 'finished'}",
            f"  output:     {out_dir}",
            f"  rows:       {self.done} this run  (ok {self.by_status['ok']}, filtered "
            f"{self.by_status['filtered']}, failed {self.by_status['failed']})",
            f"  resumed:    {self.skipped_done} ids already done, {self.duplicates} duplicate input ids skipped",
            f"  recovered:  {self.readmitted} tasks re-admitted after a lost worker or task timeout",
            f"  time:       {_hms(self.elapsed_s())}  ({self.done / self.elapsed_s():,.1f} tasks/s, "
            f"{self.tokens / self.elapsed_s():,.0f} tokens/s, {self.tokens} tokens)",
        ]
        for etype, n in self.error_counts.most_common(5):
            lines.append(f"  error {etype} x{n}: {self.error_examples.get(etype, '')[:160]}")
        lines.append(f"  inspect:    matrix-hpc inspect {out_dir}")
        lines.append("=" * 72)
        return "\n".join(lines)


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
