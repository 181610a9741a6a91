"""The sandbox pool on Ray, client side: find or create the named pool actor, stop it, and lease through it.

The pool actor (``matrix_hpc/sandbox-pool-<name>-<digest>``, detached so
that no single agent owns it; see :mod:`ray_pool_actor`) holds the leases.
Clients (:class:`RayPoolBackend`) ask it for a lease and then call the host
actor directly: one Ray call per sandbox operation.
"""

from __future__ import annotations

import logging
from typing import Any

from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.lease import LeaseGrant, LeaseOwner, PoolStats
from matrix_hpc.services.sandbox.pool_identity import ACTOR_PREFIX, DIGEST_CHARS, pool_actor_name
from matrix_hpc.services.sandbox.ray_pool_actor import SandboxPoolActor

log = logging.getLogger(__name__)

NAMESPACE = "matrix_hpc"


def get_or_create_pool(conf: SandboxConf) -> Any:  # Any: Ray actor handle
    """The cluster's pool actor for ``conf``; created (detached) by the first caller.

    Call ``check_config`` on it before use (:func:`checked_pool` does, blocking).
    """
    import ray

    actor_cls = ray.remote(SandboxPoolActor)
    return actor_cls.options(
        name=pool_actor_name(conf), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_concurrency=10_000, max_restarts=-1,  # a restart starts with fresh hosts, no leases
    ).remote(conf)


def checked_pool(conf: SandboxConf, timeout_s: float = 120.0) -> Any:  # Any: Ray actor handle
    """:func:`get_or_create_pool`, refused when the actor found runs with other settings."""
    import ray

    actor = get_or_create_pool(conf)
    ray.get(actor.check_config.remote(conf), timeout=timeout_s)
    return actor


def shutdown_pool(pool: SandboxConf | str = "default") -> int:
    """Stop every sandbox of the pool and remove its actors; returns how many pool actors there were.

    Given a config, the one pool of that config; given a name, every pool
    of that ``sandbox.pool.name`` (whatever their configs).
    """
    import ray

    names = [pool_actor_name(pool)] if isinstance(pool, SandboxConf) else _pools_named(pool)
    stopped = 0
    for name in names:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(actor)
        stopped += 1
    return stopped


def _pools_named(name: str) -> list[str]:
    from ray.util import list_named_actors

    prefix = f"{ACTOR_PREFIX}{name}-"
    found = [a["name"] for a in list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE]
    return [n for n in found if n.startswith(prefix) and len(n) == len(prefix) + DIGEST_CHARS]


class RayPoolBackend:
    """Client side of the Ray pool (one per process)."""

    def __init__(self, conf: SandboxConf) -> None:
        self.conf = conf
        self._actor: Any = None  # Any: Ray actor handle
        self._checked = False

    @classmethod
    def available(cls) -> bool:
        """Ray is installed and initialised in this process."""
        try:
            import ray
        except ImportError:
            return False
        return bool(ray.is_initialized())

    @classmethod
    def start_pool(cls, conf: SandboxConf) -> None:
        """Create (or find and check) the pool actor and wait until its host actors are placed."""
        import ray

        if not ray.is_initialized():
            raise RuntimeError("sandbox.pool.mode=ray but Ray is not initialised; start the cluster first")
        actor = checked_pool(conf)
        stats = ray.get(actor.stats.remote(), timeout=120)  # waits until the host actors are placed
        log.info("sandbox pool %r ready: %s", conf.pool.name, stats)

    @classmethod
    def stop_pool(cls, conf: SandboxConf) -> None:
        shutdown_pool(conf)

    @property
    def actor(self) -> Any:  # Any: Ray actor handle
        if self._actor is None:
            self._actor = get_or_create_pool(self.conf)
        return self._actor

    async def acquire(self, owner: LeaseOwner, wait_s: float | None, shared: bool = False) -> LeaseGrant:
        if not self._checked:
            await self.actor.check_config.remote(self.conf)  # a pool of other settings is never used
            self._checked = True
        grant: LeaseGrant = await self.actor.acquire.remote(owner, wait_s, shared)
        return grant

    async def release(self, lease_id: str) -> bool:
        return bool(await self.actor.release.remote(lease_id))

    async def renew(self, lease_ids: list[str]) -> list[str]:
        lost: list[str] = await self.actor.renew.remote(lease_ids)
        return lost

    async def release_task(self, task_id: str) -> int:
        return int(await self.actor.release_task.remote(task_id))

    async def stats(self) -> PoolStats:
        stats: PoolStats = await self.actor.stats.remote()
        return stats

    async def call_host(self, grant: LeaseGrant, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(grant.host, method).remote(*args, **kwargs)

    async def close(self) -> None:
        """The pool outlives clients; :func:`shutdown_pool` ends it."""
