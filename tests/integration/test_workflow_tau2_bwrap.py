"""workflow=tau2 on each domain with real bubblewrap sandboxes (one environment server per task) and llm=sim.

``workflow.env_server=per_task`` here: a sandbox leased per task (the forked
default is test_workflow_tau2_scale.py's, at 1,000 concurrent).

Real Ray, simulated LLM replicas (random text and tool calls built from the
tool schemas), a sandbox leased per task. Checks: one row per input, every
row ok with a reward in [0, 1] and its trajectory in tau2's format, tool
calls answered inside the sandboxes, and nothing left behind (no sandbox
dirs, no bwrap, no environment server). A secret given to the sandboxes
(``sandbox.env``, as ``${oc.env:...}``) stays out of the rows, the log and
the stored config. ``matrix-hpc export tau2`` reads the output back as
tau2's results JSON (checked against tau2's own schema).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import jsonschema
import pytest

from matrix_hpc.cli.export_cmd import export_command
from matrix_hpc.workflows.tau2.export import metrics
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
    secret = f"canary-{uuid.uuid4().hex}"
    proc = run_cli(
        "workflow=tau2", f"workflow.domain={domain}", "llm=sim", "sandbox=bwrap", f"dataset.path={data}",
        f"output.dir={tmp_path / 'out'}", f"sandbox.scratch_root={scratch}", "sandbox.pool.size=3",
        "workflow.max_steps=8", "workflow.require_sandbox=true", "workflow.env_server=per_task", "llm.sim.tool_call_rate=0.8",
        "+sandbox.env.HF_TOKEN=${oc.env:MHPC_TEST_SANDBOX_SECRET}",
        timeout_s=240, env={**os.environ, "MHPC_TEST_SANDBOX_SECRET": secret},
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
    assert processes_matching("matrix_hpc.workflows.tau2.forkserver") == []
    # the sandboxes' secret: in no row (decoded), log line or output file; the stored config redacts it
    assert secret not in json.dumps(list(out.values()), default=str) and secret not in proc.stdout + proc.stderr
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] == []
    stored = (tmp_path / "out" / "_matrix" / "config.yaml").read_text()
    assert re.search(r"HF_TOKEN: '?\*\*\*'?", stored), stored
    # read back as tau2's results JSON: one simulation per ok row, tau2's schema, the rows' rewards
    assert export_command(["tau2", str(tmp_path / "out"), str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    schema = json.loads((Path(__file__).parents[1] / "data" / "tau2_golden" / "export_check.json").read_text())["schema"]
    jsonschema.validate(results, schema)
    assert {s["id"]: s["reward_info"]["reward"] for s in results["simulations"]} == {
        i: r["reward"] for i, r in out.items()}
    assert {t["id"] for t in results["tasks"]} == {r["task_id"] for r in rows}
    assert metrics(results)["avg_reward"] == sum(r["reward"] for r in out.values()) / len(out)
