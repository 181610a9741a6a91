"""workflow=retail_tool_use with real bubblewrap sandboxes: a tool server per task.

1. ``matrix-hpc run workflow=retail_tool_use llm=sim sandbox=bwrap`` on 20 tau2
   tasks (real Ray, simulated LLM replicas, real sandboxes): one row per input,
   tool calls answered by the sandboxed servers, and nothing left behind.
2. The gold actions of a writing task, sent through a real sandboxed session,
   score 1 (the DB hash and the gold replay both come from inside the sandbox);
   skipping a write scores 0.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.workflows.retail.tasks import iter_task_rows
from tests.integration.runs import REPO, cli, read_rows, run_cli, write_jsonl
from tests.integration.sandbox_support import processes_matching

pytestmark = [pytest.mark.integration, pytest.mark.needs("bwrap", "tau2_retail"), pytest.mark.timeout(600)]

NUM_TASKS = 20


def test_run_on_bwrap_sandboxes_writes_every_row_and_leaves_nothing(tmp_path: Path) -> None:
    rows = list(itertools.islice(iter_task_rows(split="test"), NUM_TASKS))
    data = write_jsonl(tmp_path / "tasks.jsonl", rows, extra_lines=['{"id": "broken", "text": "not a task"}'])
    scratch = tmp_path / "sandboxes"
    proc = run_cli(
        "workflow=retail_tool_use", "llm=sim", "sandbox=bwrap", "dataset=tau2_retail", f"dataset.path={data}",
        f"output.dir={tmp_path / 'out'}", f"sandbox.scratch_root={scratch}", "sandbox.pool.size=8",
        "workflow.max_steps=10", "workflow.require_sandbox=true", "llm.sim.tool_call_rate=0.8",
        timeout_s=480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {r["id"]: r for r in read_rows(tmp_path / "out")}
    broken = [r for r in out.values() if r["status"] == "failed"]
    assert len(broken) == 1 and "user_scenario" in broken[0]["error"]  # the row without task columns
    del out[broken[0]["id"]]
    assert set(out) == {r["id"] for r in rows}
    assert {r["status"] for r in out.values()} == {"ok"}, [r["error"] for r in out.values() if r["error"]][:3]
    assert {r["env_backend"] for r in out.values()} == {"sandbox"}
    assert {r["termination_reason"] for r in out.values()} <= {"max_steps", "too_many_errors"}
    calls = [c for r in out.values() for c in r["tool_calls"]]
    assert len(calls) >= NUM_TASKS  # the sim's tool calls reached the sandboxed servers...
    assert any(not c["error"] for c in calls)  # ...and some of them succeeded there
    for r in out.values():
        result = json.loads(r["result"])
        answers = [m for m in result["trajectory"] if m["role"] == "tool"]
        assert len(answers) == r["num_tool_calls"] + _malformed(result)
        assert r["reward"] == 0.0 and len(result["final_db_hash"]) == 64  # random text never completes a task
    # every sandbox was released and stopped: no dirs, no servers, no bwrap under our scratch root
    assert not scratch.exists() or [p.name for p in scratch.iterdir() if not p.name.startswith(".")] == []
    assert processes_matching(str(scratch)) == []
    assert processes_matching("matrix_hpc.workflows.retail.tool_server --db /scratch/db.json") == []


def test_a_sandbox_env_secret_stays_out_of_command_lines_logs_stored_config_and_rows(tmp_path: Path) -> None:
    """The secret goes in as ``${oc.env:...}``, so not even the run's own command line holds it."""
    secret = f"canary-{uuid.uuid4().hex}"
    rows = list(itertools.islice(iter_task_rows(split="test"), 4))
    data = write_jsonl(tmp_path / "tasks.jsonl", rows)
    scratch, out, logs = tmp_path / "sandboxes", tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    started = time.time()  # wall time: compared with the mtimes of Ray's log files
    with open(logs / "stdout", "wb") as stdout, open(logs / "stderr", "wb") as stderr:
        proc = subprocess.Popen(cli(
            "workflow=retail_tool_use", "llm=sim", "sandbox=bwrap", "dataset=tau2_retail", f"dataset.path={data}",
            f"output.dir={out}", f"sandbox.scratch_root={scratch}", "sandbox.pool.size=4", "workflow.max_steps=6",
            "workflow.require_sandbox=true", "+sandbox.env.HF_TOKEN=${oc.env:MHPC_TEST_SANDBOX_SECRET}",
        ), cwd=REPO, env={**os.environ, "MHPC_TEST_SANDBOX_SECRET": secret}, stdout=stdout, stderr=stderr)
        leaks, scans_with_sandboxes = _scan_cmdlines_while(proc, secret, str(scratch))
    assert proc.returncode == 0, (logs / "stderr").read_text()[-3000:]
    assert leaks == [] and scans_with_sandboxes > 0  # scanned while sandboxes ran; never in any argv
    assert {r["status"] for r in read_rows(out)} == {"ok"}
    assert secret not in json.dumps(read_rows(out), default=str)  # rows, decoded (Parquet is compressed)
    searched = _files_holding(secret, [out, logs, *_ray_logs_since(started)])
    assert searched["holding"] == [] and searched["files"] > 3, searched
    stored = (out / "_matrix" / "config.yaml").read_text()
    assert re.search(r"HF_TOKEN: '?\*\*\*'?", stored), stored  # the key is kept, its value redacted


