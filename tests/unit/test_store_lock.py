"""One writer per output directory, across processes (real POSIX locks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrix_hpc.store.lock import OutputLock, OutputLocked, read_holder

HOLDER = """
import sys, time
from pathlib import Path
from matrix_hpc.store.lock import OutputLock
lock = OutputLock(Path(sys.argv[1]), sys.argv[2], heartbeat_s=float(sys.argv[3]))
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold(out: Path, run_id: str, heartbeat_s: float = 0.2, slurm_job: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("SLURM_JOB_ID", None)
    if slurm_job:
        env["SLURM_JOB_ID"] = slurm_job
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), run_id, str(heartbeat_s)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


def test_a_second_run_is_refused_naming_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder = _hold(tmp_path, "run-A", slurm_job="4242")
    try:
        with pytest.raises(OutputLocked) as e:
            OutputLock(tmp_path, "run-B").acquire()
        message = str(e.value)
        assert "run-A" in message and f"pid {holder.pid}" in message and "Slurm job 4242" in message
        assert "host " in message and "since " in message
    finally:
        _stop(holder)


def test_a_holder_killed_with_sigkill_does_not_block(tmp_path: Path) -> None:
    holder = _hold(tmp_path, "run-A")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with OutputLock(tmp_path, "run-B") as lock:
        assert read_holder(tmp_path)["run_id"] == "run-B" and not lock._taken_over
    assert read_holder(tmp_path) == {}  # released: record gone


def test_the_heartbeat_keeps_the_record_fresh(tmp_path: Path) -> None:
    with OutputLock(tmp_path, "run-A", heartbeat_s=0.05):
        first = read_holder(tmp_path)["heartbeat"]
        time.sleep(0.3)
        assert read_holder(tmp_path)["heartbeat"] > first


def test_a_requeued_job_takes_over_from_its_lost_predecessor_only(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The "lost node": a process that holds the lock but no longer beats (heartbeat far apart).
    lost = _hold(tmp_path, "run-A", heartbeat_s=3600, slurm_job="777")
    try:
        time.sleep(0.3)
        monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job: refused whatever the heartbeat
        with pytest.raises(OutputLocked):
            OutputLock(tmp_path, "run-X", stale_after_s=0.1).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "777")  # our own job, but the heartbeat is fresh enough: refused
        with pytest.raises(OutputLocked):
            OutputLock(tmp_path, "run-B", stale_after_s=60).acquire()
        with OutputLock(tmp_path, "run-B", stale_after_s=0.1) as lock:  # same job, stale: the requeue
            assert lock._taken_over and read_holder(tmp_path)["run_id"] == "run-B"
    finally:
        _stop(lost)


def test_one_process_cannot_lock_twice(tmp_path: Path) -> None:
    with OutputLock(tmp_path, "run-A"):
        with pytest.raises(OutputLocked, match="already locked by run run-A in this process"):
            OutputLock(tmp_path, "run-B").acquire()
    with OutputLock(tmp_path, "run-C"):
        pass


def test_a_holder_whose_lock_was_taken_over_learns_it(tmp_path: Path) -> None:
    import json

    with OutputLock(tmp_path, "run-A", heartbeat_s=0.05) as lock:
        record = read_holder(tmp_path)
        record["run_id"] = "run-B"  # what a requeued job's takeover writes
        (tmp_path / "_matrix" / "lock.json").write_text(json.dumps(record))
        assert lock.lost.wait(5)
        assert read_holder(tmp_path)["run_id"] == "run-B"  # not overwritten
    assert read_holder(tmp_path)["run_id"] == "run-B"  # release leaves the new holder's record
