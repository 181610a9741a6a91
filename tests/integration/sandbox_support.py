"""Shared plumbing of the sandbox integration tests (real bubblewrap)."""

from __future__ import annotations

import functools
import shutil
import subprocess

import psutil

from tests.conftest import require_component

HOW_TO_ENABLE = "apt-get install bubblewrap (or bash .ci/setup_sandbox.sh) on a kernel with namespaces"


@functools.lru_cache(maxsize=1)
def bwrap_works() -> bool:
    if shutil.which("bwrap") is None:
        return False
    probe = ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--die-with-parent", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def require_bwrap() -> None:
    require_component(bwrap_works(), "bubblewrap", HOW_TO_ENABLE)


def processes_matching(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def processes_of_uid(uid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["uids", "status"]):
        uids = p.info["uids"]
        if uids and uid in (uids.real, uids.effective) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def bwrap_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "status"])
            if p.info["name"] == "bwrap" and p.info["status"] != psutil.STATUS_ZOMBIE]