def _scan_cmdlines_while(proc: subprocess.Popen[bytes], secret: str, marker: str) -> tuple[list[str], int]:
    """Read every process's /proc/<pid>/cmdline (world-readable) until ``proc`` exits."""
    leaks: list[str] = []
    with_sandboxes = 0
    while proc.poll() is None:
        for path in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                cmdline = path.read_bytes()
            except OSError:
                continue  # exited meanwhile
            leaks += [path.parent.name] if secret.encode() in cmdline else []
            with_sandboxes += marker.encode() in cmdline and b"bwrap" in cmdline
        time.sleep(0.05)
    return leaks, with_sandboxes


def _ray_logs_since(started: float) -> list[Path]:
    """Ray session dirs (its own logs) written by runs since ``started``."""
    return [d for d in Path("/tmp/ray").glob("session_2*") if d.is_dir() and d.stat().st_mtime >= started - 5]


def _files_holding(secret: str, roots: list[Path]) -> dict[str, Any]:
    holding, files = [], 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                files += 1
                try:
                    if secret.encode() in path.read_bytes():
                        holding.append(str(path))
                except OSError:
                    pass  # a socket or a file gone meanwhile
    return {"holding": holding, "files": files}


def _malformed(result: dict[str, Any]) -> int:
    return sum(1 for m in result["trajectory"] if m.get("tool_calls")
               and m["tool_calls"][0]["function"]["name"] == "invalid_tool_call")


async def test_gold_actions_through_a_real_sandbox_score_one(tmp_path: Path) -> None:
    from matrix_hpc.services.sandbox.client import make_sandbox_pool
    from matrix_hpc.services.sandbox.contract import SandboxConf
    from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
    from matrix_hpc.workflows.retail.client import evaluate_client
    from matrix_hpc.workflows.retail.env import is_write_tool
    from matrix_hpc.workflows.retail.sessions import EnvSessions
    from matrix_hpc.workflows.retail.tasks import load_tasks

    task = next(t for t in load_tasks() if sum(is_write_tool(a.name) for a in t.actions) >= 2)
    pool = make_sandbox_pool(SandboxConf(backend="bwrap", scratch_root=str(tmp_path / "sb"),
                                         pool=SandboxPoolConf(mode="local", size=2)))
    sessions = EnvSessions(None, pool, server_timeout_s=60, request_timeout_s=30)
    try:
        said = [f"FYI {info}" for info in task.communicate_info]
        scores = []
        for skip in (False, True):
            session = await sessions.open(f"{task.id}-{skip}", attempt=1)
            assert session.backend == "sandbox"
            last_write = max(i for i, a in enumerate(task.actions) if is_write_tool(a.name))
            for i, action in enumerate(task.actions):
                if not (skip and i == last_write):
                    await session.client.call(action.name, action.arguments)
            info = await evaluate_client(session.client, task, said, "user_stop")
            scores.append((info.reward, info.db_match))
            await sessions.on_task_end(f"{task.id}-{skip}")
        assert scores == [(1.0, True), (0.0, False)]
        assert sessions.sessions == {} and (await pool.stats()).live == 0
    finally:
        await sessions.close()
        await pool.close()
    assert processes_matching(str(tmp_path / "sb")) == []
