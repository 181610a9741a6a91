"""Killing what a sandbox left running: a process group, every process of a uid, every pid a cgroup lists.

The one home of process-tree killing in this package (the backends, the
per-sandbox uids and the cgroups all come here).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import psutil


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (started with a new session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_until_gone(list_pids: Callable[[], set[int]], wait_s: float = 2.0) -> None:
    """SIGKILL whatever ``list_pids`` lists until it lists nothing or ``wait_s`` has passed (a cgroup's members)."""
    deadline = time.monotonic() + wait_s
    while (pids := list_pids()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def kill_uid_processes(uid: int, *, wait_s: float = 2.0) -> int:
    """SIGKILL every process whose real or effective uid is ``uid``; returns how many."""
    victims = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None and uid in (uids.real, uids.effective):
            victims.append(proc)
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
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
