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
from matrix_hpc.services.llm.service import LLMService, sim_actor_name, sim_service_ref, start_llm_service

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

CLIENT = ClientConf(max_attempts=10, backoff_base_s=0.02, backoff_max_s=0.2, health_probe_interval_s=0.2,
                    refresh_interval_s=0.2, timeout_s=20.0)


@pytest.fixture
def service(local_ray: None, tmp_path: Path) -> Iterator[LLMService]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    conf = LLMConf(
        backend="sim",
        service=name,
        client=CLIENT,
        sim=SimConf(num_replicas=2, ttft_s=0.05, time_per_output_token_s=0.0005, output_tokens=20),
    )
    # Something registered in this service's registry before its replicas: dropped at start.
    registry = get_or_create_registry(sim_service_ref(conf))  # held: a registry ends with its last handle
    ray.get(registry.register.remote("sim-7", "http://127.0.0.1:9"))
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
    victim = ray.get_actor(sim_actor_name(sim_service_ref(service.conf), 0), namespace=NAMESPACE)
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


async def test_replicas_refuse_requests_without_the_service_key(service: LLMService) -> None:
    import aiohttp

    _, table = await service.endpoint_source().fetch()
    factory = service.client_factory()
    assert factory is not None and factory.api_key
    body = {"model": "sim", "messages": ask(0)}
    async with aiohttp.ClientSession() as session:
        for url in table.values():
            root = url.removesuffix("/v1")
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with session.post(url + "/chat/completions", json=body, headers=headers) as resp:
                    assert resp.status == 401, await resp.text()
                async with session.get(root + "/sim/stats", headers=headers) as resp:
                    assert resp.status == 401
            async with session.get(root + "/health") as resp:  # liveness stays open and says nothing
                assert resp.status == 200 and await resp.read() == b""
            good = {"Authorization": f"Bearer {factory.api_key.get()}"}
            async with session.post(url + "/chat/completions", json=body, headers=good) as resp:
                assert resp.status == 200
    from tests.integration.security_checks import cmdlines_with

    assert cmdlines_with(str(factory.api_key.get())) == []  # the replicas got it as actor arguments


def test_a_second_run_asking_for_the_same_service_is_refused(service: LLMService) -> None:
    """Another Ray job (another run's driver) must not share or take over this run's registry."""
    import os
    import subprocess
    import sys

    ref = sim_service_ref(service.conf)
    code = ("import sys, ray\n"
            "from matrix_hpc.services.llm.registry import RegistryConflictError, ServiceRef, get_or_create_registry\n"
            "ray.init(address=sys.argv[1], namespace='matrix_hpc', log_to_driver=False)\n"
            "try:\n"
            "    get_or_create_registry(ServiceRef(sys.argv[2], sys.argv[3]))\n"
            "except RegistryConflictError as e:\n"
            "    print('REFUSED', e)\n")
    address = ray.get_runtime_context().gcs_address
    # The test's Ray is started as a run's (cluster/local_ray.py): bound to 127.0.0.1, which a second driver
    # on this host reaches as a local node only with Ray's switch for that (monitoring.loopback_local_ray).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-c", code, address, ref.name, ref.digest], capture_output=True,
                          text=True, timeout=120, env=env)
    assert "REFUSED" in proc.stdout, proc.stderr[-2000:]
    assert f"LLM service {ref.name!r}" in proc.stdout and "set another llm.service name" in proc.stdout
