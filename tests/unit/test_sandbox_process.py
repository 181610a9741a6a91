"""run_capped (the exec plumbing every backend shares) and the subprocess backend, on real processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest

from matrix_hpc.services.sandbox.code_exec import extract_code, run_code_with_tests
from matrix_hpc.services.sandbox.contract import SandboxConf, SandboxError
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.process import run_capped
from matrix_hpc.services.sandbox.registry import create_sandbox
from matrix_hpc.services.sandbox.scratch import sweep_stale_dirs


async def test_stdout_stderr_exit_code_and_stdin_are_separate() -> None:
    r = await run_capped(["/bin/sh", "-c", "read x; echo out:$x; echo err >&2; exit 3"], stdin=b"hello\n",
                         timeout_s=10, max_output_bytes=1000)
    got = (r.exit_code, r.stdout, r.stderr, r.timed_out, r.output_truncated)
    assert got == (3, "out:hello\n", "err\n", False, False)
    assert not r.ok


async def test_timeout_kills() -> None:
    t0 = time.monotonic()
    r = await run_capped(["sleep", "30"], stdin=None, timeout_s=0.3, max_output_bytes=100)
    assert r.timed_out and r.exit_code == -9 and time.monotonic() - t0 < 5


async def test_output_cap_truncates_and_kills() -> None:
    r = await run_capped(["yes"], stdin=None, timeout_s=20, max_output_bytes=5000)
    assert r.output_truncated and len(r.stdout) == 5000 and r.exit_code == -9 and not r.timed_out


async def test_background_children_in_the_group_are_killed() -> None:
    marker = f"mhpc-bg-{os.getpid()}"
    r = await run_capped(["/bin/sh", "-c", f"sleep 300 {marker} 2>/dev/null & exec sh -c 'echo started'"],
                         stdin=None, timeout_s=10, max_output_bytes=100)
    assert r.stdout == "started\n"
    await asyncio.sleep(0.2)
    assert not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


async def test_subprocess_backend_runs_in_scratch_with_limits(tmp_path: Path) -> None:
    conf = SandboxConf(backend="trusted_subprocess", scratch_root=str(tmp_path),
                       limits=SandboxLimitsConf(mem_mb=256, exec_timeout_s=10))
    sb = create_sandbox(conf, "t1")
    await sb.start()
    try:
        await sb.put_file("data/in.txt", "abc\n")
        r = await sb.exec("cat data/in.txt; pwd; echo $HOME")
        assert r.stdout.splitlines() == ["abc", str(sb.scratch), str(sb.scratch)]
        r = await sb.exec(["python3", "-c", "x = bytearray(1024 ** 3)"])
        assert r.exit_code != 0 and "MemoryError" in r.stderr
        with pytest.raises(SandboxError, match="contains '..'; use a path without it"):
            await sb.get_file("../../etc/passwd")
        with pytest.raises(SandboxError, match="is absolute and not under /scratch"):
            await sb.get_file("/etc/passwd")
        os.symlink("/etc/passwd", sb.scratch / "link")
        with pytest.raises(SandboxError, match="a symlink or a non-directory is on the path"):
            await sb.get_file("link")
    finally:
        await sb.stop()
    assert not sb.dir.exists()
    with pytest.raises(SandboxError, match="not running"):
        await sb.exec("true")


async def test_code_with_tests_pass_fail_timeout(tmp_path: Path) -> None:
    sb = create_sandbox(SandboxConf(backend="trusted_subprocess", scratch_root=str(tmp_path)), "code")
    await sb.start()
    try:
        code = "```python\ndef add(a, b):\n    return a + b\n```"
        ok = await run_code_with_tests(sb, extract_code(code), "assert add(2, 3) == 5\nprint('tests ok')")
        assert ok.passed and ok.stdout == "tests ok\n"
        bad = await run_code_with_tests(sb, "def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5")
        assert not bad.passed and "AssertionError" in bad.stderr and bad.summary().startswith("FAILED (exit 1)")
        slow = await run_code_with_tests(sb, "while True: pass", "", timeout_s=0.5)
        assert not slow.passed and slow.timed_out and slow.summary().startswith("TIMED OUT")
        mod = await run_code_with_tests(sb, "X = 1", "from solution import X\nassert X == 1", mode="module")
        assert mod.passed
    finally:
        await sb.stop()


def test_extract_code() -> None:
    assert extract_code("Here:\n```py\nprint(1)\n```\nthanks") == "print(1)\n"
    assert extract_code("print(2)") == "print(2)"


async def test_dirs_of_crashed_pools_are_swept_live_ones_kept(tmp_path: Path) -> None:
    conf = SandboxConf(backend="trusted_subprocess", scratch_root=str(tmp_path))
    live = create_sandbox(conf, "live")
    await live.start()
    crashed = tmp_path / "crashed"
    (crashed / "scratch").mkdir(parents=True)
    (crashed / ".lock").touch()  # nobody holds it: its process died
    assert sweep_stale_dirs(str(tmp_path)) == 1
    assert not crashed.exists() and live.scratch.exists()
    await live.stop()


@pytest.mark.needs("root")  # per-sandbox uids are used only when running as root
def test_a_crashed_holders_uid_is_cleaned_before_reuse(tmp_path: Path) -> None:
    import subprocess

    from matrix_hpc.services.sandbox.uids import claim_uid

    limits = SandboxLimitsConf(uid_base=299_000, uid_count=1)
    claim = claim_uid(limits, tmp_path)
    orphan = subprocess.Popen(["sleep", "300"], user=claim.uid, group=claim.uid, extra_groups=[])
    os.close(claim._fd)  # the holder dies without releasing: lock freed, file still marked busy
    again = claim_uid(limits, tmp_path)
    assert again.uid == claim.uid
    assert orphan.wait(timeout=5) == -9  # the leftover was killed before the uid was handed out
    with pytest.raises(RuntimeError, match="raise sandbox.limits.uid_count"):
        claim_uid(limits, tmp_path)  # the only uid is taken
    again.release()


async def test_trusted_subprocess_gets_a_minimal_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "canary-host-key")
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    conf = SandboxConf(backend="trusted_subprocess", scratch_root=str(tmp_path), env={"MINE": "configured"})
    sb = create_sandbox(conf, "env")
    await sb.start()
    try:
        r = await sb.exec("env")
        env = dict(line.split("=", 1) for line in r.stdout.splitlines())
        assert "OPENAI_API_KEY" not in env and "LD_PRELOAD" not in env and "canary-host-key" not in r.stdout
        assert env["MINE"] == "configured" and env["HOME"] == str(sb.scratch)
        assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "SANDBOX_SCRATCH", "PYTHONUNBUFFERED", "MINE", "PWD",
                            "SHLVL", "_"}
        r = await sb.exec(["python3", "-c", "import pyarrow, sys; print(sys.prefix)"])  # this venv's python is on PATH
        assert r.ok, r
    finally:
        await sb.stop()
