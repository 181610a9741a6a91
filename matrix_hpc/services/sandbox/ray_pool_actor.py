"""The pool as a Ray actor: host actors that run the sandboxes, and a local pool over them that judges owners by Ray.

- Host actors (``SandboxHost`` as an async Ray actor) are placed by Ray
  resources (``sandbox.pool.host_resources``, e.g. ``{sandbox: 1}`` to keep
  them on CPU workers that advertise it) and spread over nodes. Sandboxes
  die with their host (bubblewrap's ``--die-with-parent``).
- The pool actor holds a :class:`LocalPoolBackend` over those hosts:
  capacity, waiting, leases, and a reaper that ends leases that expired (no
  heartbeat for ``lease_ttl_s``) or whose owner actor is dead or restarted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from matrix_hpc.services.sandbox.contract import SandboxConf, SandboxError
from matrix_hpc.services.sandbox.host import HostRef, SandboxHost
from matrix_hpc.services.sandbox.lease import LeaseGrant, LeaseOwner, PoolStats
from matrix_hpc.services.sandbox.local_pool import LocalPoolBackend
from matrix_hpc.services.sandbox.pool_identity import config_differences, pool_actor_name

_DEAD_STATES = ("DEAD", "RESTARTING")


class RayHostRef:
    def __init__(self, handle: Any, node_id: str) -> None:  # Any: Ray actor handle
        self.handle = handle
        self.node_id = node_id

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:  # Any: the host method's own types
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


async def dead_owners(owners: list[LeaseOwner]) -> set[LeaseOwner]:
    """The owners whose actor the GCS reports dead, restarting or restarted."""
    ids = {o.actor_id for o in owners if o.actor_id}
    if not ids:
        return set()
    records = await asyncio.to_thread(actor_states, ids)
    return {o for o in owners if o.actor_id and owner_is_dead(o, records.get(o.actor_id, {}))}


class SandboxPoolActor:
    """Wrapped as a Ray actor by :func:`ray_pool.get_or_create_pool`."""

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
        self._pool: LocalPoolBackend | None = None
        self._init_lock: asyncio.Lock | None = None

    async def _ready(self) -> LocalPoolBackend:
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if self._pool is None:
                node_ids = await asyncio.gather(*(h.node_id.remote() for h in self.handles))
                hosts: list[HostRef] = [RayHostRef(h, n) for h, n in zip(self.handles, node_ids, strict=True)]
                self._pool = LocalPoolBackend(self.conf, hosts, dead_owner=dead_owners)
        return self._pool

    async def acquire(self, owner: LeaseOwner, wait_s: float | None, shared: bool = False) -> LeaseGrant:
        grant = await (await self._ready()).acquire(owner, wait_s, shared)
        return dataclasses.replace(grant, host=grant.host.handle)  # clients call the host actor directly

    async def release(self, lease_id: str) -> bool:
        return await (await self._ready()).release(lease_id)

    async def renew(self, lease_ids: list[str]) -> list[str]:
        return await (await self._ready()).renew(lease_ids)

    async def release_task(self, task_id: str) -> int:
        return await (await self._ready()).release_task(task_id)

    async def reap_now(self) -> int:
        """One reaper round right away (tests, and drivers that saw an agent die)."""
        return await (await self._ready()).reap_now()

    async def stats(self) -> PoolStats:
        return await (await self._ready()).stats()

    def config(self) -> SandboxConf:
        """The settings this pool runs with (a run attaching by name takes them)."""
        return self.conf

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
        await (await self._ready()).close()
