"""The supervisor that keeps server process trees from outliving their owner (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from matrix_hpc.services.llm.process import group_alive, server_pgid, spawn_supervised, stop_supervised

# A "server" with a grandchild, like vLLM's API server and engine core.
TREE = [sys.executable, "-c",
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; print(\"leaf up\", flush=True); time.sleep(300)']); "
        "print('tree up', flush=True); time.sleep(300)"]


def _wait(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


_spawned: list[psutil.Process] = []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    # A failing test must not leave its sleepers behind (psutil checks the
    # pid still names the same process before killing it).
    yield
    for proc in _spawned:
        try:
            if proc.is_running():
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    _spawned.clear()


def _track(pids: list[int]) -> None:
    for pid in pids:
        try:
            _spawned.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass


def _tree(tmp_path: Path) -> tuple[subprocess.Popen, int, list[int]]:
    proc = spawn_supervised(TREE, dict(os.environ), tmp_path / "logs" / "server.log", grace_s=2.0)
    pgid = server_pgid(proc)
    assert pgid is not None
    log = tmp_path / "logs" / "server.log"
    assert _wait(lambda: "leaf up" in log.read_text())  # every process past its start-up
    pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    _track([proc.pid, *pids])
    assert len(pids) == 2
    return proc, pgid, pids


def _gone(pids: list[int]) -> bool:
    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(dead(p) for p in pids)


def test_stop_removes_the_whole_tree(tmp_path: Path) -> None:
    proc, pgid, pids = _tree(tmp_path)
    stop_supervised(proc, pgid, grace_s=2.0)
    assert proc.poll() is not None
    assert _wait(lambda: _gone(pids)) and not group_alive(pgid)
    log = (tmp_path / "logs" / "server.log").read_text()
    assert "tree up" in log and "got signal 15; stopping process group" in log


def test_server_crash_takes_its_children_and_ends_the_supervisor(tmp_path: Path) -> None:
    proc, pgid, pids = _tree(tmp_path)
    os.kill(pgid, signal.SIGKILL)  # the server leader dies; its grandchild is orphaned
    assert proc.wait(timeout=15) == 128 + signal.SIGKILL
    assert _wait(lambda: _gone(pids))
    assert "server exited with code -9" in (tmp_path / "logs" / "server.log").read_text()


def test_owner_death_takes_the_tree_down(tmp_path: Path) -> None:
    # The owner is a separate process (like a Ray actor) that we SIGKILL.
    owner_code = (
        "import os, sys, time; from pathlib import Path; "
        "from matrix_hpc.services.llm.process import spawn_supervised, server_pgid; "
        f"p = spawn_supervised({TREE!r}, dict(os.environ), Path({str(tmp_path / 'o.log')!r}), grace_s=2.0); "
        "print(p.pid, server_pgid(p), flush=True); time.sleep(300)"
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    try:
        sup_pid, pgid = (int(x) for x in owner.stdout.readline().split())
        assert _wait(lambda: len(psutil.Process(sup_pid).children(recursive=True)) == 2)
        pids = [sup_pid] + [p.pid for p in psutil.Process(sup_pid).children(recursive=True)]
        _track(pids)
        owner.kill()
        owner.wait()
        assert _wait(lambda: _gone(pids), timeout_s=15), "the server tree outlived its owner"
    finally:
        owner.kill()
        owner.wait()


def test_supervisor_killed_outright_still_unwinds_python_descendants(tmp_path: Path) -> None:
    # Nobody is left to empty the group: the parent-death hook in every Python
    # process of the tree must take the grandchild down (vLLM's engine core).
    proc, pgid, pids = _tree(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait(lambda: _gone(pids)), "a grandchild outlived the supervisor"
    assert (tmp_path / "logs" / ".python-hooks" / "sitecustomize.py").exists()
