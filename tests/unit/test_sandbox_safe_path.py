"""safe_path: the scratch root, lock files and file transfer refuse whatever someone else could redirect."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.safe_path import (
    UnsafePathError,
    default_scratch_root,
    ensure_private_dir,
    open_dir,
    open_lock_file,
    read_file_at,
    relative_parts,
    write_file_at,
)

NOBODY = 65534
as_root = pytest.mark.needs("root")  # making a dir of another user needs root


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    fd = open_dir(tmp_path)
    yield fd
    os.close(fd)


def test_a_missing_dir_is_created_private(tmp_path: Path) -> None:
    made = ensure_private_dir(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b"
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        st = os.lstat(d)
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == os.geteuid()
    assert ensure_private_dir(made) == made  # ours already: accepted again


def test_the_default_root_is_per_user_under_tmpdir() -> None:
    root = default_scratch_root()
    assert root.parent.name == f"matrix_hpc-{os.geteuid()}" and root.name == "sandboxes"


def test_a_symlink_as_the_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePathError, match="link: it is a symlink"):
        ensure_private_dir(tmp_path / "link")


def test_a_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(UnsafePathError, match=r"writable by group or others \(mode 777\).*chmod go-w"):
        ensure_private_dir(tmp_path / "open")
    with pytest.raises(UnsafePathError, match="writable by others .* without the sticky bit"):
        ensure_private_dir(tmp_path / "open" / "mine")  # a parent anyone can rename things in
    os.chmod(tmp_path / "open", 0o1777)  # like /tmp: others cannot replace our entries
    assert ensure_private_dir(tmp_path / "open" / "mine").is_dir()


@as_root
def test_a_dir_another_user_made_first_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=r"owned by uid 65534, not by this process.*someone else created it"):
        ensure_private_dir(planted)
    with pytest.raises(UnsafePathError, match="owned by uid 65534, not root or you"):
        ensure_private_dir(planted / "sandboxes")
    (tmp_path / "their-link").symlink_to(tmp_path)
    os.lchown(tmp_path / "their-link", NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="symlink owned by uid 65534"):
        ensure_private_dir(tmp_path / "their-link" / "x")


def test_a_lock_file_never_follows_a_link_nor_truncates(tmp_path: Path, root_fd: int) -> None:
    canary = tmp_path / "canary"
    canary.write_text("precious")
    (tmp_path / "1.lock").symlink_to(canary)
    with pytest.raises(OSError):  # ELOOP: O_NOFOLLOW
        open_lock_file(root_fd, "1.lock")
    os.mkfifo(tmp_path / "2.lock")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        open_lock_file(root_fd, "2.lock")
    (tmp_path / "3.lock").write_text("12\n")
    fd = open_lock_file(root_fd, "3.lock")
    os.close(fd)
    assert (tmp_path / "3.lock").read_text() == "12\n" and canary.read_text() == "precious"


@pytest.mark.parametrize("path, error", [
    ("../x", "contains '..'"), ("a/../../x", "contains '..'"), ("/etc/passwd", "is absolute"),
    ("/scratchy/x", "is absolute"), ("", "names no file"), ("/scratch", "names no file"),
])
def test_paths_that_leave_the_root_are_refused(path: str, error: str) -> None:
    with pytest.raises(UnsafePathError, match=error):
        relative_parts(path, "/scratch")


def test_relative_parts_accepts_the_inside_prefix_and_plain_paths() -> None:
    assert relative_parts("/scratch/a//b/./c.txt", "/scratch") == ["a", "b", "c.txt"]
    assert relative_parts("a/b", "/scratch") == ["a", "b"]


def test_write_and_read_walk_without_following_links(tmp_path: Path, root_fd: int) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret").write_text("outside")
    write_file_at(root_fd, "d/e/f.txt", b"inside", mode=0o640, owner=None)
    assert read_file_at(root_fd, "d/e/f.txt", max_bytes=100) == b"inside"
    assert stat.S_IMODE(os.stat(tmp_path / "d/e/f.txt").st_mode) == 0o640
    (tmp_path / "d" / "out").symlink_to(outside)
    for path in ("d/out/secret", "d/out/new"):
        with pytest.raises(OSError):
            write_file_at(root_fd, path, b"x", mode=0o644, owner=None)
        with pytest.raises(OSError):
            read_file_at(root_fd, path, max_bytes=100)
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "outside"


def test_write_refuses_a_fifo_and_a_hard_link(tmp_path: Path, root_fd: int) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError):  # ENXIO: no reader, and never a blocking open
        write_file_at(root_fd, "pipe", b"x", mode=0o644, owner=None)
    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_file_at(root_fd, "pipe", max_bytes=10)
    (tmp_path / "original").write_text("keep")
    os.link(tmp_path / "original", tmp_path / "alias")
    with pytest.raises(UnsafePathError, match="single link"):
        write_file_at(root_fd, "alias", b"x", mode=0o644, owner=None)
    assert (tmp_path / "original").read_text() == "keep"


@as_root
def test_written_files_and_new_dirs_go_to_the_owner(tmp_path: Path, root_fd: int) -> None:
    write_file_at(root_fd, "p/q.txt", b"1", mode=0o600, owner=(NOBODY, NOBODY))
    assert os.stat(tmp_path / "p").st_uid == NOBODY and os.stat(tmp_path / "p" / "q.txt").st_uid == NOBODY


def test_the_scratch_root_setting_defaults_to_the_private_dir() -> None:
    from matrix_hpc.services.sandbox.scratch import scratch_root_path

    assert scratch_root_path(SandboxConf()) == default_scratch_root()
    assert scratch_root_path(SandboxConf(scratch_root="/data/sb")) == Path("/data/sb")
