"""Escape suite: what untrusted code tries inside a bwrap sandbox is refused or contained.

Each test runs real bubblewrap and checks the host afterwards: no file
written, nothing read, no connection accepted, no process left over.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from matrix_hpc.services.sandbox.contract import Sandbox, SandboxConf
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.registry import create_sandbox
from tests.conftest import REPO_ROOT
from tests.integration.sandbox_support import processes_matching, processes_of_uid

pytestmark = [pytest.mark.integration, pytest.mark.needs("bwrap")]

LIMITS = SandboxLimitsConf(mem_mb=256, cpu_time_s=2, max_procs=32, max_file_mb=4, tmp_mb=16, exec_timeout_s=10,
                           max_output_bytes=64 * 1024)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    conf = SandboxConf(backend="bwrap", scratch_root=str(tmp_path / "sandboxes"), limits=LIMITS)
    sb = create_sandbox(conf, f"escape-{uuid.uuid4().hex[:6]}")
    await sb.start()
    uid = getattr(sb, "host_uid", None)
    try:
        yield sb
    finally:
        await sb.stop()
    # host unchanged: nothing of this sandbox still runs, its scratch dir is gone
    assert not processes_matching(str(sb.scratch))
    if uid is not None:
        assert not processes_of_uid(uid)
    assert not sb.dir.exists()


async def still_works(sb: Sandbox) -> None:
    r = await sb.exec("echo alive")
    assert r.ok and r.stdout == "alive\n", r


async def test_host_files_outside_the_binds_are_invisible(sandbox: Sandbox) -> None:
    secret = Path("/root") / f"mhpc-secret-{uuid.uuid4().hex}"
    secret.write_text("TOP-SECRET")
    try:
        targets = [secret, REPO_ROOT / "pyproject.toml", Path("/etc/shadow"), Path("/etc/hostname"),
                   REPO_ROOT / ".git" / "HEAD"]
        for target in targets:
            r = await sandbox.exec(["python3", "-c", f"print(open({str(target)!r}).read())"])
            assert r.exit_code != 0 and "TOP-SECRET" not in r.stdout, (target, r)
            assert "FileNotFoundError" in r.stderr or "PermissionError" in r.stderr, r.stderr
        r = await sandbox.exec("ls -a /root /home 2>&1; ls /work/main 2>&1; cat /proc/1/cmdline")
        assert secret.name not in r.stdout and "pyproject.toml" not in r.stdout
        assert "systemd" not in r.stdout and "init" not in r.stdout.split("\n")[-1]
    finally:
        secret.unlink()


async def test_writes_outside_scratch_fail_and_tmp_is_private(sandbox: Sandbox) -> None:
    name = f"mhpc-escape-{uuid.uuid4().hex[:8]}"
    outside = [f"/usr/{name}", f"/etc/{name}", f"/{name}", f"/root/{name}", f"/scratch/../{name}",
               str(REPO_ROOT / name), f"{sandbox.dir}/{name}"]
    for path in outside:
        r = await sandbox.exec(["python3", "-c", f"open({path!r}, 'w').write('x')"])
        assert r.exit_code != 0, (path, r)
    r = await sandbox.exec(f"echo x > /tmp/{name} && echo x > /scratch/{name} && echo ok")
    assert r.stdout == "ok\n", r
    for path in outside + [f"/tmp/{name}"]:
        assert not await asyncio.to_thread(os.path.exists, path), path
    assert (sandbox.scratch / name).read_text() == "x\n"  # scratch is the one writable host path


async def test_no_tcp_to_a_server_on_host_loopback(sandbox: Sandbox) -> None:
    accepted: list[object] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(on_connect, "0.0.0.0", 0)  # loopback and the host's address
    port = server.sockets[0].getsockname()[1]
    try:
        addrs = {"127.0.0.1", socket.gethostbyname(socket.gethostname())}
    except OSError:  # no resolvable host name: loopback alone
        addrs = {"127.0.0.1"}
    try:
        for addr in sorted(addrs):
            code = f"import socket; s = socket.create_connection(({addr!r}, {port}), timeout=3); print('CONNECTED')"
            r = await sandbox.exec(["python3", "-c", code])
            assert r.exit_code != 0 and "CONNECTED" not in r.stdout, (addr, r)
        r = await sandbox.exec(["python3", "-c", "import socket; print(socket.getaddrinfo('pypi.org', 443))"])
        assert r.exit_code != 0  # no DNS, no route
        await asyncio.sleep(0.2)
        assert accepted == []
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # control: the host itself gets through
        writer.close()
        await asyncio.sleep(0.1)
        assert len(accepted) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    r = await sandbox.exec("bomb() { bomb | bomb & }; bomb; sleep 2; echo survived", timeout_s=8)
    assert time.monotonic() - t0 < 15
    r = await sandbox.exec(["python3", "-c", "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                            "            import time; time.sleep(30)\n        n += 1\nexcept OSError as e:\n"
                            "    print('refused after', n, type(e).__name__)\n"], timeout_s=20)
    assert "refused after" in r.stdout, r
    assert int(r.stdout.split()[2]) < LIMITS.max_procs
    await still_works(sandbox)  # the bomb's processes died with the exec


async def test_memory_beyond_the_limit_is_refused(sandbox: Sandbox) -> None:
    r = await sandbox.exec(["python3", "-c", "x = bytearray(1024 * 1024 * 1024); print('ALLOCATED')"])
    assert r.exit_code != 0 and "ALLOCATED" not in r.stdout and "MemoryError" in r.stderr, r
    r = await sandbox.exec(["python3", "-c", "x = bytearray(64 * 1024 * 1024); print(len(x))"])
    assert r.ok and r.stdout == f"{64 * 1024 * 1024}\n"  # within the limit works


async def test_running_past_the_time_limits_is_stopped(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    r = await sandbox.exec("sleep 60", timeout_s=1)
    assert r.timed_out and r.exit_code == -9 and time.monotonic() - t0 < 5
    t0 = time.monotonic()
    r = await sandbox.exec(["python3", "-c", "while True: pass"], timeout_s=30)  # CPU limit: 2 s
    # SIGKILL/SIGXCPU; bwrap's PID 1 reports a signal death as 128 + signal
    assert not r.timed_out and r.exit_code in (-9, -24, 137, 152) and time.monotonic() - t0 < 15, r


async def test_output_beyond_the_cap_is_cut_and_stopped(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    r = await sandbox.exec("yes escape; echo NOT-REACHED >&2")
    assert r.output_truncated and len(r.stdout) == LIMITS.max_output_bytes and time.monotonic() - t0 < 5
    r = await sandbox.exec(["python3", "-c", "open('big', 'wb').write(b'x' * (8 * 1024 * 1024))"])
    assert r.exit_code != 0  # RLIMIT_FSIZE: 4 MiB
    assert (sandbox.scratch / "big").stat().st_size <= LIMITS.max_file_mb * 1024 * 1024
    # /tmp is a tmpfs (host memory): capped in total, not just per file
    r = await sandbox.exec("for i in $(seq 20); do head -c 4000000 /dev/zero > /tmp/f$i || exit 7; done")
    assert r.exit_code == 7 and "No space left" in r.stderr, r


async def test_background_processes_do_not_outlive_their_exec(sandbox: Sandbox) -> None:
    marker = f"mhpc{uuid.uuid4().hex[:10]}"
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        time.sleep(300)  # {marker}\n    os._exit(0)\nprint('detached')\n")
    await sandbox.put_file("daemon.py", daemon)
    r = await sandbox.exec(f"(sleep 300 {marker} &) ; nohup sleep 301 {marker} >/dev/null 2>&1 & "
                           f"setsid sleep 302 {marker} & python3 daemon.py {marker}; echo returned")
    assert r.stdout.endswith("returned\n"), r
    await asyncio.sleep(0.3)
    assert not processes_matching(marker)
    r = await sandbox.exec(f"ps -eo args | grep -c '[{marker[0]}]{marker[1:]}' || true")
    assert r.stdout.strip() == "0", r  # not even inside the sandbox


async def test_no_privilege_inside(sandbox: Sandbox) -> None:
    r = await sandbox.exec("id -u; grep -E 'CapEff|NoNewPrivs' /proc/self/status; kill -9 1 2>&1; echo done")
    lines = r.stdout.split("\n")
    assert lines[0] != "0"
    assert "CapEff:\t0000000000000000" in r.stdout and "NoNewPrivs:\t1" in r.stdout
    r = await sandbox.exec(f"kill -9 {os.getpid()} 2>&1; echo $?")  # the host test process
    assert r.stdout.strip().endswith("1")  # no such process in the sandbox's PID namespace
    await still_works(sandbox)


async def test_unprivileged_mode_contains_a_fork_bomb_and_has_no_network() -> None:
    """The path non-root users get: bwrap makes a user namespace, the process limit is set inside it.

    As root we drop to ``nobody`` first to take that path for real.
    """
    import shutil
    import tempfile

    from matrix_hpc.services.sandbox.bwrap import bwrap_argv, env_args_fd, sandbox_env
    from matrix_hpc.services.sandbox.limits import prlimit_argv
    from matrix_hpc.services.sandbox.process import ExecResult, run_capped

    conf = SandboxConf(backend="bwrap", bind_python=False, limits=LIMITS)
    root = Path(tempfile.mkdtemp(prefix="mhpc-unpriv-", dir="/tmp"))
    scratch = root / "scratch"
    scratch.mkdir()
    os.chmod(root, 0o755)
    drop: list[str] = []
    if os.geteuid() == 0:
        os.chown(scratch, 65534, 65534)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    marker = f"unpriv{uuid.uuid4().hex[:8]}"
    try:
        async def run(script: str, timeout_s: float) -> ExecResult:
            with env_args_fd(sandbox_env(conf, {})) as env_fd:
                inner = bwrap_argv(conf, scratch, env_fd, "/scratch", host_uid=None)
                argv = drop + prlimit_argv(conf.limits, nproc=False) + inner + ["/bin/sh", "-c", script]
                return await run_capped(argv, stdin=None, timeout_s=timeout_s, max_output_bytes=10000,
                                        pass_fds=(env_fd,))

        r = await run("id -u; grep CapEff /proc/self/status; echo hi > /scratch/f; cat /scratch/f", 20)
        assert r.exit_code == 0 and r.stdout.startswith("1000\n") and r.stdout.endswith("hi\n"), r
        r = await run(f"bomb() {{ bomb | bomb & }}; bomb; sleep 2 # {marker}", 8)
        assert not processes_matching(marker)
        r = await run("for i in $(seq 60); do sleep 5 & done 2>&1; echo spawned", 20)
        assert "fork" in (r.stdout + r.stderr).lower() or r.exit_code != 0, r  # RLIMIT_NPROC=32 inside the userns
        r = await run("cat /proc/net/dev", 20)
        interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines() if ":" in line]
        assert interfaces == ["lo"], r  # a network namespace of its own: loopback only
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cgroups_here() -> bool:
    from matrix_hpc.services.sandbox.cgroups import find_parents

    return find_parents() is not None


async def test_memory_of_many_processes_is_bounded_by_the_sandbox_cgroup(tmp_path: Path) -> None:
    """rlimits bound each process; the per-sandbox cgroup bounds them together."""
    if not cgroups_here():
        pytest.skip("no writable cgroup (v1 as root or delegated v2) here: sandboxes rely on rlimits alone")
    limits = SandboxLimitsConf(mem_mb=512, sandbox_mem_mb=300, max_procs=32, exec_timeout_s=60)
    sb = create_sandbox(SandboxConf(backend="bwrap", scratch_root=str(tmp_path / "sb"), limits=limits), "cgmem")
    await sb.start()
    try:
        assert sb.cgroup is not None
        code = ("import os, time\nkids = []\nfor i in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
                "        b = b'x' * (200 * 1024 * 1024)\n        time.sleep(3)\n        os._exit(0)\n"
                "    kids.append(pid)\n"
                "print([os.waitpid(k, 0)[1] for k in kids])\n")
        r = await sb.exec(["python3", "-c", code])
        statuses = [] if r.exit_code else eval(r.stdout)  # noqa: S307 - our own list of ints
        killed = [s for s in statuses if os.WIFSIGNALED(s) and os.WTERMSIG(s) == 9]
        assert r.exit_code != 0 or killed, r  # the OOM killer acted inside the sandbox only
        peak = sb.cgroup.peak_mem_bytes()
        assert peak is None or peak <= 300 * 1024 * 1024 + 4096
        await still_works(sb)
    finally:
        await sb.stop()


async def test_trusted_subprocess_backend_still_bounds_processes_with_a_cgroup(tmp_path: Path) -> None:
    if not cgroups_here():
        pytest.skip("no writable cgroup here")
    limits = SandboxLimitsConf(max_procs=16, exec_timeout_s=20)
    conf = SandboxConf(backend="trusted_subprocess", scratch_root=str(tmp_path / "sb"), limits=limits)
    sb = create_sandbox(conf, "cgpids")
    await sb.start()
    try:
        code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(5)\n"
                "            os._exit(0)\n        n += 1\nexcept OSError:\n    print('refused after', n)\n")
        r = await sb.exec(["python3", "-c", code])
        assert "refused after" in r.stdout and int(r.stdout.split()[-1]) < 16, r  # root, yet bounded: pids.max
    finally:
        await sb.stop()
    assert sb.cgroup is None
