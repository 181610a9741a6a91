"""Per-sandbox cgroups, where this process may create them: total memory and process count.

rlimits bound each process; a cgroup bounds the sandbox as a whole (64
processes of 1 GiB each are 64 GiB without one). Used when the pool runs as
root on cgroup v1 (``memory`` + ``pids`` hierarchies) or on a cgroup v2
subtree delegated with both controllers; otherwise the rlimits alone apply
(``limits.cgroup=required`` makes that an error instead).

Processes join before they run anything: each command is prefixed with a
tiny ``sh`` that writes its own pid into ``cgroup.procs`` and then execs the
rest, so no child is ever created outside the cgroup.
"""

from __future__ import annotations

import functools
import os
import shlex
from pathlib import Path

from matrix_hpc.procs import kill_until_gone

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "matrix_hpc_sandboxes"  # our subtree under the pool process's own cgroup


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def find_parents(parent_override: str | None = None) -> list[Path] | None:
    """Dirs under which per-sandbox cgroups can be made (v1: [memory, pids]; v2: [unified]), or None."""
    if parent_override:
        p = Path(parent_override)
        return [p] if _v2_ready(p) else None
    own = _own_paths()
    v1 = [CGROUP_ROOT / c / own.get(c, "/").lstrip("/") for c in ("memory", "pids")]
    if all(_writable_dir(p) and (p / "cgroup.procs").exists() for p in v1):
        return v1
    if "" in own:
        p = CGROUP_ROOT / own[""].lstrip("/")
        if _v2_ready(p):
            return [p]
    return None


def _v2_ready(path: Path) -> bool:
    try:
        enabled = (path / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False
    return {"memory", "pids"} <= set(enabled) and _writable_dir(path)


class SandboxCgroup:
    """The cgroup(s) of one sandbox."""

    def __init__(self, parents: list[Path], name: str, mem_bytes: int, pids_max: int) -> None:
        self.v2 = len(parents) == 1
        self.dirs = [p / GROUP / name for p in parents]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        if self.v2:
            self._write("memory.max", str(mem_bytes))
            self._write("memory.swap.max", "0", optional=True)
            self._write("pids.max", str(pids_max))
        else:
            self._write("memory.limit_in_bytes", str(mem_bytes))
            self._write("memory.memsw.limit_in_bytes", str(mem_bytes), optional=True)  # no escape into swap
            self._write("pids.max", str(pids_max))

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        for d in self.dirs:
            f = d / name
            if f.exists():
                f.write_text(value)
                return
        if not optional:
            raise OSError(f"cgroup file {name} missing under {self.dirs}")

    def join_prefix(self) -> list[str]:
        """argv prefix that moves the command into the cgroup before it runs."""
        joins = " && ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.dirs)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sandbox-join"]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return found

    def peak_mem_bytes(self) -> int | None:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            for d in self.dirs:
                try:
                    return int((d / name).read_text())
                except (OSError, ValueError):
                    continue
        return None

    def kill_all(self, wait_s: float = 2.0) -> None:
        kill_until_gone(self.pids, wait_s)

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass  # still draining; the next sweep removes it


def remove_cgroup(parents: list[Path], name: str) -> None:
    """Kill and remove the cgroup of sandbox ``name`` (left behind by a crashed pool)."""
    if not any((p / GROUP / name).is_dir() for p in parents):
        return
    cg = SandboxCgroup.__new__(SandboxCgroup)
    cg.v2 = len(parents) == 1
    cg.dirs = [p / GROUP / name for p in parents]
    cg.remove()


@functools.lru_cache(maxsize=4)
def cgroup_parents(mode: str, parent_override: str | None) -> list[Path] | None:
    """Where this process makes sandbox cgroups, per ``limits.cgroup`` (cached per process)."""
    if mode == "off":
        return None
    parents = find_parents(parent_override)
    if parents is None and mode == "required":
        raise RuntimeError(
            "sandbox.limits.cgroup=required but no writable cgroup with memory and pids controllers was "
            "found (cgroup v1 as root, or a delegated v2 subtree given as sandbox.limits.cgroup_parent); "
            "set sandbox.limits.cgroup=auto to rely on rlimits alone"
        )
    return parents
