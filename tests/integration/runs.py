"""Helpers to run ``matrix-hpc`` for real (a subprocess with its own local Ray)
and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from matrix_hpc.store.layout import data_files
from matrix_hpc.store.rows import TIMING_COLUMNS, TIMING_MESSAGE_FIELDS

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list[dict[str, Any]], extra_lines: list[str] = ()) -> Path:  # type: ignore[assignment]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(l + "\n" for l in extra_lines))
    return path


def cli(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "matrix_hpc.cli.main", "run", "run.progress_interval_s=0", "run.num_cpus=2", *overrides]


def run_cli(*overrides: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def start_cli(*overrides: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cli(*overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


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


def wait_for_rows(out: Path, at_least: int, timeout_s: float = 120, poll_s: float = 0.2) -> None:
    """Wait until a running job has committed ``at_least`` rows to ``out``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
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
