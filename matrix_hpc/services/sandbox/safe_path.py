"""Paths that neither another local user nor code inside a sandbox can redirect.

Two attackers shape every function here:

- another user of the node, who can create names in world-writable dirs
  (``/tmp``) before we do, e.g. a would-be scratch root full of symlinks;
- code inside a sandbox, which owns its scratch dir and can swap any entry
  in it (a dir for a symlink) between two system calls of the host.

So the scratch root is a dir that we own and nobody else can write, reached
through dirs that only root or we can change (:func:`ensure_private_dir`);
files in it are opened relative to a directory fd, one component at a time,
never following a symlink (``O_NOFOLLOW`` at every step), and ownership and
mode are changed on the open fd (``fchown`` / ``fchmod``), never by path.

Example::

    root = ensure_private_dir(default_scratch_root())
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    write_file_at(fd, "job/in.txt", b"data", mode=0o644, owner=None)
    assert read_file_at(fd, "job/in.txt", max_bytes=1024) == b"data"
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TRUSTED_OWNERS_HINT = "root or you"


class UnsafePathError(PermissionError):
    """A path could be redirected by someone else (wrong owner, writable by others, a symlink, ``..``)."""


def default_scratch_root() -> Path:
    """``$TMPDIR/matrix_hpc-<uid>/sandboxes``: one private dir per user and node (TMPDIR, else /tmp)."""
    return Path(tempfile.gettempdir()) / f"matrix_hpc-{os.geteuid()}" / "sandboxes"


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create (mode 0700) or accept ``path`` only if no one but us (and root) can change what it names.

    Every existing ancestor must be a dir owned by root or us and not
    writable by others unless sticky (``/tmp``), symlinks on the way must be
    owned by root or us, and the dir itself must be ours, not a symlink and
    not writable by group or others. Missing dirs are created 0700.
    Raises :class:`UnsafePathError` naming the offending component.
    """
    target = Path(os.path.abspath(path))
    uid = os.geteuid()
    current = Path("/")
    names = target.parts[1:]
    for i, name in enumerate(names):
        current = _step(current / name, uid, last=i == len(names) - 1)
    return target


def _step(candidate: Path, uid: int, *, last: bool) -> Path:
    """Check (creating when missing) one component; returns the real dir to continue from."""
    try:
        st = os.lstat(candidate)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):  # a racing creator is judged by the checks below
            os.mkdir(candidate, 0o700)
        st = os.lstat(candidate)
    if stat.S_ISLNK(st.st_mode):
        if last:
            raise _unsafe(candidate, "is a symlink", "point the setting at the real directory")
        if st.st_uid not in (0, uid):
            raise _unsafe(candidate, f"is a symlink owned by uid {st.st_uid}, not {_TRUSTED_OWNERS_HINT}")
        real = Path(os.path.realpath(candidate))
        _check_real_chain(real, uid)
        return real
    if last:
        _check_private(candidate, st, uid)
    else:
        _check_trusted(candidate, st, uid)
    return candidate


def _check_real_chain(real: Path, uid: int) -> None:
    """A symlink's target, which has no symlinks left: each component trusted."""
    current = Path("/")
    for name in real.parts[1:]:
        current = current / name
        _check_trusted(current, os.lstat(current), uid)


def _check_trusted(path: Path, st: os.stat_result, uid: int) -> None:
    """An ancestor: only root or we may change which entries it holds."""
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, "is not a directory")
    if st.st_uid not in (0, uid):
        raise _unsafe(path, f"is owned by uid {st.st_uid}, not {_TRUSTED_OWNERS_HINT}")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _unsafe(path, f"is writable by others (mode {stat.S_IMODE(st.st_mode):o}) without the sticky bit")


def _check_private(path: Path, st: os.stat_result, uid: int) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, "is not a directory")
    if st.st_uid != uid:
        raise _unsafe(path, f"is owned by uid {st.st_uid}, not by this process (uid {uid}); someone else "
                            "created it first", "remove it or choose another sandbox.scratch_root")
    if st.st_mode & 0o022:
        raise _unsafe(path, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                      f"run `chmod go-w {path}` or choose another sandbox.scratch_root")


