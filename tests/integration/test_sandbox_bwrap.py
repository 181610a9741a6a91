"""bwrap sandbox operations on real bubblewrap: exec, files, Python inside, servers, stop."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from matrix_hpc.services.sandbox.contract import SandboxConf, SandboxError
from matrix_hpc.services.sandbox.registry import create_sandbox
from tests.conftest import REPO_ROOT
from tests.integration.sandbox_support import processes_matching

pytestmark = [pytest.mark.integration, pytest.mark.needs("bwrap")]

ECHO_SERVER = """
import json, os, socket, sys, threading
def serve_socket():
    path = os.environ["MATRIX_SANDBOX_SOCKET"]
    srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen()
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"sock:" + conn.recv(1024))
threading.Thread(target=serve_socket, daemon=True).start()
for line in sys.stdin:
    print(json.dumps({"echo": json.loads(line)}), flush=True)
"""


def conf(tmp_path: Path, **kw: object) -> SandboxConf:
    return SandboxConf(backend="bwrap", scratch_root=str(tmp_path / "sb"), **kw)  # type: ignore[arg-type]


async def test_exec_files_env_stdin_and_persistence(tmp_path: Path) -> None:
    sb = create_sandbox(conf(tmp_path, env={"GREETING": "hi"}), "ops")
    await sb.start()
    try:
        r = await sb.exec("echo $GREETING $EXTRA; cat; pwd; echo err >&2; exit 4", stdin="from-stdin\n",
                          env={"EXTRA": "there"})
        assert (r.exit_code, r.stdout, r.stderr) == (4, "hi there\nfrom-stdin\n/scratch\n", "err\n")
        await sb.put_file("pkg/mod.py", "VALUE = 41\n")
        r = await sb.exec(["python3", "-c", "import sys; sys.path.insert(0, 'pkg'); import mod;"
                                             "open('out.txt', 'w').write(str(mod.VALUE + 1))"])
        assert r.ok, r
        assert await sb.get_file("out.txt") == b"42" and await sb.get_file("/scratch/out.txt") == b"42"
        await sb.exec("ln -s /etc/passwd leak; ln -s / rootlink")
        for path, why in (("leak", "symlink"), ("rootlink/etc/passwd", "symlink"), ("../../../etc/passwd", "'..'")):
            with pytest.raises(SandboxError, match=why):
                await sb.get_file(path)
            with pytest.raises(SandboxError, match=why):
                await sb.put_file(path, "overwritten")
        assert "overwritten" not in await asyncio.to_thread(Path("/etc/passwd").read_text)
        r = await sb.exec(["python3", "-c", "import multiprocessing as mp\n"
                                             "with mp.Pool(2) as p: print(sum(p.map(abs, [-1, -2])))"])
        assert r.ok and r.stdout == "3\n", r  # /dev/shm works (semaphores)
        results = await asyncio.gather(*(sb.exec(f"echo {i}") for i in range(8)))  # concurrent execs
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
    finally:
        await sb.stop()


async def test_the_venv_python_and_the_repo_read_only(tmp_path: Path) -> None:
    sb = create_sandbox(conf(tmp_path, binds=[f"{REPO_ROOT}:{REPO_ROOT}:ro"]), "venv")
    await sb.start()
    try:
        r = await sb.exec([sys.executable, "-c", "import matrix_hpc.services.sandbox, psutil, sys; print(sys.prefix)"],
                          cwd=str(REPO_ROOT))
        assert r.ok and r.stdout.strip() == sys.prefix, r
        r = await sb.exec(f"touch {REPO_ROOT}/mhpc-should-fail")
        assert r.exit_code != 0 and "Read-only" in r.stderr
        assert not (REPO_ROOT / "mhpc-should-fail").exists()
    finally:
        await sb.stop()


async def test_long_lived_server_over_stdio_and_unix_socket(tmp_path: Path) -> None:
    marker = f"srv{uuid.uuid4().hex[:8]}"
    sb2 = create_sandbox(conf(tmp_path), "srv2")
    await sb2.start()
    try:
        await sb2.put_file("server.py", ECHO_SERVER)
        server = await sb2.start_server(["python3", "server.py", marker])
        assert json.loads(await server.request(json.dumps({"n": 1}))) == {"echo": {"n": 1}}
        path = await server.wait_socket()
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"ping")
        assert await reader.read(100) == b"sock:ping"
        writer.close()
        assert processes_matching(marker)
    finally:
        await sb2.stop()
    assert not processes_matching(marker)  # stop kills the server


async def test_configured_server_starts_with_the_sandbox(tmp_path: Path) -> None:
    marker = f"cfg{uuid.uuid4().hex[:8]}"
    code = ECHO_SERVER.replace("import json", f"# {marker}\nimport json")
    sb = create_sandbox(conf(tmp_path, server_argv=["python3", "-c", code]), "cfgsrv")
    await sb.start()
    try:
        assert json.loads(await sb.servers["server"].request('"x"')) == {"echo": "x"}
    finally:
        await sb.stop()
    assert not processes_matching(marker)


async def test_bad_bind_and_missing_image_fail_at_start(tmp_path: Path) -> None:
    sb = create_sandbox(conf(tmp_path, binds=["/no/such/dir"]), "bad")
    with pytest.raises(SandboxError, match="host path does not exist"):
        await sb.start()
    assert not sb.dir.exists()
    sb = create_sandbox(conf(tmp_path, image="/no/such/root"), "bad2")
    with pytest.raises(SandboxError, match="not a directory"):
        await sb.start()


def make_tiny_root(root: Path) -> None:
    """A root dir made of mount points for the host's /usr, its /bin-style links and a marker file."""
    for d in ("proc", "dev", "tmp", "scratch", "usr"):
        (root / d).mkdir(parents=True)
    for link in ("bin", "lib", "lib64"):
        if os.path.islink(f"/{link}"):
            os.symlink(os.readlink(f"/{link}"), root / link)
    (root / "marker").write_text("image!\n")


async def test_image_root_dir(tmp_path: Path) -> None:
    """A directory image replaces the host root (here: a tiny root made of the host's /usr)."""
    root = tmp_path / "rootfs"
    make_tiny_root(root)
    sb = create_sandbox(conf(tmp_path, image=str(root), bind_python=False, binds=["/usr:/usr:ro"]), "img")
    await sb.start()
    try:
        r = await sb.exec("cat /marker; ls /")
        assert r.ok and r.stdout.startswith("image!\n"), r
    finally:
        await sb.stop()
