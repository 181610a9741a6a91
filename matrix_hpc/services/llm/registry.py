"""Replica registry: the list of live LLM replicas of one service.

A named Ray actor per service and config
(``matrix_hpc/llm-registry-<service>-<config digest>``): replicas register
their base URL when healthy and unregister when they stop; clients poll
``snapshot()`` (cheap, versioned) to refresh their routing table.

The name carries a digest of the service's config, so two runs that name
their services alike but configure them differently never meet, and the
registry records its config digest and the Ray job that made it: a second
run that asks for a registry in use by another job is refused with a message
that says what to change. The registry belongs to the driver that made it
(not detached): it ends with that run, crash included, instead of lingering.

A *deployed* service (``matrix-hpc serve up``, ``deploy.py``) is the other
kind: its registry and replicas are detached actors named after the service
alone (``llm-service-<name>``, ``llm-replica-<name>-<n>``): the name is the
identity, and they live until ``serve down``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

NAMESPACE = "matrix_hpc"
DIGEST_CHARS = 10
DEPLOYED_REGISTRY_PREFIX = "llm-service-"
DEPLOYED_REPLICA_PREFIX = "llm-replica-"


class RegistryConflictError(RuntimeError):
    """A registry of this name exists for another config or another run."""


def config_digest(conf: Any) -> str:
    """A short stable digest of a (dataclass or plain) service config."""
    data = dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) and not isinstance(conf, type) else conf
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class ServiceRef:
    """Which service: the user's name (``llm.service``) and its config's digest."""

    name: str  # llm.service (llm.name of a deployed service)
    digest: str  # config_digest() of the backend's config ('' for a deployed service)
    detached: bool = False  # a deployed service (serve up): detached actors named after the service alone

    @property
    def registry(self) -> str:
        """Name of the registry actor."""
        if self.detached:
            return f"{DEPLOYED_REGISTRY_PREFIX}{self.name}"
        return f"llm-registry-{self.name}-{self.digest}"

    def actor(self, kind: str, index: int) -> str:
        """Name of replica actor ``index`` of this service (kind: sim | vllm)."""
        if self.detached:
            return f"{DEPLOYED_REPLICA_PREFIX}{self.name}-{index}"
        return f"llm-{kind}-{self.name}-{self.digest}-{index}"


class ReplicaRegistry:
    """Plain class; wrapped as a Ray actor by :func:`get_or_create_registry`."""

    def __init__(self, digest: str = "", owner_job: str = "") -> None:
        self._replicas: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._digest = digest
        self._owner_job = owner_job

    def identity(self) -> tuple[str, str]:
        """(config digest, Ray job id of the run that made it)."""
        return self._digest, self._owner_job

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


def get_or_create_registry(ref: ServiceRef) -> Any:  # Any: a Ray actor handle
    """The registry of ``ref``, made if absent; refused when it belongs to another run or config.

    Call it first from the driver and keep the handle: the registry is then
    the driver's, and ends when the driver drops its last handle or exits.
    Replica actors of the same run find it and pass the check (same Ray job).
    """
    import ray

    if ref.detached:  # made by `serve up` before any replica; replicas of later `serve up`s share it
        return ray.get_actor(ref.registry, namespace=NAMESPACE)
    for attempt in range(3):
        handle, job = _registry_handle(ref)
        try:
            return _checked(handle, ref, job, ray.get(handle.identity.remote()))
        except ray.exceptions.RayActorError:
            if attempt == 2:  # found as it was going away (its run dropped the last handle): made anew
                raise
    raise AssertionError("unreachable")


async def get_or_create_registry_async(ref: ServiceRef) -> Any:  # Any: a Ray actor handle
    """:func:`get_or_create_registry` for code running in an event loop (replica actors)."""
    import ray

    if ref.detached:
        return ray.get_actor(ref.registry, namespace=NAMESPACE)
    for attempt in range(3):
        handle, job = _registry_handle(ref)
        try:
            return _checked(handle, ref, job, await handle.identity.remote())
        except ray.exceptions.RayActorError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _registry_handle(ref: ServiceRef) -> tuple[Any, str]:
    import ray

    job = ray.get_runtime_context().get_job_id()
    actor_cls: Any = ray.remote(num_cpus=0)(ReplicaRegistry)  # Any: Ray's actor class wrapper
    return actor_cls.options(name=ref.registry, namespace=NAMESPACE, get_if_exists=True).remote(ref.digest, job), job


def _checked(handle: Any, ref: ServiceRef, job: str, identity: tuple[str, str]) -> Any:
    digest, owner = identity
    if digest != ref.digest or owner != job:
        raise RegistryConflictError(
            f"LLM service {ref.name!r}: registry {NAMESPACE}/{ref.registry} belongs to Ray job {owner} "
            f"(config digest {digest}), not to this run (job {job}, digest {ref.digest}); two runs cannot share "
            f"one service: set another llm.service name for this run, or wait for that run to end")
    return handle
