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
