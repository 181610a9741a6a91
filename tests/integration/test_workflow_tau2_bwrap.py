"""workflow=tau2 on each domain with real bubblewrap sandboxes (one environment server per task) and llm=sim.

Real Ray, simulated LLM replicas (random text and tool calls built from the
tool schemas), a sandbox leased per task. Checks: one row per input, every
row ok with a reward in [0, 1] and its trajectory in tau2's format, tool
calls answered inside the sandboxes, and nothing left behind (no sandbox
dirs, no bwrap, no environment server).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matrix_hpc.workflows.tau2.rows import task_rows
from tests.integration.runs import read_rows, run_cli, write_jsonl
from tests.integration.sandbox_support import processes_matching

pytestmark = [pytest.mark.integration, pytest.mark.needs("bwrap"), pytest.mark.timeout(300)]

NUM_TASKS = 3


@pytest.mark.parametrize("domain", ["retail", "airline", "telecom"])
def test_dialogues_in_sandboxes_write_every_row_and_leave_nothing(domain: str, tmp_path: Path) -> None:
    rows = list(task_rows(domain))[:NUM_TASKS]
    data = write_jsonl(tmp_path / "tasks.jsonl", rows, extra_lines=['{"id": "broken", "text": "not a task"}'])
    scratch = tmp_path / "sandboxes"
    proc = run_cli(
        "workflow=tau2", f"workflow.domain={domain}", "llm=sim", "sandbox=bwrap", f"dataset.path={data}",
        f"output.dir={tmp_path / 'out'}", f"sandbox.scratch_root={scratch}", "sandbox.pool.size=3",
        "workflow.max_steps=8", "workflow.require_sandbox=true", "llm.sim.tool_call_rate=0.8",
        timeout_s=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {r["id"]: r for r in read_rows(tmp_path / "out")}
    assert out.pop("broken")["status"] == "failed"  # named: the row is not a tau2 task row
    assert set(out) == {r["id"] for r in rows}
    assert {r["status"] for r in out.values()} == {"ok"}, [r["error"] for r in out.values()][:2]
    assert {r["env_backend"] for r in out.values()} == {"sandbox"}
    for r in out.values():
        assert 0.0 <= r["reward"] <= 1.0 and r["domain"] == domain
        traj = json.loads(r["tau2_messages"])
        assert traj[0]["content"] == "Hi! How can I help you today?"
        assert sum(m["role"] == "tool" for m in traj) == r["num_tool_calls"]
        assert r["messages"]  # matrix_hpc's own columns too
    assert sum(r["num_tool_calls"] for r in out.values()) >= 1  # the sim's calls reached the sandboxed servers
    assert not scratch.exists() or [p.name for p in scratch.iterdir() if not p.name.startswith(".")] == []
    assert processes_matching(str(scratch)) == []
    assert processes_matching("matrix_hpc.workflows.tau2.server") == []
