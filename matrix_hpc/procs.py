"""Processes and ports: the one home of the OS-level helpers every layer uses.

- ending processes: a tree (``kill_tree``), a group (``kill_group``, or
  ``stop_group`` with a grace period), every
  process of a uid (``kill_uid_processes``), whatever a listing keeps naming
  (``kill_until_gone``: a cgroup's members), processes whose command line
  carries a marker (``kill_by_marker``: Ray processes that lost their parent);
- ``free_port``: a port the OS says is free now;
- ``tail_text``: the last lines of a log, for error messages;
- the exit codes of ``matrix-hpc run`` that a Slurm job, a script or a
  requeue decision reads (docs/runtime.md).

One exception, on purpose: ``matrix_hpc/services/llm/process.py`` is run as a
stand-alone script under another interpreter (vLLM's venv, where matrix_hpc
is not installed), so its process-group supervisor keeps its own stdlib code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``matrix-hpc run``: every input id has its row, once (verified from disk).
EXIT_OK = 0
#: Another run holds the output directory (or the config is refused).
EXIT_LOCKED = 1
#: Ended without a verified output: ids missing or written twice, or an error stopped it.
EXIT_INCOMPLETE = 3
#: Stopped before finishing (signal, drain): rerun to resume; a Slurm run job requeues on it.
EXIT_INTERRUPTED = 75


def free_port(host: str = "") -> int:
    """A TCP port free on ``host`` now ('' = every interface). Another process
    may take it before it is used: callers that can, retry on a bind error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail_text(path: Path | str, max_lines: int = 20, max_bytes: int = 16_384) -> str:
    """The last lines of a log file ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - max_bytes)
            f.seek(start)
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[1 if start else 0:][-max_lines:])  # the first line read may be cut: dropped


def terminate(procs: list[Any], grace_s: float) -> None:
    """SIGTERM ``procs`` (psutil.Process), SIGKILL those alive after ``grace_s``."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def kill_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a process and its descendants; SIGKILL survivors after ``grace_s``."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    terminate(procs, grace_s)


def find_by_marker(marker: str) -> list[Any]:
    """Processes on this host (not this one) whose command line mentions ``marker``."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if p.pid != os.getpid() and any(marker in part for part in p.info["cmdline"] or []):
                found.append(p)
    return found


def kill_by_marker(marker: str, grace_s: float = 10.0) -> int:
    """End the processes whose command line mentions ``marker`` (e.g. a Ray
    node's unique tmp dir: Ray processes that lost their parent); how many."""
    procs = find_by_marker(marker)
    terminate(procs, grace_s)
    return len(procs)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (started with a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """End a child started with its own session and the group it leads:
    SIGTERM to the group, SIGKILL after ``grace_s``, then reap the child."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()


def kill_until_gone(list_pids: Callable[[], set[int]], wait_s: float = 2.0) -> None:
    """SIGKILL whatever ``list_pids`` lists until it lists nothing or ``wait_s`` has passed (a cgroup's members)."""
    deadline = time.monotonic() + wait_s
    while (pids := list_pids()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def kill_uid_processes(uid: int, *, wait_s: float = 2.0) -> int:
    """SIGKILL every process whose real or effective uid is ``uid``; returns how many."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None and uid in (uids.real, uids.effective):
            victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    me = os.getpid()
    for proc in victims:
        try:
            if proc.ppid() == me:
                continue  # our own child: asyncio reaps it; waiting here would steal its status
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (psutil.Error, psutil.TimeoutExpired):
            pass
    return len(victims)


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child that must not outlive the process starting it (SIGTERM when that
    one dies, even by SIGKILL): Linux's ``PR_SET_PDEATHSIG``, looked up here in the parent (after
    fork only the call runs); None elsewhere."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return hook
