"""Sim replicas as Ray actors behind the replica registry, on a real local Ray.

Load is spread, dialogues stay on their replica, a killed replica loses no
call, restarts on a new port, re-registers and gets traffic again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.services.llm.client import LLMClient
from matrix_hpc.services.llm.config import ClientConf, LLMConf, SimConf
from matrix_hpc.services.llm.endpoints import RegistryEndpoints
from matrix_hpc.services.llm.registry import NAMESPACE, get_or_create_registry
from matrix_hpc.services.llm.service import LLMService, sim_actor_name, start_llm_service

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

CLIENT = ClientConf(max_attempts=10, backoff_base_s=0.02, backoff_max_s=0.2, health_probe_interval_s=0.2,
                    refresh_interval_s=0.2, timeout_s=20.0)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def service(local_ray: None, tmp_path: Path) -> Iterator[LLMService]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    # A crashed earlier run of this service left a replica in the detached registry.
    ray.get(get_or_create_registry(name).register.remote("sim-7", "http://127.0.0.1:9"))
    conf = LLMConf(
        backend="sim",
        service=name,
        client=CLIENT,
        sim=SimConf(num_replicas=2, ttft_s=0.05, time_per_output_token_s=0.0005, output_tokens=20),
    )
    svc = start_llm_service(conf, tmp_path)
    yield svc
    svc.stop()


def ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"turn {i}"}]


async def dialogue(client: LLMClient, task: str, turns: int) -> list[str]:
    return [(await client.chat(ask(t), sticky_key=task, max_tokens=16)).replica for t in range(turns)]


async def test_load_is_spread_and_dialogues_stick(service: LLMService) -> None:
    assert isinstance(service.endpoint_source(), RegistryEndpoints)
    _, table = await service.endpoint_source().fetch()
    assert sorted(table) == ["sim-0", "sim-1"]  # the stale sim-7 was dropped
    factory = service.client_factory()
    assert factory is not None
    async with factory() as client:
        spread = Counter(r.replica for r in await asyncio.gather(*(client.chat(ask(i)) for i in range(200))))
        per_task = await asyncio.gather(*(dialogue(client, f"task-{t}", 5) for t in range(20)))
    assert len(spread) == 2 and min(spread.values()) >= 60, spread
    assert all(len(set(replicas)) == 1 for replicas in per_task), per_task
    assert len({replicas[0] for replicas in per_task}) == 2  # tasks were pinned to both


async def test_a_worker_process_builds_its_client_from_the_factory(service: LLMService) -> None:
    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, make_client: Any) -> None:
            self.client = make_client()

        async def run(self, n: int) -> list[str]:
            results = await asyncio.gather(*(self.client.chat(ask(i), sticky_key=f"w{i % 4}") for i in range(n)))
            await self.client.close()
            return [r.replica for r in results]

    worker = Worker.remote(service.client_factory())
    replicas = await worker.run.remote(40)
    assert len(replicas) == 40 and len(set(replicas)) == 2
    ray.kill(worker)


async def test_killed_replica_loses_nothing_and_comes_back(service: LLMService) -> None:
    registry_source = service.endpoint_source()
    _, before = await registry_source.fetch()
    victim = ray.get_actor(sim_actor_name(service.conf.service, 0), namespace=NAMESPACE)
    factory = service.client_factory()
    assert factory is not None
    async with factory() as client:
        run = asyncio.gather(*(dialogue(client, f"task-{t}", 8) for t in range(60)))
        await asyncio.sleep(0.3)
        ray.kill(victim, no_restart=False)  # the actor dies with its server; Ray restarts it
        per_task = await run
        assert len(per_task) == 60 and all(len(t) == 8 for t in per_task)
        assert client.retries > 0  # calls in flight on the victim were retried elsewhere

        after = await wait_for_new_url(registry_source, "sim-0", before["sim-0"])
        await asyncio.sleep(3 * CLIENT.refresh_interval_s)
        served = Counter(r.replica for r in await asyncio.gather(*(client.chat(ask(i)) for i in range(60))))
    assert after["sim-0"] != before["sim-0"] and after["sim-1"] == before["sim-1"]
    assert served[after["sim-0"]] > 10 and served[before["sim-1"]] > 10, served


async def wait_for_new_url(source: Any, replica_id: str, old_url: str, timeout_s: float = 60.0) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        _, table = await source.fetch()
        if table.get(replica_id, old_url) != old_url:
            return dict(table)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{replica_id} did not re-register within {timeout_s} s")
