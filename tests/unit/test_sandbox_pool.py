"""Lease bookkeeping of the sandbox pool, over recording fake hosts (the host boundary).

The pool itself is the real one (``PoolCore``, and ``LocalPoolBackend`` under
the clients); only the hosts are doubles. The real hosts (bubblewrap, Ray
actors) are exercised in tests/integration.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from matrix_hpc.services.sandbox.client import SandboxPoolClient
from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.lease import LeaseLost, LeaseOwner, SandboxPoolExhausted
from matrix_hpc.services.sandbox.local_pool import LocalPoolBackend
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.services.sandbox.pool_core import PoolCore


class FakeHost:
    def __init__(self, node_id: str, start_delay_s: float = 0.0, fail_start: bool = False) -> None:
        self.node_id = node_id
        self.live: set[str] = set()
        self.start_delay_s = start_delay_s
        self.fail_start = fail_start

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "start":
            await asyncio.sleep(self.start_delay_s)
            if self.fail_start:
                raise RuntimeError("start failed")
            self.live.add(args[0])
        elif method == "stop":
            self.live.discard(args[0])
        elif method == "stop_all":
            self.live.clear()
        elif method == "exec":
            return f"ran {args[1]!r} in {args[0]}"
        return None


def pool_conf(**kw: Any) -> SandboxConf:
    base: dict[str, Any] = dict(size=4, max_per_node=4, lease_wait_s=5.0, lease_ttl_s=1.0, reap_interval_s=0.1)
    base.update(kw)
    return SandboxConf(backend="trusted_subprocess", pool=SandboxPoolConf(**base))


def owner(task: str, attempt: int = 0, actor: str | None = None) -> LeaseOwner:
    return LeaseOwner(task_id=task, attempt=attempt, process="pid1@test", actor_id=actor, pid=1)


async def test_exhausted_pool_waits_then_fails_with_advice() -> None:
    host = FakeHost("n1")
    core = PoolCore(pool_conf(size=2), [host])
    await core.acquire(owner("a"))
    await core.acquire(owner("b"))
    t0 = time.monotonic()
    with pytest.raises(SandboxPoolExhausted, match=r"within 0s.*size=2.*raise sandbox.pool.size"):
        await core.acquire(owner("c"), wait_s=0.3)
    assert 0.25 < time.monotonic() - t0 < 2
    assert len(host.live) == 2 and core.snapshot().waiting == 0


async def test_a_waiter_gets_the_sandbox_released_meanwhile() -> None:
    core = PoolCore(pool_conf(size=1), [FakeHost("n1")])
    first = await core.acquire(owner("a"))
    waiter = asyncio.ensure_future(core.acquire(owner("b"), wait_s=5))
    await asyncio.sleep(0.1)
    assert not waiter.done() and core.snapshot().waiting == 1
    await core.release(first.lease_id)
    second = await asyncio.wait_for(waiter, 2)
    assert second.owner.task_id == "b" and core.snapshot().live == 1


async def test_per_node_limit_spreads_over_nodes() -> None:
    hosts = [FakeHost("n1"), FakeHost("n1"), FakeHost("n2")]
    core = PoolCore(pool_conf(size=10, max_per_node=2), hosts)
    for i in range(4):
        await core.acquire(owner(f"t{i}"))
    assert core.snapshot().per_node == {"n1": 2, "n2": 2}
    with pytest.raises(SandboxPoolExhausted):
        await core.acquire(owner("t5"), wait_s=0.1)


async def test_a_failed_start_frees_its_slot() -> None:
    core = PoolCore(pool_conf(size=1), [FakeHost("n1", fail_start=True)])
    with pytest.raises(RuntimeError, match="start failed"):
        await core.acquire(owner("a"))
    assert core.snapshot().live == 0 and not core.leases


async def test_a_retried_task_releases_its_earlier_attempt() -> None:
    host = FakeHost("n1")
    core = PoolCore(pool_conf(), [host])
    old = await core.acquire(owner("t", attempt=1))
    new = await core.acquire(owner("t", attempt=2))
    assert old.lease_id not in core.leases and host.live == {new.sandbox_id}
    assert core.snapshot().reaped == 1


async def test_leases_expire_without_heartbeat_and_renewal_keeps_them() -> None:
    host = FakeHost("n1")
    core = PoolCore(pool_conf(lease_ttl_s=0.3, reap_interval_s=0.1), [host])
    kept = await core.acquire(owner("kept"))
    dropped = await core.acquire(owner("dropped"))
    for _ in range(5):
        await asyncio.sleep(0.1)
        assert core.renew([kept.lease_id]) == []
        await core.reap()
    assert list(core.leases) == [kept.lease_id] and host.live == {kept.sandbox_id}
    assert core.renew([dropped.lease_id]) == [dropped.lease_id]  # the owner learns it lost the lease


async def test_max_lease_caps_even_renewed_leases() -> None:
    core = PoolCore(pool_conf(lease_ttl_s=10, max_lease_s=0.2), [FakeHost("n1")])
    lease = await core.acquire(owner("t"))
    await asyncio.sleep(0.25)
    core.renew([lease.lease_id])
    assert await core.reap() == 1 and not core.leases


async def test_dead_owners_are_reaped() -> None:
    core = PoolCore(pool_conf(lease_ttl_s=60), [FakeHost("n1")])
    await core.acquire(owner("a", actor="dead-actor"))
    alive = await core.acquire(owner("b", actor="live-actor"))

    async def dead(owners: list[LeaseOwner]) -> set[LeaseOwner]:
        return {o for o in owners if o.actor_id == "dead-actor"}

    assert await core.reap(dead) == 1
    assert list(core.leases) == [alive.lease_id]


async def test_release_task_ends_all_its_leases() -> None:
    host = FakeHost("n1")
    core = PoolCore(pool_conf(), [host])
    await core.acquire(owner("t"))
    await core.acquire(owner("t"))
    await core.acquire(owner("u"))
    assert await core.release_task("t") == 2 and len(host.live) == 1


class Task:
    def __init__(self, task_id: str, attempt: int) -> None:
        self.id, self.attempt = task_id, attempt


async def test_client_releases_when_the_step_raises() -> None:
    conf = pool_conf()
    host = FakeHost("n1")
    client = SandboxPoolClient(LocalPoolBackend(conf, [host]), conf)
    with pytest.raises(ZeroDivisionError):
        async with client.lease(Task("t1", 3)) as sb:
            assert sb.owner.task_id == "t1" and sb.owner.attempt == 3
            assert "ran" in await sb.exec("true")
            assert host.live == {sb.id}
            raise ZeroDivisionError("the step failed")
    assert host.live == set() and client.held == {}
    with pytest.raises(LeaseLost):
        await sb.exec("true")  # no use after release
    await client.close()


async def test_client_heartbeat_keeps_leases_and_notices_lost_ones() -> None:
    conf = pool_conf(lease_ttl_s=0.4, reap_interval_s=0.1)
    backend = LocalPoolBackend(conf, [FakeHost("n1")])
    core = backend.core
    client = SandboxPoolClient(backend, conf)
    sb = await client.acquire("t1")
    for _ in range(8):  # twice the ttl: only the heartbeat keeps it
        await asyncio.sleep(0.1)
        await core.reap()
    assert sb.grant.lease_id in core.leases
    await core.release_task("t1")  # e.g. the driver ended the task
    await asyncio.sleep(0.25)
    assert sb.lost and client.held == {}
    with pytest.raises(LeaseLost, match="lease a new sandbox"):
        await sb.exec("true")
    await client.close()


async def test_task_sandbox_is_shared_by_the_steps_of_one_attempt() -> None:
    conf = pool_conf(size=4)
    host = FakeHost("n1", start_delay_s=0.05)
    backend = LocalPoolBackend(conf, [host])  # one pool that both agents lease from
    agent_a = SandboxPoolClient(backend, conf)
    agent_b = SandboxPoolClient(backend, conf)  # another agent, same task
    first, second = await asyncio.gather(agent_a.task_sandbox(Task("t", 1)), agent_b.task_sandbox(Task("t", 1)))
    assert first.id == second.id and len(host.live) == 1  # concurrent first uses start one sandbox
    private = await agent_a.acquire(Task("t", 1))
    assert private.id != first.id  # plain leases stay private
    retry = await agent_b.task_sandbox(Task("t", 2))
    assert retry.id != first.id and host.live == {retry.id}  # a new attempt supersedes both old leases
    assert await agent_b.release_task("t") == 1 and not host.live
    await agent_a.close()
    await agent_b.close()
