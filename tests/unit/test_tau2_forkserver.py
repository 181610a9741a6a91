"""The warm tau2 fork server: its control protocol, and EnvSessions' fork mode (trusted_subprocess sandboxes).

The bubblewrap path at scale is tests/integration/test_workflow_tau2_scale.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from matrix_hpc.services.sandbox.client import make_sandbox_pool
from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.services.sandbox.scratch import make_sandbox_dir
from matrix_hpc.workflows.tau2.sessions import EnvServerError, EnvSessions
from matrix_hpc.workflows.tau2.tasks import load_tasks

pytestmark = pytest.mark.needs("tau2_data")


@pytest.fixture
def zygote() -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "matrix_hpc.workflows.tau2.forkserver", "--domain", "retail",
                             "--control-fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    theirs.close()
    ours.settimeout(60)
    yield proc, ours
    ours.close()
    proc.wait(timeout=30)


def control(sock: socket.socket, payload: dict[str, object], fds: list[int] | None = None) -> dict[str, object]:
    socket.send_fds(sock, [json.dumps(payload).encode()], fds or [])
    answer: dict[str, object] = json.loads(sock.recv(65536))
    return answer


def line(conn: socket.socket, payload: dict[str, object]) -> dict[str, object]:
    conn.sendall(json.dumps(payload).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        assert chunk, "the task's process closed its socket"
        buf += chunk
    answer: dict[str, object] = json.loads(buf)
    return answer


def cpu_limit(pid: int) -> int:
    """The soft RLIMIT_CPU of ``pid``, from /proc (seconds)."""
    for row in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if row.startswith("Max cpu time"):
            return int(row.split()[3])
    raise AssertionError(f"no cpu limit line for {pid}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_each_fork_is_its_own_environment_and_the_parent_ends_them_all(zygote: tuple[subprocess.Popen[bytes],
                                                                                     socket.socket]) -> None:
    proc, ctl = zygote
    assert control(ctl, {"id": 1, "op": "ping"})["children"] == 0
    task = load_tasks("retail")[0]
    conns, pids = [], []
    for i in range(2):
        ours, theirs = socket.socketpair()
        answer = control(ctl, {"id": 2 + i, "op": "fork"}, [theirs.fileno()])
        theirs.close()
        assert answer["id"] == 2 + i and isinstance(answer["pid"], int) and answer["pid"] != proc.pid
        conns.append(ours)
        pids.append(int(answer["pid"]))
    assert len(set(pids)) == 2
    for i, conn in enumerate(conns):
        assert line(conn, {"id": 1, "op": "open", "task": dict(task)}) == {"id": 1, "ok": True}
        assert line(conn, {"id": 2, "op": "ping"})["pid"] == pids[i]
    # a write in one task's environment is not seen by the other's
    user = "yusuf_rossi_9620"
    cancel = {"name": "modify_user_address", "arguments": {
        "user_id": user, "address1": "1 Main St", "address2": "", "city": "X", "state": "CA", "country": "USA",
        "zip": "12345"}}
    before = line(conns[1], {"id": 3, "op": "hash"})["db_hash"]
    out = line(conns[0], {"id": 3, "op": "call", "calls": [cancel]})
    assert out["outputs"][0]["ok"], out  # type: ignore[index]
    assert line(conns[0], {"id": 4, "op": "hash"})["db_hash"] != before
    assert line(conns[1], {"id": 4, "op": "hash"})["db_hash"] == before
    # closing a task's socket ends its process; a kill ends another's
    conns[0].close()
    deadline = time.monotonic() + 10
    while alive(pids[0]) and time.monotonic() < deadline:
        control(ctl, {"id": 9, "op": "ping"})  # the parent reaps on each packet
        time.sleep(0.05)
    assert not alive(pids[0])
    assert control(ctl, {"id": 10, "op": "kill", "pid": pids[1]}) == {"id": 10, "ok": True}
    assert not alive(pids[1])
    # wrong packets are answered, named, and change nothing
    assert "exactly one fd" in str(control(ctl, {"id": 11, "op": "fork"})["error"])
    assert "unknown op" in str(control(ctl, {"id": 12, "op": "exec", "cmd": "sh"})["error"])
    assert control(ctl, {"id": 13, "op": "kill", "pid": 1}) == {"id": 13, "ok": True, "gone": True}
    # a live child, then the host goes: the parent kills it and exits
    ours, theirs = socket.socketpair()
    pid = int(control(ctl, {"id": 14, "op": "fork"}, [theirs.fileno()])["pid"])
    theirs.close()
    assert alive(pid)
    ctl.close()
    assert proc.wait(timeout=10) == 0
    assert not alive(pid)
    ours.close()


async def _sessions_run(tmp_path: Path) -> None:
    lock_fd, scratch_fd = make_sandbox_dir(tmp_path / "sb", "tau2fork-crashed")  # a crashed worker's, unlocked
    os.close(lock_fd)
    os.close(scratch_fd)
    pool = make_sandbox_pool(SandboxConf(backend="trusted_subprocess", scratch_root=str(tmp_path / "sb"),
                                         pool=SandboxPoolConf(mode="local")))
    sessions = EnvSessions("retail", pool, start_timeout_s=60, request_timeout_s=10)
    assert sessions.forks()
    tasks = load_tasks("retail")
    try:
        envs = await asyncio.gather(*(sessions.open(f"t{i}", 1, tasks[i]) for i in range(5)))
        assert {e.backend for e in envs} == {"fork"}
        assert not (tmp_path / "sb" / "tau2fork-crashed").exists()  # swept when the warm server started
        assert len({e.pid for e in envs}) == 5  # type: ignore[attr-defined]
        calc = [{"name": "calculate", "arguments": {"expression": "2 * 3"}}]
        assert [o.text for o in await envs[0].step(calc)] == ["6.0"]
        # each task's process has the sandbox's CPU limit; the long-lived server a day's
        assert cpu_limit(envs[0].pid) == 60  # type: ignore[attr-defined]
        assert sessions._warm is not None
        assert cpu_limit(sessions._warm.sandbox.servers["tau2fork"].proc.pid) == 86_400
        # a task's process killed under it: that task's next request fails as a transport error
        os.kill(envs[1].pid, signal.SIGKILL)  # type: ignore[attr-defined]
        with pytest.raises(EnvServerError, match=f"tau2 env process {envs[1].pid}"):  # type: ignore[attr-defined]
            await envs[1].step(calc)
        assert [o.text for o in await envs[2].step(calc)] == ["6.0"]  # the others go on
        # a task's end kills its process
        pid = envs[3].pid  # type: ignore[attr-defined]
        await sessions.on_task_end("t3")
        assert not alive(pid)
        # the warm server killed: the next open starts another one
        warm = sessions._warm
        assert warm is not None
        server = warm.sandbox.servers["tau2fork"]
        os.killpg(server.proc.pid, signal.SIGKILL)
        await server.proc.wait()
        env = await sessions.open("t9", 1, tasks[9])
        assert sessions._warm is not warm and [o.text for o in await env.step(calc)] == ["6.0"]
    finally:
        await sessions.close()
        await pool.close()
    assert not [p for p in (tmp_path / "sb").iterdir() if not p.name.startswith(".")]


def test_sessions_fork_per_task_survive_a_lost_process_and_a_lost_server(tmp_path: Path) -> None:
    asyncio.run(_sessions_run(tmp_path))
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_env_server_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="workflow.env_server='forked'"):
        EnvSessions("retail", None, 60, 30, env_server="forked")
