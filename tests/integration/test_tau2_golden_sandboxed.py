"""Every base task's gold actions through the sandboxed environment the workflow uses, against tau2's outputs.

The same golden files as tests/unit/test_tau2_golden.py (written by real
tau2-bench a2c02472), but each task's environment is what a run with
``sandbox=bwrap`` builds: a process of its own forked by the warm server in a
bubblewrap sandbox, with the package and the data copied into its scratch
dir, reached over its socket. The actions go as ``call`` requests (no sync
between them, as tau2's evaluator replays gold actions), then ``hash``.
A second pass (retail) does the same through ``env_server=per_task``
sandboxes. Nothing may be left behind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.services.sandbox.client import make_sandbox_pool
from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.workflows.tau2.sessions import EnvSessions
from matrix_hpc.workflows.tau2.tasks import load_tasks
from tests.integration.sandbox_support import processes_matching
from tests.tau2_golden_support import assert_same, gold_actions, golden_rows

pytestmark = [pytest.mark.integration, pytest.mark.bwrap, pytest.mark.timeout(300)]


async def _replay_all(domain: str, scratch: Path, env_server: str, limit: int | None) -> list[dict[str, Any]]:
    pool = make_sandbox_pool(SandboxConf(backend="bwrap", scratch_root=str(scratch), pool=SandboxPoolConf(
        mode="local", size=8, max_per_node=8)))
    sessions = EnvSessions(domain, pool, start_timeout_s=120, request_timeout_s=60, env_server=env_server)
    tasks = load_tasks(domain, "base")[:limit]
    gate = asyncio.Semaphore(8)

    async def one(task: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            env = await sessions.open(task["id"], 1, task)
            assert env.backend == ("fork" if env_server == "fork" else "sandbox")
            calls = [{"name": a.name, "arguments": a.arguments, "requestor": a.requestor} for a in gold_actions(task)]
            outputs = (await env.request({"op": "call", "calls": calls}))["outputs"] if calls else []  # type: ignore[attr-defined]
            hashes = await env.request({"op": "hash"})  # type: ignore[attr-defined]
            await sessions.on_task_end(task["id"])
            return {"task_id": task["id"], "outputs": outputs, **{k: hashes[k] for k in ("db_hash", "user_db_hash")}}

    try:
        return list(await asyncio.gather(*(one(dict(t)) for t in tasks)))
    finally:
        await sessions.close()
        await pool.close()


@pytest.mark.parametrize(("domain", "golden", "count"), [
    ("retail", "retail.jsonl.gz", 114), ("airline", "airline.jsonl.gz", 50), ("telecom", "telecom.jsonl.gz", 114)])
def test_gold_actions_in_forked_sandboxed_environments_match_tau2(domain: str, golden: str, count: int,
                                                                   tmp_path: Path) -> None:
    expected = {row["task_id"]: row for row in golden_rows(golden)}
    got = asyncio.run(_replay_all(domain, tmp_path / "sb", "fork", None))
    assert len(got) == len(expected) == count
    for row in got:
        assert_same(row, expected[row["task_id"]])
    assert [p.name for p in (tmp_path / "sb").iterdir() if not p.name.startswith(".")] == []
    assert processes_matching(str(tmp_path / "sb")) == []


def test_gold_actions_in_a_sandbox_per_task_match_tau2(tmp_path: Path) -> None:
    expected = {row["task_id"]: row for row in golden_rows("retail.jsonl.gz")}
    got = asyncio.run(_replay_all("retail", tmp_path / "sb", "per_task", 16))
    assert len(got) == 16
    for row in got:
        assert_same(row, expected[row["task_id"]])
    assert [p.name for p in (tmp_path / "sb").iterdir() if not p.name.startswith(".")] == []
