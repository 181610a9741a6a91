"""Host paths a sandbox sees: the configured ``host[:inside[:ro|rw]]`` binds and this Python interpreter."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Bind:
    host: str  # absolute host path
    inside: str  # absolute path inside the sandbox
    writable: bool  # False = read-only


def parse_bind(spec: str) -> Bind:
    """Parse ``host[:inside[:ro|rw]]``; read-only unless ``rw`` is given."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise ValueError(f"bind {spec!r} is malformed; write host[:inside[:ro|rw]], e.g. /data:/data:ro")
    host = parts[0]
    inside = parts[1] if len(parts) > 1 and parts[1] else host
    mode = parts[2] if len(parts) == 3 else "ro"
    if mode not in ("ro", "rw"):
        raise ValueError(f"bind {spec!r}: mode must be 'ro' or 'rw', not {mode!r}")
    if not (host.startswith("/") and inside.startswith("/")):
        raise ValueError(f"bind {spec!r}: both paths must be absolute")
    return Bind(host=host, inside=inside, writable=mode == "rw")


def python_binds() -> list[Bind]:
    """Read-only binds that make this interpreter (and its venv) usable inside."""
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    return [Bind(p, p, False) for p in sorted(prefixes) if not p.startswith("/usr")]


def python_path_dirs() -> list[str]:
    """``PATH`` entries putting this interpreter first (venv before base)."""
    dirs = [os.path.join(sys.prefix, "bin"), os.path.join(os.path.realpath(sys.base_prefix), "bin")]
    return list(dict.fromkeys(dirs))
