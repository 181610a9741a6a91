"""The LLM client against real sim server processes over loopback: faults, timeouts, structured output, failover."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import jsonschema
import pytest

from matrix_hpc.services.llm.client import LLMClient
from matrix_hpc.services.llm.config import ClientConf, SimConf
from matrix_hpc.services.llm.contract import LLMRequestError, LLMUnavailableError
from matrix_hpc.services.llm.endpoints import StaticEndpoints
from matrix_hpc.services.llm.sim_server import SimServerProcess, new_api_key
from tests.integration.security_checks import cmdlines_with, files_with

pytestmark = pytest.mark.integration

FAST = {"ttft_s": 0.005, "time_per_output_token_s": 0.0001, "output_tokens": 16, "output_tokens_jitter": 8}
QUICK_RETRY = ClientConf(max_attempts=8, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=10.0)
KEY = new_api_key()  # every server of this module asks for it (several serve one client)


@contextmanager
def sim(**overrides: Any) -> Iterator[SimServerProcess]:
    with SimServerProcess(SimConf(**{**FAST, **overrides}), api_key=KEY) as server:
        yield server


async def stats(server: SimServerProcess) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {KEY.get()}"}
    async with aiohttp.ClientSession(headers=headers) as session, session.get(server.url + "/sim/stats") as resp:
        return dict(await resp.json())


def ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}]


async def test_retryable_faults_are_retried_until_success() -> None:
    with sim(error_rate=0.25, reset_rate=0.1, seed=3) as server:
        async with LLMClient(StaticEndpoints([server.url]), QUICK_RETRY, api_key=KEY) as client:
            results = await asyncio.gather(*(client.chat(ask(i), max_tokens=8) for i in range(200)))
        served = await stats(server)
    assert all(r.content and r.usage.completion_tokens > 0 for r in results)
    assert max(r.attempts for r in results) > 1
    assert served["fault_error"] > 10 and served["fault_reset"] > 3
    assert served["ok"] == 200  # each call answered exactly once


async def test_non_retryable_error_fails_at_once_with_the_server_message() -> None:
    with sim(max_model_len=64) as server:
        async with LLMClient(StaticEndpoints([server.url]), QUICK_RETRY, api_key=KEY) as client:
            ok = await client.chat(ask(0), max_tokens=8)
            with pytest.raises(LLMRequestError) as info:
                await client.chat([{"role": "user", "content": "long " * 200}], max_tokens=8)
        served = await stats(server)
    assert ok.content
    assert info.value.status == 400
    assert "maximum context length is 64 tokens" in str(info.value)
    assert served["requests"] == 2  # the rejected call was not retried


async def test_injected_bad_requests_are_not_retried() -> None:
    with sim(bad_request_rate=1.0) as server:
        async with LLMClient(StaticEndpoints([server.url]), QUICK_RETRY, api_key=KEY) as client:
            outcomes = await asyncio.gather(*(client.chat(ask(i)) for i in range(5)), return_exceptions=True)
        served = await stats(server)
    assert all(isinstance(o, LLMRequestError) and "context length" in o.server_message for o in outcomes)
    assert served["requests"] == 5


async def test_hang_is_cut_by_the_timeout() -> None:
    conf = ClientConf(max_attempts=2, backoff_base_s=0.01, timeout_s=0.4)
    with sim(hang_rate=1.0) as server:
        async with LLMClient(StaticEndpoints([server.url]), conf, api_key=KEY) as client:
            started = time.monotonic()
            with pytest.raises(LLMUnavailableError, match="no answer within 0.4 s"):
                await client.chat(ask(0))
            elapsed = time.monotonic() - started
            # A per-call timeout overrides the configured one.
            with pytest.raises(LLMUnavailableError, match="no answer within 0.1 s"):
                await client.chat(ask(1), timeout_s=0.1)
        served = await stats(server)
    assert 0.8 <= elapsed < 3.0
    assert served["fault_hang"] == 4


async def test_capacity_makes_requests_queue() -> None:
    with sim(capacity=2, ttft_s=0.3, time_per_output_token_s=0.0) as server:
        async with LLMClient(StaticEndpoints([server.url]), QUICK_RETRY, api_key=KEY) as client:
            await client.chat(ask(-1))  # connect first
            started = time.monotonic()
            await asyncio.gather(*(client.chat(ask(i)) for i in range(6)))
            elapsed = time.monotonic() - started
        served = await stats(server)
    assert served["max_in_flight"] == 2
    assert 0.85 <= elapsed < 2.0  # three waves of 0.3 s


async def test_structured_outputs_are_honoured() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 1, "maximum": 4},
                                               "why": {"type": "string"}}, "required": ["answer", "why"]}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "maximum": 5}},
        "required": ["query", "limit"]}}}
    with sim() as server:
        vllm_style = LLMClient(StaticEndpoints([server.url]), QUICK_RETRY, api_key=KEY)
        openai_style = LLMClient(StaticEndpoints([server.url]), ClientConf(dialect="openai"), api_key=KEY)
        try:
            choices = await asyncio.gather(*(vllm_style.chat(ask(i), choice=["A", "B", "C"]) for i in range(30)))
            wrapped = await asyncio.gather(*(openai_style.chat(ask(i), choice=["yes", "no"]) for i in range(10)))
            objects = await asyncio.gather(*(c.chat(ask(i), json_schema=schema) for i in range(10)
                                             for c in (vllm_style, openai_style)))
            called = await vllm_style.chat(ask(0), tools=[tool], tool_choice="required", n=3)
        finally:
            await vllm_style.close()
            await openai_style.close()
    assert {r.content for r in choices} == {"A", "B", "C"}
    assert {r.content for r in wrapped} <= {"yes", "no"}
    for r in objects:
        jsonschema.validate(json.loads(r.content or ""), schema)
    assert len(called.choices) == 3
    for c in called.choices:
        assert c.finish_reason == "tool_calls" and c.tool_calls[0]["function"]["name"] == "lookup"
        jsonschema.validate(json.loads(c.tool_calls[0]["function"]["arguments"]), tool["function"]["parameters"])


async def test_same_seed_same_answers() -> None:
    with sim(seed=11) as a, sim(seed=11) as b:
        async with LLMClient(StaticEndpoints([a.url]), QUICK_RETRY, api_key=KEY) as ca, LLMClient(StaticEndpoints([b.url]), QUICK_RETRY, api_key=KEY) as cb:
            ra = [await ca.chat(ask(i), temperature=0.7) for i in range(5)]
            rb = [await cb.chat(ask(i), temperature=0.7) for i in range(5)]
    assert [r.content for r in ra] == [r.content for r in rb]


async def test_a_dead_replica_is_avoided_and_no_call_is_lost() -> None:
    conf = ClientConf(max_attempts=8, backoff_base_s=0.01, backoff_max_s=0.05, health_probe_interval_s=0.2)
    with sim(ttft_s=0.05) as a, sim(ttft_s=0.05) as b:
        async with LLMClient(StaticEndpoints([a.url, b.url]), conf, api_key=KEY) as client:

            async def dialogue(task: int) -> list[str]:
                return [(await client.chat(ask(turn), sticky_key=f"task-{task}")).replica for turn in range(6)]

            run = asyncio.gather(*(dialogue(t) for t in range(40)))
            await asyncio.sleep(0.12)
            a.stop()  # kill -TERM: in-flight requests on it are lost and retried
            replicas_per_task = await run
            after = Counter([(await client.chat(ask(i))).replica for i in range(20)])
            down = [r.base_url for r in client.router.down()]
    assert len(replicas_per_task) == 40 and all(len(t) == 6 for t in replicas_per_task)
    assert any(a.url in r for t in replicas_per_task for r in t)  # a did serve before it died
    assert all(r.startswith(b.url) for r in after)
    assert down == [a.url + "/v1"]


async def test_sim_service_without_ray_runs_child_processes(tmp_path: Any) -> None:
    from matrix_hpc.services.llm.config import LLMConf
    from matrix_hpc.services.llm.service import _start_sim_processes

    service = _start_sim_processes(LLMConf(backend="sim", sim=SimConf(num_replicas=2, **FAST)), tmp_path)
    try:
        factory = service.client_factory()
        assert factory is not None and factory.api_key
        async with factory() as client:
            replicas = Counter(r.replica for r in await asyncio.gather(*(client.chat(ask(i)) for i in range(40))))
        key = str(factory.api_key.get())
        assert cmdlines_with(key) == []  # the children got it through their environment
        async with aiohttp.ClientSession() as session:
            for url in {r for r in replicas}:
                async with session.post(url + "/chat/completions", json={"messages": ask(0)}) as resp:
                    assert resp.status == 401
    finally:
        service.stop()
    assert len(replicas) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim-0.log", "sim-1.log"]
    assert files_with(key, [tmp_path]) == []


async def test_openai_backend_sends_the_env_key_and_never_writes_it(tmp_path: Any, monkeypatch: Any) -> None:
    from matrix_hpc.services.llm.config import LLMConf, OpenAIConf
    from matrix_hpc.services.llm.service import start_llm_service

    key = KEY.get()
    assert key
    monkeypatch.setenv("MATRIX_TEST_OPENAI_KEY", key)
    with sim() as server:
        conf = LLMConf(backend="openai", openai=OpenAIConf(base_url=server.url + "/v1", model="sim",
                                                            api_key_env="MATRIX_TEST_OPENAI_KEY", dialect="openai"))
        service = start_llm_service(conf, tmp_path)
        factory = service.client_factory()
        assert factory is not None and factory.conf.dialect == "openai"
        async with factory() as client:
            result = await client.chat(ask(0), choice=["left", "right"])
        service.stop()
    assert result.content in ("left", "right")
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert "service.json" in {p.name for p in tmp_path.rglob("*")} and key not in written
    assert key not in repr(service) and key not in repr(factory)
    assert start_llm_service(LLMConf(backend="none"), tmp_path).client_factory() is None


async def test_max_connections_queues_outside_the_timeout() -> None:
    # 3 connections, 12 calls of 0.3 s: 4 waves, 1.2 s, although each call's timeout is 0.5 s.
    conf = ClientConf(max_connections=3, timeout_s=0.5, max_attempts=1)
    with sim(ttft_s=0.3, time_per_output_token_s=0.0) as server:
        async with LLMClient(StaticEndpoints([server.url]), conf, api_key=KEY) as client:
            started = time.monotonic()
            results = await asyncio.gather(*(client.chat(ask(i)) for i in range(12)))
            elapsed = time.monotonic() - started
        served = await stats(server)
    assert all(r.attempts == 1 for r in results)
    assert served["max_in_flight"] == 3 and 1.15 <= elapsed < 2.5


async def test_server_processes_share_one_port_and_stop_together() -> None:
    import psutil

    with SimServerProcess(SimConf(**FAST), workers=2, api_key=KEY) as server:
        assert server.proc is not None
        workers = psutil.Process(server.proc.pid).children()
        assert len(workers) == 1  # the parent serves too
        async with LLMClient(StaticEndpoints([server.url]), QUICK_RETRY, api_key=KEY) as client:
            results = await asyncio.gather(*(client.chat(ask(i)) for i in range(100)))
    assert all(r.content for r in results)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def test_standalone_server_wants_its_key_from_the_environment() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MATRIX_SIM_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "matrix_hpc.services.llm.sim_server", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "set MATRIX_SIM_API_KEY" in proc.stderr and "--no-auth" in proc.stderr
