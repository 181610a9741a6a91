"""The whole pool inside one process: its hosts, its :class:`PoolCore` and a reaper task.

``sandbox.pool.mode=local`` runs it in the agent's own process; the Ray
pool actor runs one over its host actors.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from matrix_hpc.background import supervise
from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.host import HostRef, LocalHostRef, SandboxHost
from matrix_hpc.services.sandbox.lease import LeaseGrant, LeaseOwner, PoolStats
from matrix_hpc.services.sandbox.pool_core import DeadOwnerCheck, PoolCore, run_reaper


class LocalPoolBackend:
    """A pool in this process: over one :class:`SandboxHost` of its own unless given ``hosts``."""

    def __init__(self, conf: SandboxConf, hosts: list[HostRef] | None = None,
                 dead_owner: DeadOwnerCheck | None = None) -> None:
        self.core = PoolCore(conf, hosts if hosts is not None else [LocalHostRef(SandboxHost(conf))])
        self.dead_owner = dead_owner  # how the reaper finds dead owners (the Ray pool asks the GCS)
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def start_pool(cls, conf: SandboxConf) -> None:
        """Nothing to create ahead: each process makes its pool on first use."""

    @classmethod
    def stop_pool(cls, conf: SandboxConf) -> None:
        """Nothing to stop: each process's pool ends with its client."""

    async def acquire(self, owner: LeaseOwner, wait_s: float | None, shared: bool = False) -> LeaseGrant:
        if self._reaper is None:
            self._reaper = supervise(functools.partial(run_reaper, self.core, self.dead_owner), "sandbox reaper")
        lease = await self.core.acquire(owner, wait_s, shared)
        return LeaseGrant(lease.lease_id, lease.sandbox_id, self.core.hosts[lease.host_index], lease.node_id)

    async def release(self, lease_id: str) -> bool:
        return await self.core.release(lease_id)

    async def renew(self, lease_ids: list[str]) -> list[str]:
        return self.core.renew(lease_ids)

    async def release_task(self, task_id: str) -> int:
        return await self.core.release_task(task_id)

    async def reap_now(self) -> int:
        """One reaper round right away (tests, and drivers that saw an agent die)."""
        return await self.core.reap(self.dead_owner)

    async def stats(self) -> PoolStats:
        return self.core.snapshot()

    async def call_host(self, grant: LeaseGrant, method: str, *args: Any, **kwargs: Any) -> Any:
        return await grant.host.call(method, *args, **kwargs)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await self.core.shutdown()