def _unsafe(path: Path, problem: str, advice: str = "choose another sandbox.scratch_root") -> UnsafePathError:
    return UnsafePathError(f"refusing {path}: it {problem}, so another user could redirect sandbox files; {advice}")


def open_dir(path: str | os.PathLike[str]) -> int:
    """An fd of the dir ``path`` itself (not a symlink to one)."""
    return os.open(path, _DIR_FLAGS)


def open_lock_file(dir_fd: int, name: str) -> int:
    """Open (creating, never truncating) lock file ``name`` in ``dir_fd``; it must be a regular file of ours."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        _require_own_regular(fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_own_regular(fd: int, name: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise UnsafePathError(f"refusing lock file {name!r}: not a regular file owned by uid {os.geteuid()} "
                              f"(mode {st.st_mode:o}, owner {st.st_uid}); remove it")


def relative_parts(path: str, inside_prefix: str = "") -> list[str]:
    """Components of ``path`` below a root; ``inside_prefix`` (e.g. ``/scratch``) may lead it.

    Refuses ``..``, other absolute paths and an empty path: nothing here may
    name a file outside the root.
    """
    rel = path
    if inside_prefix and (path == inside_prefix or path.startswith(inside_prefix + "/")):
        rel = path[len(inside_prefix):]
    elif path.startswith("/"):
        raise UnsafePathError(f"path {path!r} is absolute and not under {inside_prefix or 'the root'}; "
                              "use a path relative to it")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"path {path!r} contains '..'; use a path without it")
    if not parts:
        raise UnsafePathError(f"path {path!r} names no file; give a file name")
    return parts


@contextlib.contextmanager
def opened_parent(root_fd: int, parts: list[str], *, create: bool,
                  owner: tuple[int, int] | None = None) -> Iterator[int]:
    """The fd of the dir holding ``parts[-1]``, walked from ``root_fd`` without following any symlink.

    With ``create``, missing dirs are made (0755) and given to ``owner``.
    """
    fd = os.dup(root_fd)
    try:
        for name in parts[:-1]:
            next_fd = _open_child_dir(fd, name, create=create, owner=owner)
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def _open_child_dir(parent_fd: int, name: str, *, create: bool, owner: tuple[int, int] | None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # made concurrently: the O_NOFOLLOW open below judges it
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    if owner is not None:
        os.fchown(fd, *owner)
    return fd


def write_file_at(root_fd: int, parts: list[str] | str, data: bytes, *, mode: int,
                  owner: tuple[int, int] | None) -> None:
    """Write ``data`` to a regular file below ``root_fd`` (created or replaced in place), then chmod/chown it.

    Refuses a symlink anywhere on the path and an existing file that is not
    a regular file with one link (a FIFO would block us; a hard link would
    write through to another name).
    """
    parts = relative_parts(parts) if isinstance(parts, str) else parts
    with opened_parent(root_fd, parts, create=True, owner=owner) as parent:
        fd = _open_for_write(parent, parts[-1], mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)


def _open_for_write(parent_fd: int, name: str, mode: int) -> int:
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(name, flags | os.O_CREAT | os.O_EXCL, mode & 0o777, dir_fd=parent_fd)
    except FileExistsError:
        fd = os.open(name, flags, dir_fd=parent_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # 0 links: removed meanwhile, harmless to write
        os.close(fd)
        raise UnsafePathError(f"refusing to overwrite {name!r}: not a regular file with a single link")
    os.ftruncate(fd, 0)
    return fd


def read_file_at(root_fd: int, parts: list[str] | str, *, max_bytes: int) -> bytes:
    """Read at most ``max_bytes + 1`` bytes of a regular file below ``root_fd``, following no symlink."""
    parts = relative_parts(parts) if isinstance(parts, str) else parts
    with opened_parent(root_fd, parts, create=False) as parent:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePathError(f"refusing to read {parts[-1]!r}: not a regular file")
            return f.read(max_bytes + 1)


def make_private_subdir(parent_fd: int, name: str) -> int:
    """Create ``name`` (0700) in ``parent_fd``, which must not exist yet; returns its fd."""
    os.mkdir(name, 0o700, dir_fd=parent_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def open_dir_at(parent_fd: int, name: str) -> int:
    """An fd of the dir ``name`` in ``parent_fd`` (refused when it is a symlink)."""
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
