"""The sandbox pool on Ray: one named pool actor, host actors that run the sandboxes.

- Host actors (``SandboxHost`` as an async Ray actor) are placed by Ray
  resources (``sandbox.pool.host_resources``, e.g. ``{sandbox: 1}`` to keep
  them on CPU workers that advertise it) and spread over nodes. Sandboxes
  die with their host (bubblewrap's ``--die-with-parent``).
- The pool actor (``matrix_hpc/sandbox-pool-<name>-<digest>``, detached so
  that no single agent owns it) holds the :class:`PoolCore`: capacity, waiting,
  leases, and a reaper that ends leases that expired (no heartbeat for
  ``lease_ttl_s``) or whose owner actor is dead or restarted.
- Clients (:class:`RayPoolBackend`) ask the pool actor for a lease and then
  call the host actor directly: one Ray call per sandbox operation.

The actor's name carries a digest of the pool's config, so two runs on one
cluster that ask for different pools (limits, binds, image) get different
actors; one that finds an actor of its name still checks that its config is
the one asked for (``env`` values, left out of the digest because actor
names are visible to the cluster's users, are compared there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import Any

from matrix_hpc.services.sandbox.base import SandboxConf, SandboxError
from matrix_hpc.services.sandbox.pool import (
    LeaseGrant,
    LeaseOwner,
    PoolCore,
    PoolStats,
    SandboxHost,
    run_reaper,
)

NAMESPACE = "matrix_hpc"
_DEAD_STATES = ("DEAD", "RESTARTING")


_PREFIX = "sandbox-pool-"


def pool_identity(conf: SandboxConf) -> dict[str, Any]:
    """The config that makes a pool what it is, secrets left out: ``env`` by its names, not its values.

    ``pool.mode`` is left out too: ``auto`` and ``ray`` reach the same pool.
    """
    identity = dataclasses.asdict(conf)
    identity["env"] = sorted(conf.env)
    identity["pool"].pop("mode", None)
    return identity


def pool_actor_name(conf: SandboxConf) -> str:
    """``sandbox-pool-<name>-<12 hex digits of the config>``."""
    blob = json.dumps(pool_identity(conf), sort_keys=True, default=str).encode()
    return f"{_PREFIX}{conf.pool.name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def config_differences(have: SandboxConf, want: SandboxConf) -> list[str]:
    """Dotted names of the settings that differ (``env`` by name only: its values are secrets)."""
    a, b = _flat(dataclasses.asdict(have)), _flat(dataclasses.asdict(want))
    a.pop("pool.mode", None)
    b.pop("pool.mode", None)
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


class RayHostRef:
    def __init__(self, handle: Any, node_id: str) -> None:  # Any: Ray actor handle
        self.handle = handle
        self.node_id = node_id

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.handle, method).remote(*args, **kwargs)


def actor_states(actor_ids: set[str]) -> dict[str, dict[str, Any]]:
    """GCS actor records by id (blocking; run in a thread). Unknown ids map to {}."""
    from ray._private import state  # private, but the only per-id lookup that needs no dashboard

    return {actor_id: state.actors(actor_id=actor_id) or {} for actor_id in actor_ids}


def owner_is_dead(owner: LeaseOwner, record: dict[str, Any]) -> bool:
    """Dead, restarting, or restarted into a new process since it took the lease."""
    if not record:
        return False
    if record.get("State") in _DEAD_STATES:
        return True
    pid = record.get("Pid")
    return bool(owner.pid and pid and pid != owner.pid)


class SandboxPoolActor:
    """Wrapped as a Ray actor by :func:`get_or_create_pool`."""

    def __init__(self, conf: SandboxConf) -> None:
        import ray

        self.conf = conf
        pool = conf.pool
        host_cls = ray.remote(SandboxHost)
        # A host that dies takes its sandboxes with it (die-with-parent); restarting it keeps the
        # pool's capacity, and the leases it held fail as LeaseLost / ActorDiedError for their owners.
        options: dict[str, Any] = {"num_cpus": pool.host_num_cpus, "scheduling_strategy": "SPREAD",
                                   "max_concurrency": 1000, "max_restarts": -1}
        if pool.host_resources:
            options["resources"] = dict(pool.host_resources)
        self.handles: list[Any] = [host_cls.options(**options).remote(conf) for _ in range(pool.num_hosts)]
        self.core: PoolCore | None = None
        self._init_lock: asyncio.Lock | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def _ready(self) -> PoolCore:
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if self.core is None:
                node_ids = await asyncio.gather(*(h.node_id.remote() for h in self.handles))
                refs = [RayHostRef(h, n) for h, n in zip(self.handles, node_ids, strict=True)]
                self.core = PoolCore(self.conf, refs)  # type: ignore[arg-type]
                self._reaper = asyncio.ensure_future(run_reaper(self.core, self._dead_owners))
        return self.core

    async def _dead_owners(self, owners: list[LeaseOwner]) -> set[LeaseOwner]:
        ids = {o.actor_id for o in owners if o.actor_id}
        if not ids:
            return set()
        records = await asyncio.to_thread(actor_states, ids)
        return {o for o in owners if o.actor_id and owner_is_dead(o, records.get(o.actor_id, {}))}

    async def acquire(self, owner: LeaseOwner, wait_s: float | None, shared: bool = False) -> LeaseGrant:
        core = await self._ready()
        lease = await core.acquire(owner, wait_s, shared)
        return LeaseGrant(lease.lease_id, lease.sandbox_id, self.handles[lease.host_index], lease.node_id)

    async def release(self, lease_id: str) -> bool:
        return await (await self._ready()).release(lease_id)

    async def renew(self, lease_ids: list[str]) -> list[str]:
        return (await self._ready()).renew(lease_ids)

    async def release_task(self, task_id: str) -> int:
        return await (await self._ready()).release_task(task_id)

    async def reap_now(self) -> int:
        """One reaper round right away (tests, and drivers that saw an agent die)."""
        core = await self._ready()
        return await core.reap(self._dead_owners)

    async def stats(self) -> PoolStats:
        return (await self._ready()).snapshot()

    def check_config(self, want: SandboxConf) -> None:
        """Refuse a client that asked for another pool under this name (a digest collision or other env)."""
        differ = config_differences(self.conf, want)
        if differ:
            raise SandboxError(
                f"sandbox pool actor {pool_actor_name(want)!r} already runs with other settings "
                f"({', '.join(differ)}); stop it with shutdown_pool, or give this run another sandbox.pool.name"
            )

    async def live_sandboxes(self) -> list[str]:
        """Sandboxes actually running on the hosts (not just what the bookkeeping says)."""
        lists = await asyncio.gather(*(h.live.remote() for h in self.handles))
        return [sid for ids in lists for sid in ids]

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await (await self._ready()).shutdown()


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

    prefix = f"{_PREFIX}{name}-"
    found = [a["name"] for a in list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE]
    return [n for n in found if n.startswith(prefix) and len(n) == len(prefix) + 12]


class RayPoolBackend:
    """Client side of the Ray pool (one per process)."""

    def __init__(self, conf: SandboxConf) -> None:
        self.conf = conf
        self._actor: Any = None
        self._checked = False

    @property
    def actor(self) -> Any:
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
