"""The host-side dirs of sandboxes: ``<scratch root>/<id>/scratch``, made private, removed, swept after a crash.

Each ``<root>/<id>/.lock`` (outside the scratch the sandbox sees) stays
locked for the sandbox's life: the lock dies with the process, so a dir
whose lock is free belongs to a crashed pool and :func:`sweep_stale_dirs`
may delete it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from matrix_hpc.services.sandbox.cgroups import cgroup_parents, remove_cgroup
from matrix_hpc.services.sandbox.safe_path import (
    default_scratch_root,
    ensure_private_dir,
    make_private_subdir,
    open_dir,
    open_dir_at,
    open_lock_file,
)

if TYPE_CHECKING:
    from matrix_hpc.services.sandbox.contract import SandboxConf


def scratch_root_path(conf: SandboxConf) -> Path:
    """The configured scratch root, or this user's private default (not checked here)."""
    return Path(os.path.abspath(conf.scratch_root)) if conf.scratch_root else default_scratch_root()


def make_sandbox_dir(root: Path, sandbox_id: str) -> tuple[int, int]:
    """Create ``<root>/<id>/scratch`` (0700) under a checked private root; returns (lock fd, scratch fd)."""
    # Made under a dot name, locked, then renamed into place: a sweep by another process (which skips dot
    # names and locked dirs) can never see the dir unlocked and delete it under us.
    root_fd = open_dir(ensure_private_dir(root))
    staging = f".new-{sandbox_id}"
    try:
        shutil.rmtree(sandbox_id, dir_fd=root_fd, ignore_errors=True)  # a leftover of a reused id
        shutil.rmtree(staging, dir_fd=root_fd, ignore_errors=True)
        dir_fd = make_private_subdir(root_fd, staging)
        try:
            lock_fd = open_lock_file(dir_fd, ".lock")
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            scratch_fd = make_private_subdir(dir_fd, "scratch")
            os.rename(staging, sandbox_id, src_dir_fd=root_fd, dst_dir_fd=root_fd)
            return lock_fd, scratch_fd
        finally:
            os.close(dir_fd)
    finally:
        os.close(root_fd)


def remove_sandbox_dir(root: Path, sandbox_id: str) -> None:
    """Delete ``<root>/<id>``; rmtree with a dir fd never follows the links that code inside left."""
    with contextlib.suppress(OSError):
        root_fd = open_dir(root)
        try:
            shutil.rmtree(sandbox_id, dir_fd=root_fd, ignore_errors=True)
        finally:
            os.close(root_fd)


def sweep_stale_dirs(root: str | os.PathLike[str]) -> int:
    """Delete sandbox dirs left by crashed processes under ``root`` (a checked private dir); returns how many."""
    root_fd = open_dir(ensure_private_dir(root))
    try:
        stale = [name for name in os.listdir(root_fd) if not name.startswith(".") and _is_stale(root_fd, name)]
        for name in stale:
            shutil.rmtree(name, dir_fd=root_fd, ignore_errors=True)
    finally:
        os.close(root_fd)
    parents = cgroup_parents("auto", None) if stale else None
    for name in stale:
        if parents is not None:
            remove_cgroup(parents, name)
    return len(stale)


def _is_stale(root_fd: int, name: str) -> bool:
    """A sandbox dir whose ``.lock`` no live process holds."""
    try:
        dir_fd = open_dir_at(root_fd, name)
    except OSError:
        return False  # not a dir of ours (or gone): leave it alone
    try:
        lock_fd = os.open(".lock", os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # alive
    finally:
        os.close(lock_fd)
