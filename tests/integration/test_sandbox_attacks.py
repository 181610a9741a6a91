"""Attacks on the sandbox pool from outside it (another local user) and from inside it, with real bubblewrap.

- Another user (uid nobody, for real: a process dropped with setpriv)
  creates the pool's would-be scratch root first and points its lock-file
  names at a root-owned file: the pool refuses the dir and the file is
  untouched.
- Code inside a sandbox swaps a dir of its scratch for a symlink to a
  root-owned dir outside, in a tight loop, while the host does put_file /
  get_file through it: nothing outside is written or read.
- A canary secret in ``sandbox.env`` reaches the sandboxed command but no
  process's command line (``/proc/*/cmdline``, world-readable) and no log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from matrix_hpc.services.sandbox.client import make_sandbox_pool
from matrix_hpc.services.sandbox.contract import Sandbox, SandboxConf, SandboxError
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.services.sandbox.registry import create_sandbox
from matrix_hpc.services.sandbox.safe_path import UnsafePathError
from tests.integration.sandbox_support import processes_matching

pytestmark = [pytest.mark.integration, pytest.mark.needs("bwrap")]

NOBODY = 65534
RACE_S = 4.0  # how long the host transfers files while the sandbox swaps (the old code leaked within 1 s)
UID_BASE, UID_COUNT = 297_000, 8  # a small range, so that every lock-file name can be planted
LIMITS = SandboxLimitsConf(mem_mb=512, cpu_time_s=30, max_procs=32, tmp_mb=16, exec_timeout_s=20,
                           uid_base=UID_BASE, uid_count=UID_COUNT)


def as_nobody(script: str) -> None:
    """Run a shell script as uid/gid nobody with no supplementary groups: another local user."""
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/bin/sh", "-ec", script]
    done = subprocess.run(drop, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A stand-in for /tmp (root-owned, mode 1777) that every user can create names in."""
    path = Path(tempfile.mkdtemp(prefix="mhpc-shared-tmp-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A root-owned 0600 file that must come out of every test byte for byte, its mtime unchanged."""
    path = tmp_path / "canary"
    path.write_bytes(b"CANARY-" * 100)
    os.chmod(path, 0o600)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    yield path
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def plant_lock_links(root: Path, canary: Path) -> None:
    """As nobody: ``<root>/.uids/<uid>.lock`` -> canary for every uid of the range (the issue's attack)."""
    links = " ".join(f"ln -s {canary} {root}/.uids/{uid}.lock;" for uid in range(UID_BASE, UID_BASE + UID_COUNT))
    as_nobody(f"mkdir -p {root}/.uids; chmod 0777 {root} {root}/.uids; {links}")


@pytest.mark.needs("root")
async def test_a_scratch_root_another_user_created_first_is_refused(
        shared_tmp: Path, canary: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))  # the default root goes under our stand-in /tmp
    would_be = shared_tmp / f"matrix_hpc-{os.geteuid()}" / "sandboxes"
    plant_lock_links(would_be, canary)
    conf = SandboxConf(backend="bwrap", limits=LIMITS, pool=SandboxPoolConf(mode="local"))
    with pytest.raises(UnsafePathError, match=r"matrix_hpc-0: it is owned by uid 65534, not root or you"):
        pool = make_sandbox_pool(conf)
        async with pool.lease("victim") as sb:
            await sb.exec("true")
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        await create_sandbox(conf, "direct").start()  # without the pool, the same check
    assert sorted(os.listdir(would_be)) == [".uids"]  # nothing of ours went in there


@pytest.mark.needs("root")
async def test_a_configured_root_or_uid_lock_dir_of_another_user_is_refused(
        shared_tmp: Path, canary: Path, tmp_path: Path) -> None:
    theirs = shared_tmp / "theirs"
    plant_lock_links(theirs, canary)
    conf = SandboxConf(backend="bwrap", limits=LIMITS, scratch_root=str(theirs))
    with pytest.raises(UnsafePathError, match=r"theirs: it is owned by uid 65534, not by this process"):
        await create_sandbox(conf, "configured").start()
    limits = SandboxLimitsConf(**{**LIMITS.__dict__, "uid_lock_dir": str(theirs / ".uids")})
    sb = create_sandbox(SandboxConf(backend="bwrap", limits=limits, scratch_root=str(tmp_path / "sb")), "locks")
    with pytest.raises(UnsafePathError, match=r"theirs: it is owned by uid 65534, not root or you"):
        await sb.start()
    assert not sb.started and not (tmp_path / "sb" / "locks").exists()


@pytest.mark.needs("root")
async def test_the_default_root_is_private_and_the_uid_locks_are_ours(
        shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    as_nobody(f"mkdir {shared_tmp}/matrix_hpc-{NOBODY}")  # another user's own private dir is no obstacle
    pool = make_sandbox_pool(SandboxConf(backend="bwrap", limits=LIMITS, pool=SandboxPoolConf(mode="local")))
    try:
        async with pool.lease("ok") as sb:
            assert (await sb.exec("echo fine")).stdout == "fine\n"
            root = shared_tmp / f"matrix_hpc-{os.geteuid()}"
            for d in (root, root / "sandboxes", root / "sandboxes" / sb.id):
                st = d.lstat()
                assert st.st_uid == 0 and st.st_mode & 0o077 == 0, d
            lock_dir = os.lstat(LIMITS.uid_lock_dir)
            assert lock_dir.st_uid == 0 and lock_dir.st_mode & 0o077 == 0
            assert not [n for n in os.listdir(LIMITS.uid_lock_dir)
                        if stat.S_ISLNK(os.lstat(f"{LIMITS.uid_lock_dir}/{n}").st_mode)]
    finally:
        await pool.close()


SWAPPER = """
import os, shutil
os.chdir("/scratch")


def restore():  # d is the real dir again, whatever the host did meanwhile
    if os.path.islink("d"):
        os.unlink("d")
    elif os.path.isdir("d") and os.path.isdir("real"):
        shutil.rmtree("d")  # a fresh d the host made while the real one was away
    if os.path.isdir("real"):
        os.rename("real", "d")


while True:  # d is a real dir, then for a moment a symlink to the host dir outside
    try:
        os.rename("d", "real")
        os.symlink({outside!r}, "d")
    except OSError:
        pass
    try:
        restore()
    except OSError:
        pass
"""


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in root.rglob("*")}


@pytest.fixture
async def sandbox(tmp_path: Path) -> Sandbox:
    sb = create_sandbox(SandboxConf(backend="bwrap", scratch_root=str(tmp_path / "sb"), limits=LIMITS),
                        f"swap-{uuid.uuid4().hex[:6]}")
    await sb.start()
    yield sb  # type: ignore[misc]
    await sb.stop()


async def test_a_dir_swapped_for_a_symlink_mid_transfer_never_leads_outside(tmp_path: Path, sandbox: Sandbox) -> None:
    outside = tmp_path / "outside"  # root's (the pool user's) dir outside the scratch
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_text("OUTSIDE-SECRET")
    before = snapshot(outside)
    await sandbox.put_file("d/secret.txt", "inside")
    await sandbox.start_server(["python3", "-c", SWAPPER.format(outside=str(outside))], name="swapper")
    ok = refused = met_symlink = i = 0
    deadline = time.monotonic() + RACE_S
    while time.monotonic() < deadline:
        i += 1
        for op in (sandbox.put_file(f"d/w{i % 7}.txt", "written"), sandbox.put_file("d/sub/n.txt", "new"),
                   sandbox.get_file("d/secret.txt")):
            try:
                got = await op
            except SandboxError as e:  # refused: a symlink on the path, or d away mid-swap
                refused += 1
                met_symlink += "symlink" in str(e)
            else:
                assert got in (None, b"inside"), got  # never the file outside
                ok += 1
    assert met_symlink > 0 and ok > 0, (ok, refused, met_symlink)  # the race was on: both states were met
    assert snapshot(outside) == before  # nothing written, created or changed outside


async def test_env_secrets_reach_the_sandbox_but_no_command_line_nor_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"canary-{uuid.uuid4().hex}"
    conf = SandboxConf(backend="bwrap", scratch_root=str(tmp_path / "sb"), limits=LIMITS, env={"HF_TOKEN": secret})
    sb = create_sandbox(conf, "secret")
    await sb.start()
    try:
        await sb.start_server(["sleep", "30"], name="idle")
        running = asyncio.ensure_future(sb.exec('echo "$HF_TOKEN $CALL_TOKEN" > /scratch/seen; sleep 3',
                                                env={"CALL_TOKEN": secret + "-call"}))
        seen_running = 0
        while not running.done():
            seen_running += len(processes_matching(str(sb.scratch)))  # the scan ran while the sandbox did
            assert not cmdlines_containing(secret)
            await asyncio.sleep(0.05)
        assert (await running).ok and seen_running > 0
        assert await sb.get_file("seen") == f"{secret} {secret}-call\n".encode()  # delivered all the same
        assert secret not in repr(sb.conf)
    finally:
        await sb.stop()
    assert secret not in caplog.text


def cmdlines_containing(text: str) -> list[int]:
    """Pids whose /proc/<pid>/cmdline (readable by every user) holds ``text``."""
    needle, found = text.encode(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass  # gone meanwhile
    return found
