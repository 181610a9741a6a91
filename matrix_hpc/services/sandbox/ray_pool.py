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

    names = [pool_actor_name(pool)] if isinstance(pool, SandboxConf) else deployed_pools().get(pool, [])
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


class PoolNotDeployed(ValueError):
    """A run or command names a sandbox pool that is not deployed on this cluster."""


def deployed_pools() -> dict[str, list[str]]:
    """Pool name -> its pool actors on the connected cluster (one per config; deployed ones have one)."""
    from ray.util import list_named_actors

    found: dict[str, list[str]] = {}
    for actor in list_named_actors(all_namespaces=True):
        full = actor["name"]
        if actor.get("namespace") == NAMESPACE and full.startswith(ACTOR_PREFIX) \
                and len(full) > len(ACTOR_PREFIX) + DIGEST_CHARS and full[-DIGEST_CHARS - 1] == "-":
            found.setdefault(full[len(ACTOR_PREFIX):-DIGEST_CHARS - 1], []).append(full)
    return found


def deployed_pool_conf(name: str) -> SandboxConf:
    """The settings of the pool deployed as ``name``; refused naming the deployed ones otherwise."""
    import ray

    pools = deployed_pools()
    actors = pools.get(name, [])
    if len(actors) != 1:
        names = ", ".join(sorted(pools)) or "none"
        what = "no sandbox pool" if not actors else f"{len(actors)} sandbox pools with different settings"
        raise PoolNotDeployed(f"{what} named {name!r} on this Ray cluster (deployed: {names}); deploy one with "
                              f"`matrix-hpc serve up sandbox=bwrap sandbox.pool.name={name} [sandbox.KEY=VALUE ...]`")
    handle: Any = ray.get_actor(actors[0], namespace=NAMESPACE)  # Any: Ray actor handle
    found: SandboxConf = ray.get(handle.config.remote(), timeout=60)
    return found


def pool_status() -> list[dict[str, Any]]:
    """Name, backend, size and lease counts of every sandbox pool on the connected cluster."""
    import ray

    rows = []
    for name, actors in sorted(deployed_pools().items()):
        for full in actors:
            actor: Any = ray.get_actor(full, namespace=NAMESPACE)  # Any: Ray actor handle
            try:
                conf, stats = ray.get([actor.config.remote(), actor.stats.remote()], timeout=30)
            except (ray.exceptions.RayError, TimeoutError) as e:
                rows.append({"name": name, "backend": "?", "size": 0, "stats": f"unreachable ({type(e).__name__})"})
                continue
            rows.append({"name": name, "backend": conf.backend, "size": conf.pool.size, "stats": stats})
    return rows


def deploy_pool(conf: SandboxConf) -> str:
    """``serve up sandbox=...``: the pool of ``conf`` under its name, detached, with its hosts started.
    A pool of that name with other settings is replaced when idle, refused while it has sandboxes."""
    import ray

    for other in [a for a in deployed_pools().get(conf.pool.name, []) if a != pool_actor_name(conf)]:
        actor: Any = ray.get_actor(other, namespace=NAMESPACE)  # Any: Ray actor handle
        stats: PoolStats = ray.get(actor.stats.remote(), timeout=60)
        if stats.live or stats.waiting:
            raise ValueError(f"sandbox pool {conf.pool.name!r} runs {stats.live} sandbox(es) with other settings "
                             f"({stats.waiting} lease request(s) waiting): `serve down sandbox.pool.name="
                             f"{conf.pool.name}` once its runs are done, then deploy again")
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)
    RayPoolBackend.start_pool(conf)
    pool: Any = ray.get_actor(pool_actor_name(conf), namespace=NAMESPACE)  # Any: Ray actor handle
    stats = ray.get(pool.stats.remote(), timeout=60)
    return f"sandbox pool {conf.pool.name!r} deployed ({conf.backend}, size {conf.pool.size}): {stats}"


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
