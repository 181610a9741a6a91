"""Replica registry: the list of live LLM replicas of one service.

A named, detached Ray actor per service (``matrix_hpc/llm-registry-<service>``)
so that it outlives any single replica: replicas register their base URL when
healthy and unregister when they stop; clients poll ``snapshot()`` (cheap,
versioned) to refresh their routing table.
"""

from __future__ import annotations

import time
from typing import Any

NAMESPACE = "matrix_hpc"


def registry_name(service: str) -> str:
    return f"llm-registry-{service}"


class ReplicaRegistry:
    """Plain class; wrapped as a Ray actor by :func:`get_or_create_registry`."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}
        self._version = 0

    def register(self, replica_id: str, base_url: str, meta: dict[str, Any] | None = None) -> int:
        self._replicas[replica_id] = {"base_url": base_url, "meta": meta or {}, "since": time.time()}
        self._version += 1
        return self._version

    def unregister(self, replica_id: str) -> int:
        if self._replicas.pop(replica_id, None) is not None:
            self._version += 1
        return self._version

    def snapshot(self) -> tuple[int, dict[str, str]]:
        """(version, {replica_id: base_url})."""
        return self._version, {rid: r["base_url"] for rid, r in self._replicas.items()}


def get_or_create_registry(service: str) -> Any:  # Any: a Ray actor handle
    import ray

    actor_cls = ray.remote(num_cpus=0)(ReplicaRegistry)
    return actor_cls.options(
        name=registry_name(service), namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()
