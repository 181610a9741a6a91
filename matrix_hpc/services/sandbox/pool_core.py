"""Who gets which sandbox: capacity, waiting, owners, expiry, reaping (the pool's bookkeeping, on one event loop).

At most ``size`` sandboxes alive, at most ``max_per_node`` per node, waiters
queue (bounded by ``lease_wait_s``), every lease has an owner (task id,
attempt, process) and an expiry, and expired or orphaned leases are reaped.
A lease for attempt N of a task releases that task's leases from earlier
attempts (a retried task never holds two sandboxes).

Durations are measured with ``time.monotonic()``: leases live in the
pool's own process and their times never cross to another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from matrix_hpc import metrics
from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.host import HostRef
from matrix_hpc.services.sandbox.lease import Lease, LeaseOwner, PoolStats, SandboxPoolExhausted

log = logging.getLogger(__name__)

#: Given the owners of live leases, which of them are dead (their leases are reaped).
DeadOwnerCheck = Callable[[list[LeaseOwner]], Awaitable[set[LeaseOwner]]]


class PoolCore:
    """Lease bookkeeping over a fixed set of hosts; all methods run on one event loop."""

    def __init__(self, conf: SandboxConf, hosts: list[HostRef]) -> None:
        if not hosts:
            raise ValueError("a sandbox pool needs at least one host")
        self.conf = conf
        self.pool = conf.pool
        self.hosts = hosts
        self.leases: dict[str, Lease] = {}
        self.live_per_host = [0] * len(hosts)  # includes sandboxes still starting
        self.stats = PoolStats()
        self._cond = asyncio.Condition()
        self._task_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # task id -> (lock, users)

    # -- capacity
    def _node_live(self, node_id: str) -> int:
        return sum(n for n, h in zip(self.live_per_host, self.hosts, strict=True) if h.node_id == node_id)

    def _pick_host(self) -> int | None:
        if sum(self.live_per_host) >= self.pool.size:
            return None
        eligible = [i for i, h in enumerate(self.hosts) if self._node_live(h.node_id) < self.pool.max_per_node]
        return min(eligible, key=lambda i: self.live_per_host[i]) if eligible else None

    async def _reserve(self, wait_s: float) -> int:
        deadline = time.monotonic() + wait_s
        async with self._cond:
            self.stats.waiting += 1
            try:
                while (index := self._pick_host()) is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._exhausted(wait_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), remaining)
            finally:
                self.stats.waiting -= 1
            self.live_per_host[index] += 1
            return index

    def _exhausted(self, wait_s: float) -> SandboxPoolExhausted:
        return SandboxPoolExhausted(
            f"no sandbox became free within {wait_s:.0f}s: pool '{self.pool.name}' has all "
            f"{sum(self.live_per_host)} of size={self.pool.size} (max_per_node={self.pool.max_per_node}) leased; "
            "raise sandbox.pool.size / sandbox.pool.max_per_node, lower run.max_concurrent_tasks, "
            "or raise sandbox.pool.lease_wait_s"
        )

    async def _free(self, index: int) -> None:
        async with self._cond:
            self.live_per_host[index] -= 1
            self._cond.notify()

    # -- leases
    async def acquire(self, owner: LeaseOwner, wait_s: float | None = None, shared: bool = False) -> Lease:
        """Start a sandbox for ``owner`` (waiting for capacity) and lease it.

        ``shared``: return the task's shared lease (same task id and attempt)
        when there is one, so that every step of a task uses one sandbox.
        """
        if not shared:
            return await self._acquire_new(owner, wait_s, shared=False)
        entry = self._task_locks.setdefault(owner.task_id, (asyncio.Lock(), [0]))
        lock, users = entry
        users[0] += 1
        try:
            async with lock:  # concurrent first uses of a task start one sandbox
                for lease in self.leases.values():
                    if lease.shared and lease.owner.task_id == owner.task_id and lease.owner.attempt == owner.attempt:
                        self._set_expiry(lease, time.monotonic())
                        return lease
                return await self._acquire_new(owner, wait_s, shared=True)
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._task_locks.pop(owner.task_id, None)

    async def _acquire_new(self, owner: LeaseOwner, wait_s: float | None, shared: bool) -> Lease:
        for old in [lease for lease in self.leases.values() if lease.owner.task_id == owner.task_id
                    and lease.owner.attempt < owner.attempt]:
            await self._end(old, reaped=True)
        index = await self._reserve(self.pool.lease_wait_s if wait_s is None else wait_s)
        sandbox_id = f"{_safe(owner.task_id)[:40]}-{uuid.uuid4().hex[:10]}"
        t0 = time.monotonic()
        try:
            await self.hosts[index].call("start", sandbox_id)
        except BaseException:
            await self._free(index)
            raise
        now = time.monotonic()
        metrics.SANDBOX_START_S.observe(now - t0, self.pool.name)
        lease = Lease(lease_id=uuid.uuid4().hex, sandbox_id=sandbox_id, owner=owner, host_index=index,
                      node_id=self.hosts[index].node_id, granted_at=now, renewed_at=now, expires_at=now,
                      shared=shared)
        self._set_expiry(lease, now)
        self.leases[lease.lease_id] = lease
        self.stats.granted += 1
        metrics.SANDBOX_LEASES.inc(1, self.pool.name)
        metrics.SANDBOX_LEASED.set(len(self.leases), self.pool.name)
        return lease

    def _set_expiry(self, lease: Lease, now: float) -> None:
        lease.renewed_at = now
        lease.expires_at = min(now + self.pool.lease_ttl_s, lease.granted_at + self.pool.max_lease_s)

    def renew(self, lease_ids: Sequence[str]) -> list[str]:
        """Extend leases; returns the ids the pool no longer holds (lost)."""
        now, lost = time.monotonic(), []
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is None:
                lost.append(lease_id)
            else:
                self._set_expiry(lease, now)
        return lost

    async def release(self, lease_id: str) -> bool:
        lease = self.leases.get(lease_id)
        if lease is None:
            return False
        await self._end(lease, reaped=False)
        return True

    async def release_task(self, task_id: str) -> int:
        """Release every lease held for ``task_id`` (the task ended or failed)."""
        mine = [lease for lease in self.leases.values() if lease.owner.task_id == task_id]
        for lease in mine:
            await self._end(lease, reaped=False)
        return len(mine)

    async def _end(self, lease: Lease, *, reaped: bool) -> None:
        if self.leases.pop(lease.lease_id, None) is None:
            return  # ended concurrently
        metrics.SANDBOX_LEASED.set(len(self.leases), self.pool.name)
        try:
            await self.hosts[lease.host_index].call("stop", lease.sandbox_id)
        except Exception as exc:  # a dead host took its sandboxes with it (die-with-parent)
            log.warning("stopping sandbox %s failed: %s", lease.sandbox_id, exc)
        finally:
            if reaped:
                self.stats.reaped += 1
            else:
                self.stats.released += 1
            await self._free(lease.host_index)

    async def reap(self, dead_owner: DeadOwnerCheck | None = None) -> int:
        """End expired leases and leases whose owner ``dead_owner`` reports dead."""
        now = time.monotonic()
        doomed = [lease for lease in self.leases.values() if lease.expires_at <= now]
        if dead_owner is not None:
            owners = list({lease.owner for lease in self.leases.values() if lease.expires_at > now})
            dead = await dead_owner(owners) if owners else set()
            doomed += [lease for lease in self.leases.values() if lease.owner in dead and lease not in doomed]
        for lease in doomed:
            log.info("reaping sandbox %s of task %s (owner %s)", lease.sandbox_id, lease.owner.task_id,
                     lease.owner.process)
            await self._end(lease, reaped=True)
        return len(doomed)

    def snapshot(self) -> PoolStats:
        per_node: dict[str, int] = {}
        for n, h in zip(self.live_per_host, self.hosts, strict=True):
            per_node[h.node_id] = per_node.get(h.node_id, 0) + n
        return PoolStats(live=sum(self.live_per_host), waiting=self.stats.waiting, granted=self.stats.granted,
                         released=self.stats.released, reaped=self.stats.reaped, per_node=per_node)

    async def shutdown(self) -> None:
        for lease in list(self.leases.values()):
            await self._end(lease, reaped=False)
        for host in self.hosts:
            with contextlib.suppress(Exception):
                await host.call("stop_all")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "task"


async def run_reaper(core: PoolCore, dead_owner: DeadOwnerCheck | None = None) -> None:
    """Reap forever, every ``reap_interval_s``; cancel to stop."""
    while True:
        await asyncio.sleep(core.pool.reap_interval_s)
        try:
            await core.reap(dead_owner)
        except Exception:  # keep reaping whatever one round hit
            log.exception("sandbox reaper round failed")
