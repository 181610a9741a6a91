"""Helpers to run ``matrix-hpc`` for real (a subprocess with its own local Ray)
and read what it wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from matrix_hpc.store.layout import data_files
from matrix_hpc.store.rows import TIMING_COLUMNS, TIMING_MESSAGE_FIELDS

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list[dict[str, Any]], extra_lines: Iterable[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def cli(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "matrix_hpc.cli.main", "run", "run.progress_interval_s=0", "run.num_cpus=2",
            *overrides]


def run_cli(*overrides: str, timeout_s: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)


def log_of(result: subprocess.CompletedProcess[str]) -> str:
    """All a run said: Hydra's log lines (stdout), then stderr (warnings of Ray, the summary)."""
    return (result.stdout or "") + (result.stderr or "")


def start_cli(*overrides: str, stderr: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a run in the background (its own session); ``stderr``: a file to keep its log in
    (stdout too: Hydra sends the log lines there)."""
    err = open(stderr, "wb") if stderr is not None else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    try:
        return subprocess.Popen(cli(*overrides), cwd=REPO, stdout=err, stderr=err, start_new_session=True, env=env)
    finally:
        if stderr is not None:
            err.close()  # type: ignore[union-attr]


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run and everything it started (Ray's processes included)."""
    try:
        parent = psutil.Process(proc.pid)
        victims = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    proc.wait(timeout=10)


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [r for f in data_files(out) for r in pq.read_table(f).to_pylist()]


def wait_for_rows(out: Path, at_least: int, timeout_s: float = 120, poll_s: float = 0.2,
                  while_running: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until a running job has committed ``at_least`` rows to ``out``
    (``while_running``: fail at once when that job has ended)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if while_running is not None and while_running.poll() is not None:
            raise AssertionError(f"the run ended (exit {while_running.returncode}) before {out} had {at_least} rows")
        try:
            if len(read_rows(out)) >= at_least:
                return
        except FileNotFoundError:  # a compaction replaced a file under the reader: retry
            pass
        time.sleep(poll_s)
    raise AssertionError(f"{out} did not reach {at_least} rows in {timeout_s} s")


def without_timing(row: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in row.items() if k not in TIMING_COLUMNS}
    row["messages"] = [{k: v for k, v in m.items() if k not in TIMING_MESSAGE_FIELDS} for m in row["messages"]]
    return row


def env_with_repo() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def ids_on_disk(out: Path) -> Counter[str]:
    """How many rows each id has in ``out`` (readers' view: the dataset's files)."""
    return Counter(r["id"] for r in read_rows(out))


def assert_each_id_once(out: Path, expected_ids: Iterable[str]) -> None:
    """The output holds exactly ``expected_ids``, one row each (named when not)."""
    got, expected = ids_on_disk(out), Counter(expected_ids)
    twice = sorted(i for i, n in got.items() if n > 1)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not (twice or missing or extra), (f"{out}: {len(twice)} ids twice (e.g. {twice[:5]}), "
                                             f"{len(missing)} missing (e.g. {missing[:5]}), "
                                             f"{len(extra)} unexpected (e.g. {extra[:5]})")


SUMMARY_ROWS = re.compile(r"rows:\s+(\d+) written by this run, read back from disk\s+\(ok (\d+), filtered (\d+), "
                          r"failed (\d+)\)")
SUMMARY_DISK = re.compile(r"on disk:\s+(\d+) rows, (\d+) distinct ids")
SUMMARY_RUN_ID = re.compile(r"run id:\s+(\S+)")


def summary_of(stderr: str) -> dict[str, Any]:
    """The numbers of the end-of-run summary in a run's stderr (the last one)."""
    rows, disk, run_id = SUMMARY_ROWS.findall(stderr), SUMMARY_DISK.findall(stderr), SUMMARY_RUN_ID.findall(stderr)
    assert rows and disk and run_id, f"no end-of-run summary in:\n{stderr[-3000:]}"
    n, ok, filtered, failed = map(int, rows[-1])
    total, distinct = map(int, disk[-1])
    return {"rows": n, "ok": ok, "filtered": filtered, "failed": failed, "on_disk": total, "distinct": distinct,
            "run_id": run_id[-1]}


def assert_summary_matches_disk(stderr: str, out: Path) -> dict[str, Any]:
    """The summary says what the files hold: this run's rows by status, all rows, distinct ids."""
    summary = summary_of(stderr)
    rows = read_rows(out)
    mine = Counter(r["status"] for r in rows if r["run_id"] == summary["run_id"])
    assert (summary["rows"], summary["ok"], summary["filtered"], summary["failed"]) == (
        sum(mine.values()), mine["ok"], mine["filtered"], mine["failed"]), (summary, mine)
    assert (summary["on_disk"], summary["distinct"]) == (len(rows), len({r["id"] for r in rows})), summary
    return summary


def actor_processes(proc: subprocess.Popen[bytes], actor_class: str) -> list[psutil.Process]:
    """The live processes of a run that host a Ray actor of ``actor_class`` (by process title)."""
    title = f"ray::{actor_class}"
    found = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in children:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(title in part for part in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for_actors(proc: subprocess.Popen[bytes], actor_class: str, count: int,
                    timeout_s: float = 60) -> list[psutil.Process]:
    """Wait until ``count`` processes host ``actor_class`` (e.g. after Ray restarted one)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = actor_processes(proc, actor_class)
        if len(found) >= count:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {count} {actor_class} actors ran")
        time.sleep(0.2)
    raise AssertionError(f"{count} {actor_class} actor processes did not appear in {timeout_s} s")


def committed_rows(out: Path) -> int:
    """Rows readable in ``out`` now (0 while nothing is committed; a file replaced under the reader: retry)."""
    for _ in range(5):
        try:
            return len(read_rows(out))
        except (FileNotFoundError, OSError):
            time.sleep(0.1)
    return len(read_rows(out))


def wait_for_log(path: Path, text: str, count: int = 1, timeout_s: float = 60) -> None:
    """Wait until a running job's log (a file) holds ``text`` at least ``count`` times."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not say {text!r} {count} time(s) in {timeout_s} s")
