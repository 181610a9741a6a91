"""Where a secret must not be: process command lines, files (logs, configs,
rows), and what a client without it gets. Shared by tests/integration/test_security_*.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

#: A Ray driver that runs one task and prints its result: what an attacker on the network would try.
RAY_CLIENT = (
    "import os, sys, ray\n"
    "ray.init(address=sys.argv[1], log_to_driver=False)\n"
    "@ray.remote\n"
    "def uid():\n"
    "    return os.getuid()\n"
    "print('RESULT', ray.get(uid.remote(), timeout=60))\n"
)


def cmdlines_with(secret: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose /proc/<pid>/cmdline holds ``secret``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if secret.encode() in raw:
            found.append((int(entry.name), raw.replace(b"\0", b" ").decode(errors="replace")[:300]))
    return found


def files_with(secret: str, roots: Iterable[Path], skip: Iterable[Path] = ()) -> list[Path]:
    """Files under ``roots`` (logs, configs, Parquet) whose bytes hold ``secret``."""
    skipped = {Path(p).resolve() for p in skip}
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.resolve() in skipped or path.is_symlink() or not path.is_file():
                    continue
                try:
                    if secret.encode() in path.read_bytes():
                        found.append(path)
                except OSError:
                    continue
    return found


def run_ray_client(address: str, home: Path, **auth_env: str) -> subprocess.CompletedProcess[str]:
    """The client above from a clean environment (``env -i``) plus ``auth_env``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), **auth_env}
    return subprocess.run([sys.executable, "-c", RAY_CLIENT, address], env=env, capture_output=True, text=True,
                          timeout=180, cwd=home)


def open_http_listeners(root_pid: int) -> list[tuple[str, int, str, int]]:
    """(address, port, process name, HTTP status) of every TCP socket listening beyond loopback, held by
    ``root_pid`` or a descendant (a Ray node: gcs, raylet, agents), that answers a plain
    ``GET /metrics`` with a 2xx: a service anyone on the network can read without a credential."""
    import http.client

    import psutil

    root = psutil.Process(root_pid)
    tree = {root.pid: root.name()} | {p.pid: p.name() for p in root.children(recursive=True)}
    assert len(tree) > 2, f"the node's process tree is not up: {tree}"
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in tree or conn.laddr.ip.startswith("127.") \
                or conn.laddr.ip in ("::1", "::ffff:127.0.0.1"):
            continue
        name = tree[conn.pid]
        host = "127.0.0.1" if conn.laddr.ip in ("0.0.0.0", "::") else conn.laddr.ip
        try:
            client = http.client.HTTPConnection(host, conn.laddr.port, timeout=5)
            client.request("GET", "/metrics")
            status = client.getresponse().status
            client.close()
        except (OSError, http.client.HTTPException):  # not HTTP (gRPC, object transfer): nothing read
            continue
        if 200 <= status < 300:
            found.append((conn.laddr.ip, conn.laddr.port, name, status))
    return found
