"""Resource limits for sandboxed processes, and the per-sandbox host uid.

Limits are POSIX rlimits applied with util-linux ``prlimit`` in front of the
sandboxed command (no ``preexec_fn``: Ray workers are multi-threaded and
forking Python code there can deadlock).

Why a uid per sandbox: ``RLIMIT_NPROC`` is not enforced for root and counts
every process of a uid. When we run as root, each sandbox therefore runs as
its own unprivileged host uid taken from a configured range, so a fork bomb
hits the sandbox's own process limit and nothing else, and "kill every
process of this uid" removes whatever a sandbox left behind. Uids are
claimed with ``flock`` on a lock file in one node-wide dir that only root can
write (``uid_lock_dir``), so pools in several processes on one node never
share one, whatever their scratch roots, and a dead holder's uid frees itself.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from matrix_hpc.services.sandbox.safe_path import ensure_private_dir, open_dir, open_lock_file


@dataclass
class SandboxLimitsConf:
    """Per-sandbox limits; defaults suit running model-written code snippets."""

    mem_mb: int = 1024  # address-space limit per process (RLIMIT_AS), MiB
    cpu_time_s: int = 60  # CPU seconds per process (RLIMIT_CPU); SIGKILL past it
    max_procs: int = 64  # processes + threads of one sandbox (RLIMIT_NPROC on its own uid)
    max_file_mb: int = 64  # largest file a sandboxed process may write (RLIMIT_FSIZE), MiB
    max_open_files: int = 256  # open file descriptors per process (RLIMIT_NOFILE)
    sandbox_mem_mb: int = 4096  # memory of all processes of one sandbox together (cgroup), MiB
    cgroup: str = "auto"  # auto: per-sandbox cgroup when possible | off | required: fail without one
    cgroup_parent: str | None = None  # a delegated cgroup v2 dir to create sandbox cgroups under
    tmp_mb: int = 256  # size of each of the private /tmp and /dev/shm (tmpfs: host memory), MiB
    exec_timeout_s: float = 30.0  # wall-clock limit of one exec unless the call says otherwise
    max_output_bytes: int = 1_000_000  # cap per stream (stdout, stderr) of one exec; the exec is killed past it
    uid_base: int = 200_000  # first host uid handed to sandboxes when running as root
    uid_count: int = 4096  # size of that uid range (max sandboxes alive on one node)
    uid_lock_dir: str = "/run/matrix_hpc/sandbox_uids"  # node-wide locks of claimed uids (root only; must be private)

    def __post_init__(self) -> None:
        for name in ("mem_mb", "cpu_time_s", "max_procs", "max_file_mb", "max_open_files", "tmp_mb",
                     "sandbox_mem_mb", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox.limits.{name} must be > 0, got {getattr(self, name)}")
        if self.cgroup not in ("auto", "off", "required"):
            raise ValueError(f"sandbox.limits.cgroup={self.cgroup!r} is unknown; choose one of auto, off, required")
        if self.exec_timeout_s <= 0:
            raise ValueError(f"sandbox.limits.exec_timeout_s must be > 0, got {self.exec_timeout_s}")
        if self.uid_base < 1000 or self.uid_count < 1:
            raise ValueError("sandbox.limits.uid_base must be >= 1000 and uid_count >= 1 (unprivileged uids)")


def prlimit_argv(limits: SandboxLimitsConf, *, nproc: bool = True) -> list[str]:
    """``prlimit`` prefix applying the limits to the command after it."""
    mib = 1024 * 1024
    argv = [
        "prlimit",
        f"--as={limits.mem_mb * mib}",
        f"--cpu={limits.cpu_time_s}",
        f"--fsize={limits.max_file_mb * mib}",
        f"--nofile={limits.max_open_files}",
        "--core=0",
    ]
    if nproc:
        argv.append(f"--nproc={limits.max_procs}")
    return argv + ["--"]


def running_as_root() -> bool:
    return os.geteuid() == 0


class UidClaim:
    """One host uid, held (by an open ``flock``) for the life of a sandbox."""

    def __init__(self, uid: int, lock_fd: int) -> None:
        self.uid = uid
        self._fd = lock_fd

    def release(self) -> None:
        kill_uid_processes(self.uid)
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)  # marks the uid clean for the next holder
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def claim_uid(limits: SandboxLimitsConf, lock_dir: Path | None = None) -> UidClaim:
    """Take a free uid from the range; raise with advice when none is free.

    Lock files are opened relative to the checked private ``lock_dir``
    (default ``limits.uid_lock_dir``) without following links, so no one
    can point them at a file of theirs (or of root's) to have it written.
    """
    dir_fd = open_dir(ensure_private_dir(lock_dir or limits.uid_lock_dir))
    try:
        return _claim_free_uid(limits, dir_fd)
    finally:
        os.close(dir_fd)


def _claim_free_uid(limits: SandboxLimitsConf, dir_fd: int) -> UidClaim:
    start = os.getpid() % limits.uid_count  # spread processes over the range
    for i in range(limits.uid_count):
        uid = limits.uid_base + (start + i) % limits.uid_count
        fd = open_lock_file(dir_fd, f"{uid}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if os.fstat(fd).st_size:  # still marked busy: its holder crashed and may have left processes
            kill_uid_processes(uid)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return UidClaim(uid, fd)
    raise RuntimeError(
        f"all {limits.uid_count} sandbox uids from {limits.uid_base} are in use on this node; "
        "raise sandbox.limits.uid_count or lower sandbox.pool.max_per_node"
    )


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
