"""The sandbox pool on a real local Ray with real bubblewrap sandboxes.

The lease lifecycle test: 200 tasks lease sandboxes from agent actors, some
fail mid-step, some are retried after leaking their first lease, and one
agent actor is killed while holding leases. Afterwards the pool has zero
live sandboxes and the host has zero leftover sandbox processes.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from matrix_hpc.services.sandbox.client import make_sandbox_pool
from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.lease import SandboxPoolExhausted
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.services.sandbox.pool_identity import pool_actor_name
from matrix_hpc.services.sandbox.ray_pool import get_or_create_pool, shutdown_pool
from matrix_hpc.services.sandbox.service import start_service
from tests.integration.sandbox_support import processes_matching

pytestmark = [pytest.mark.integration, pytest.mark.needs("bwrap")]
ray = pytest.importorskip("ray")


def pool_conf(tmp_path: Path, **pool: Any) -> SandboxConf:
    settings: dict[str, Any] = dict(mode="ray", name=f"test-{uuid.uuid4().hex[:8]}", size=12, max_per_node=12,
                                    num_hosts=2, lease_wait_s=120, lease_ttl_s=3, reap_interval_s=0.5)
    settings.update(pool)
    return SandboxConf(backend="bwrap", scratch_root=str(tmp_path / "sandboxes"),
                       limits=SandboxLimitsConf(exec_timeout_s=20), pool=SandboxPoolConf(**settings))


class Task:
    def __init__(self, task_id: str, attempt: int = 1) -> None:
        self.id, self.attempt = task_id, attempt


class Agent:
    """An agent process leasing sandboxes for its tasks (as a workflow role would)."""

    def __init__(self, conf: SandboxConf) -> None:
        self.pool = make_sandbox_pool(conf)

    async def run(self, task_ids: list[str], fail_rate: float, seed: int) -> dict[str, int]:
        rng = random.Random(seed)
        counts = {"ok": 0, "failed": 0, "retried": 0}

        async def one(task_id: str) -> None:
            fail, leak = rng.random() < fail_rate, rng.random() < 0.1
            if leak:  # attempt 1 crashes without releasing; attempt 2 must supersede it
                await self.pool.acquire(Task(task_id, 1))
                counts["retried"] += 1
            try:
                async with self.pool.lease(Task(task_id, 2 if leak else 1)) as sb:
                    r = await sb.exec(f"echo {task_id}; sleep 0.0{rng.randint(0, 5)}")
                    assert r.stdout == f"{task_id}\n", r
                    if fail:
                        raise RuntimeError(f"step of {task_id} failed")
                counts["ok"] += 1
            except RuntimeError:
                counts["failed"] += 1

        await asyncio.gather(*(one(t) for t in task_ids))
        return counts

    async def hold(self, n: int) -> list[str]:
        """Lease ``n`` sandboxes and keep them (heartbeating) until killed."""
        leased = [await self.pool.acquire(Task(f"held-{i}")) for i in range(n)]
        await leased[0].exec("sleep 0.1")
        return [s.id for s in leased]

    async def pid(self) -> int:
        import os

        return os.getpid()


def sandbox_host_uids(conf: SandboxConf) -> list[psutil.Process]:
    lo, hi = conf.limits.uid_base, conf.limits.uid_base + conf.limits.uid_count
    return [p for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and lo <= p.info["uids"].real < hi and p.info["status"] != psutil.STATUS_ZOMBIE]


def leftover_cgroups(prefixes: tuple[str, ...]) -> list[str]:
    from matrix_hpc.services.sandbox.cgroups import GROUP, find_parents

    parents = find_parents() or []
    return [d.name for p in parents for d in (p / GROUP).glob("*") if d.name.startswith(prefixes)]


async def wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.timeout(300)
async def test_lease_lifecycle_200_tasks_failures_and_a_killed_agent(local_ray: None, tmp_path: Path) -> None:
    conf = pool_conf(tmp_path)
    pool = get_or_create_pool(conf)
    agent_cls = ray.remote(num_cpus=0)(Agent)
    try:
        doomed = agent_cls.remote(conf)
        held = await doomed.hold.remote(4)
        assert len(held) == 4
        agents = [agent_cls.remote(conf) for _ in range(2)]
        ids = [f"task-{i:03d}" for i in range(200)]
        runs = [a.run.remote(ids[i::2], 0.2, seed=i) for i, a in enumerate(agents)]
        await asyncio.sleep(0.5)
        ray.kill(doomed)  # dies while holding 4 leases, mid-run
        counts = await asyncio.gather(*runs)
        assert sum(c["ok"] + c["failed"] for c in counts) == 200
        assert all(c["failed"] > 0 for c in counts) and sum(c["retried"] for c in counts) > 0

        async def drained() -> bool:
            return (await pool.stats.remote()).live == 0 and not await pool.live_sandboxes.remote()

        assert await wait_for(drained, 20), await pool.stats.remote()
        stats = await pool.stats.remote()
        assert stats.granted == 200 + 4 + sum(c["retried"] for c in counts)
        assert stats.reaped >= 4 + sum(c["retried"] for c in counts)  # the killed agent's + superseded attempts
        assert not processes_matching(conf.scratch_root) and not sandbox_host_uids(conf)
        assert not leftover_cgroups(("task-", "held-"))
        for agent in agents:
            ray.kill(agent)
    finally:
        shutdown_pool(conf.pool.name)
    assert not processes_matching(conf.scratch_root)


async def test_exhausted_pool_waits_then_says_what_to_change(local_ray: None, tmp_path: Path) -> None:
    conf = pool_conf(tmp_path, size=2, max_per_node=2, num_hosts=1)
    client = make_sandbox_pool(conf)
    try:
        a = await client.acquire("a")
        await client.acquire("b")
        with pytest.raises(SandboxPoolExhausted, match="raise sandbox.pool.size"):
            await client.acquire("c", wait_s=0.5)
        waiter = asyncio.ensure_future(client.acquire("d", wait_s=30))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await client.release(a)
        d = await asyncio.wait_for(waiter, 30)
        assert (await d.exec("echo d")).stdout == "d\n"
        await client.close()
        assert (await client.stats()).live == 0
    finally:
        shutdown_pool(conf.pool.name)


async def test_the_service_hands_workers_a_working_factory(local_ray: None, tmp_path: Path) -> None:
    import pickle

    from matrix_hpc.services.sandbox.code_exec import code_exec_step

    conf = pool_conf(tmp_path, size=4, max_per_node=4, num_hosts=1)
    service = start_service(conf)
    try:
        factory = pickle.loads(pickle.dumps(service.client_factory()))

        class Ctx:
            sandboxes = factory()

        class T:
            id, attempt, data = "code-1", 1, {}
            history: list[Any] = []

            def add_message(self, agent: str, content: str, role: str) -> None:
                self.history.append((agent, role, content))

        task = T()
        result = await code_exec_step(task, Ctx(), code="def f(x):\n    return 2 * x\n", tests="assert f(21) == 42")
        assert result.passed and task.data["code_exec"]["passed"] and task.history[0][2].startswith("PASSED")
        result = await code_exec_step(task, Ctx(), code="def f(x):\n    return x\n", tests="assert f(21) == 42")
        assert not result.passed and "AssertionError" in result.stderr
        assert (await Ctx.sandboxes.stats()).live == 0
        other = factory()  # as another agent process would
        mine, theirs = await asyncio.gather(Ctx.sandboxes.task_sandbox(task), other.task_sandbox(task))
        assert mine.id == theirs.id  # one tool environment per task, whichever agent asks
        await mine.put_file("state.json", "{}")
        assert await theirs.get_file("state.json") == b"{}"
        assert await other.release_task(task.id) == 1 and (await other.stats()).live == 0
    finally:
        service.stop()
    with pytest.raises(ValueError):
        ray.get_actor(pool_actor_name(conf), namespace="matrix_hpc")


async def test_a_crashed_host_takes_its_sandboxes_and_comes_back(local_ray: None, tmp_path: Path) -> None:
    conf = pool_conf(tmp_path, size=2, max_per_node=2, num_hosts=1)
    client = make_sandbox_pool(conf)
    try:
        leased = await client.acquire("victim")
        marker = f"crash{uuid.uuid4().hex[:8]}"
        # The marker rides as an unused argument (`sleep 300 <marker>` would exit at once: not a number).
        await leased.start_server(["python3", "-c", "import time; time.sleep(300)", marker])
        assert processes_matching(marker)
        ray.kill(leased.grant.host, no_restart=False)  # the host process dies (as on an OOM kill)
        with pytest.raises(ray.exceptions.RayActorError):
            await leased.exec("true")

        async def gone() -> bool:
            return not processes_matching(marker)

        assert await wait_for(gone, 10)  # --die-with-parent
        await client.release(leased)  # bookkeeping frees the slot even though the host lost it

        async def usable() -> bool:
            try:
                async with client.lease("after") as sb:
                    return (await sb.exec("echo back")).stdout == "back\n"
            except ray.exceptions.RayActorError:
                return False

        assert await wait_for(usable, 60)
        assert (await client.stats()).live == 0
    finally:
        shutdown_pool(conf.pool.name)


async def test_runs_asking_for_other_pool_settings_never_share_a_pool(local_ray: None, tmp_path: Path) -> None:
    import dataclasses

    from matrix_hpc.services.sandbox.errors import SandboxError
    from matrix_hpc.services.sandbox.ray_pool import checked_pool

    first = pool_conf(tmp_path, size=2, max_per_node=2, num_hosts=1)
    first.env = {"HF_TOKEN": "canary-first"}
    tighter = dataclasses.replace(first, limits=SandboxLimitsConf(mem_mb=128, exec_timeout_s=5))
    other_secret = dataclasses.replace(first, env={"HF_TOKEN": "canary-second"})
    try:
        a, b = checked_pool(first), checked_pool(tighter)
        assert pool_actor_name(first) != pool_actor_name(tighter) and a != b  # another run's limits: another pool
        assert pool_actor_name(other_secret) == pool_actor_name(first)  # the name holds no secret...
        with pytest.raises(SandboxError, match=r"already runs with other settings \(env.HF_TOKEN\)") as refused:
            checked_pool(other_secret)  # ...but the actor compares the values, and refuses
        assert "canary" not in str(refused.value)
        with pytest.raises(SandboxError, match="already runs with other settings"):
            await make_sandbox_pool(other_secret).acquire("t")  # a worker's client is refused the same way
    finally:
        assert shutdown_pool(first.pool.name) == 2  # by name: every pool of that name
