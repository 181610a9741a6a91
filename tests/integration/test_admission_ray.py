"""Admission on a real local Ray against a real sim server: standby tasks
(``run.standby_tasks``) start at their worker the moment a task ends there,
and ``run.max_concurrent_tasks`` still bounds the calls the endpoint sees,
with one worker (every credit swapped at the worker) and with two (credits
that come back from one worker start the other's standby tasks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from matrix_hpc.config.schema import OutputConf, RunConf
from matrix_hpc.runtime.driver import Driver, RunPlan
from matrix_hpc.services.llm.config import ClientConf, SimConf
from matrix_hpc.services.llm.endpoints import StaticEndpoints
from matrix_hpc.services.llm.service import LLMClientFactory
from matrix_hpc.services.llm.sim_server import SimServerProcess, new_api_key
from matrix_hpc.store.input import DatasetConf
from matrix_hpc.workflows.generate import GenerateConf
from tests.integration.runs import read_rows, without_timing

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray")]

KEY = new_api_key()
# Calls of 20-60 ms (output lengths vary), so that tasks end one by one, not in waves.
SIM = SimConf(ttft_s=0.02, time_per_output_token_s=0.002, output_tokens=12, output_tokens_jitter=8, seed=5)


async def served(server: SimServerProcess) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {KEY.get()}"}
    async with aiohttp.ClientSession(headers=headers) as session, session.get(server.url + "/sim/stats") as resp:
        return dict(await resp.json())


async def run_generate(tmp_path: Path, server: SimServerProcess, name: str, n: int,
                       **run: Any) -> tuple[Any, list[dict[str, Any]]]:
    data = tmp_path / "in.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"id": f"p{i:04d}", "question": f"Question {i}?"}) + "\n"
                                for i in range(n)))
    factory = LLMClientFactory(StaticEndpoints([server.url]), ClientConf(), "sim", KEY)
    plan = RunPlan(GenerateConf(max_tokens=16), DatasetConf(path=str(data)), OutputConf(dir=str(tmp_path / name)),
                   RunConf(progress_interval_s=0, seed=3, **run), services={"llm": factory})
    result = await Driver(plan).run()
    return result, read_rows(tmp_path / name)


@pytest.mark.parametrize("workers", [1, 2])
async def test_standby_tasks_never_raise_the_calls_in_flight_above_the_limit(
        local_ray: None, tmp_path: Path, workers: int) -> None:
    n, limit = 400, 8
    with SimServerProcess(SIM, api_key=KEY) as server:
        result, rows = await run_generate(tmp_path, server, "out", n, max_concurrent_tasks=limit,
                                          num_workers=workers)
        seen = await served(server)
    assert result.outcome == "finished", result.problems
    assert sorted(r["id"] for r in rows) == [f"p{i:04d}" for i in range(n)]
    assert {r["status"] for r in rows} == {"ok"}
    assert seen["ok"] == n  # one call per task: no task ran twice
    assert seen["max_in_flight"] == limit  # the limit was reached and never passed
    started_there = sum(w["standby_starts"] for w in result.worker_stats)
    assert started_there > n // 2, result.worker_stats  # most credits never went back to the driver


async def test_without_standby_tasks_the_rows_are_the_same(local_ray: None, tmp_path: Path) -> None:
    n = 200
    with SimServerProcess(SIM, api_key=KEY) as server:
        with_standby, rows = await run_generate(tmp_path, server, "standby", n, max_concurrent_tasks=16)
        without, rows_without = await run_generate(tmp_path, server, "none", n, max_concurrent_tasks=16,
                                                   standby_tasks=0)
        seen = await served(server)
    assert seen["max_in_flight"] <= 16 and seen["ok"] == 2 * n
    assert sum(w["standby_starts"] for w in with_standby.worker_stats) > 0
    assert sum(w["standby_starts"] for w in without.worker_stats) == 0
    assert len(rows) == n
    assert sorted(map(without_timing, rows), key=lambda r: r["id"]) == sorted(map(without_timing, rows_without),
                                                                              key=lambda r: r["id"])
