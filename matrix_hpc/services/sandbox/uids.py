"""The host uid of each sandbox when the pool runs as root, claimed node-wide with ``flock``.

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
from pathlib import Path

from matrix_hpc.procs import kill_uid_processes
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.safe_path import ensure_private_dir, open_dir, open_lock_file


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
