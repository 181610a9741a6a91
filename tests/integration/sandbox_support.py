"""Shared plumbing of the sandbox integration tests (real bubblewrap): finding the processes a test left.

Whether bubblewrap works is checked by conftest for every test marked ``needs("bwrap")``.
"""

from __future__ import annotations

import psutil

from tests.conftest import COMPONENTS, component_available, require_component


def require_bwrap() -> None:
    """The conftest check of ``needs("bwrap")``, for a test that cannot carry the marker (e.g. a fixture's)."""
    require_component(component_available("bwrap"), COMPONENTS["bwrap"].name, COMPONENTS["bwrap"].how_to_enable)


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
