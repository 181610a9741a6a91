"""The live progress: a bar redrawn in place on a terminal (a real
pseudo-terminal here), greppable lines elsewhere, ``run.progress`` overriding."""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import termios
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from matrix_hpc.runtime.progress import ProgressMode, ProgressPrinter, RunStats

#: The plain line's format, which log greps rely on: keep it stable.
LINE = re.compile(r"^\[matrix\] done (\d+) \(ok (\d+), filtered (\d+), failed (\d+)\) \| in flight (\d+) \| "
                  r"[\d,.]+ tasks/s \| [\d,]+ tok/s \| ETA (\S+)$")


def stats(ok: int = 60, filtered: int = 25, failed: int = 15, total: int | None = 200,
          t_start: float = 1000.0) -> RunStats:
    s = RunStats(t_start=t_start, by_status=Counter({"ok": ok, "filtered": filtered, "failed": failed}),
                 tokens=5000, in_flight=7, total_input=total)
    return s


@pytest.fixture
def pty_stream() -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A writable stream on a real pseudo-terminal 80 columns wide, and the master end to read it back."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n" translation: read back what was written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    stream = open(slave, "w", encoding="utf-8", closefd=True)  # noqa: SIM115 (closed below)
    yield stream, master
    stream.close()
    os.close(master)


def read_all(master: int) -> str:
    os.set_blocking(master, False)
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_a_log_gets_plain_greppable_lines() -> None:
    out = io.StringIO()  # not a terminal, like a Slurm log
    printer = ProgressPrinter(out)
    assert not printer.bar and printer.interval_s(5.0) == 5.0
    printer.show(stats())
    printer.show(stats(ok=70))
    printer.end()
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    parsed = [LINE.match(line) for line in lines[:-1]]
    assert all(parsed), lines
    assert [m.groups()[:5] for m in parsed if m] == [("100", "60", "25", "15", "7"), ("110", "70", "25", "15", "7")]


def test_a_terminal_gets_one_bar_redrawn_in_place(pty_stream: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = pty_stream
    printer = ProgressPrinter(stream)
    assert printer.bar and printer.interval_s(5.0) == 1.0
    began = time.time() - 10
    printer.show(stats(ok=30, filtered=5, failed=5, t_start=began))
    printer.show(stats(t_start=began))
    printer.end()
    written = read_all(master)
    assert written.endswith("\n") and written.count("\n") == 1  # one line, redrawn, ended once
    frames = [f for f in written.rstrip("\n").split("\r\x1b[2K") if f]
    assert len(frames) == 2
    last = frames[-1]
    assert all(len(f) < 80 for f in frames), frames  # fits the terminal, so the next redraw erases it
    assert re.search(r"\[[█▒░ ]{10,}\]  50% 100/200 \| ok 60 filtered 25 failed 15 \| ETA \d+:\d\d:\d\d",
                     last), last


def test_the_bar_shows_the_status_mix_in_proportion() -> None:
    printer = ProgressPrinter(io.StringIO(), mode="bar")
    line = printer.bar_line(stats(ok=50, filtered=10, failed=10, total=100), columns=200, now=1010.0)
    cells = re.search(r"\[([█▒░ ]+)\]", line)
    assert cells is not None
    bar = cells.group(1)
    n = len(bar)
    assert Counter(bar) == Counter({"█": round(n * 0.5), "▒": round(n * 0.6) - round(n * 0.5),
                                    "░": round(n * 0.7) - round(n * 0.6), " ": n - round(n * 0.7)}), bar
    assert bar == "".join(sorted(bar, key="█▒░ ".index))  # ok, filtered, failed, then pending
    assert line.endswith("| ok 50 filtered 10 failed 10 | ETA 0:00:04 | 7.0/s | in flight 7 | 500 tok/s | avg 7.0/s")
    later = printer.bar_line(stats(ok=60, filtered=10, failed=10, total=100), columns=200, now=1020.0)
    assert "| 1.0/s |" in later and "avg 4.0/s" in later  # 10 more in the last 10 s; 80 in 20 s
    assert "ETA 0:00:20" in later  # the 20 left at the recent rate (start-up time no longer counts)


def test_the_bar_without_a_known_total_shows_counts() -> None:
    line = ProgressPrinter(io.StringIO(), mode="bar").bar_line(stats(total=None), columns=120, now=1010.0)
    assert line.startswith("[matrix] done 100 | ok 60 filtered 25 failed 15 | 10.0/s | in flight 7")
    assert "ETA" not in line


def test_run_progress_overrides_the_terminal_check(pty_stream: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = pty_stream
    lines = ProgressPrinter(stream, mode=ProgressMode.lines)
    lines.show(stats())
    assert LINE.match(read_all(master).rstrip("\n"))
    assert ProgressPrinter(io.StringIO(), mode="bar").bar
    with pytest.raises(ValueError, match="sometimes"):
        ProgressPrinter(io.StringIO(), mode="sometimes")


def test_run_progress_is_a_config_choice(tmp_path: Path) -> None:
    from matrix_hpc.cli.config_check import ConfigError, compose
    from tests.conftest import REPO_ROOT

    base = ["workflow=overhead", f"output.dir={tmp_path}"]
    cfg = compose([*base, "run.progress=lines"], str(REPO_ROOT / "conf"))
    assert ProgressMode(cfg.run.progress) == ProgressMode.lines
    with pytest.raises(ConfigError, match=r"run.progress.*sometimes.*auto, bar, lines"):
        compose([*base, "run.progress=sometimes"], str(REPO_ROOT / "conf"))
