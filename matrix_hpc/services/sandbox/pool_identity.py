"""Which pool a config names: the Ray actor's name (a digest of the settings, secrets left out) and what differs.

The actor's name carries a digest of the pool's config, so two runs on one
cluster that ask for different pools (limits, binds, image) get different
actors; one that finds an actor of its name still checks that its config is
the one asked for (``env`` values, left out of the digest because actor
names are visible to the cluster's users, are compared there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from matrix_hpc.services.sandbox.contract import SandboxConf

ACTOR_PREFIX = "sandbox-pool-"
DIGEST_CHARS = 12


def pool_identity(conf: SandboxConf) -> dict[str, Any]:
    """The config that makes a pool what it is, secrets left out: ``env`` by its names, not its values.

    ``pool.mode`` is left out too: ``auto`` and ``ray`` reach the same pool.
    """
    identity = dataclasses.asdict(conf)
    identity["env"] = sorted(conf.env)
    identity["pool"].pop("mode", None)
    identity["pool"].pop("deployed", None)  # how a run finds the pool, not what the pool is
    return identity


def pool_actor_name(conf: SandboxConf) -> str:
    """``sandbox-pool-<name>-<12 hex digits of the config>``."""
    blob = json.dumps(pool_identity(conf), sort_keys=True, default=str).encode()
    return f"{ACTOR_PREFIX}{conf.pool.name}-{hashlib.sha256(blob).hexdigest()[:DIGEST_CHARS]}"


def config_differences(have: SandboxConf, want: SandboxConf) -> list[str]:
    """Dotted names of the settings that differ (``env`` by name only: its values are secrets)."""
    a, b = _flat(dataclasses.asdict(have)), _flat(dataclasses.asdict(want))
    for key in ("pool.mode", "pool.deployed"):
        a.pop(key, None)
        b.pop(key, None)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "host_resources":
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out
