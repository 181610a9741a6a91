"""workflow=tau2 on each domain with over 1,000 dialogues in flight at once on llm=sim.

Each task's environment is a process of its own, forked by the worker's warm
server inside a bubblewrap sandbox (``workflow.env_server=auto`` -> fork);
the sandbox-per-task path is test_workflow_tau2_bwrap.py. Each dialogue is
cut at 4 steps, so every task makes LLM calls, runs tool calls (both sides'
in telecom) and is scored. Afterwards no sandbox dir and no process of the
run is left.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.workflows.tau2.rows import task_rows
from tests.integration.runs import read_rows, run_cli, write_jsonl
from tests.integration.sandbox_support import processes_matching

pytestmark = [pytest.mark.integration, pytest.mark.bwrap, pytest.mark.timeout(400)]

TRIALS = {"retail": 9, "airline": 21, "telecom": 9}  # base tasks x trials: 1,026, 1,050, 1,026 rows


@pytest.mark.parametrize("domain", ["retail", "airline", "telecom"])
def test_a_thousand_concurrent_dialogues(domain: str, tmp_path: Path) -> None:
    trials = TRIALS[domain]
    rows = list(task_rows(domain, trials=trials))
    data = write_jsonl(tmp_path / "tasks.jsonl", rows)
    scratch = tmp_path / "sandboxes"
    t0 = time.monotonic()
    proc = run_cli(
        "workflow=tau2", f"workflow.domain={domain}", f"workflow.trials={trials}", "workflow.max_steps=4",
        "workflow.require_sandbox=true", "llm=sim", "sandbox=bwrap", f"sandbox.scratch_root={scratch}",
        f"dataset=tau2_{domain}", f"dataset.path={data}", f"output.dir={tmp_path / 'out'}",
        "run.max_concurrent_tasks=2000", "llm.sim.capacity=2000", "llm.sim.ttft_s=0.01",
        "llm.sim.output_tokens=16", "llm.sim.output_tokens_jitter=8", "llm.sim.tool_call_rate=0.7",
        timeout_s=360,
    )
    wall_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_rows(tmp_path / "out")
    assert len(out) == len(rows) and {r["id"] for r in out} == {r["id"] for r in rows}
    assert {r["status"] for r in out} == {"ok"}, [r["error"] for r in out if r["error"]][:2]
    assert all(0.0 <= r["reward"] <= 1.0 for r in out)
    assert {r["termination_reason"] for r in out} <= {"max_steps", "user_stop", "agent_stop", "user_error",
                                                       "agent_error", "too_many_errors"}
    assert sum(r["num_tool_calls"] for r in out) > len(out) / 2  # the environments answered tool calls
    assert domain != "telecom" or sum(r["num_user_tool_calls"] for r in out) > 0  # the phone's tools too
    assert {r["env_backend"] for r in out} == {"fork"} and {r["domain"] for r in out} == {domain}
    assert len({r["trial_seed"] for r in out}) == trials
    peak = max_in_flight(out)
    assert peak >= 1000
    assert not list(scratch.iterdir()), "sandbox dirs left behind"
    assert not processes_matching(str(scratch)), "sandboxes left running"
    assert not processes_matching("matrix_hpc.workflows.tau2.forkserver"), "environment processes left behind"
    print(f"{len(out)} {domain} dialogues on llm=sim: {wall_s:.0f} s wall (startup included), {peak} in flight")



def max_in_flight(rows: list[dict[str, Any]]) -> int:
    events = sorted([(r["t_admitted"], 1) for r in rows] + [(r["t_finished"], -1) for r in rows])
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    return peak
