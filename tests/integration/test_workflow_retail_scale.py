"""workflow=retail_tool_use at 10,000 concurrent tasks on llm=sim (real Ray, simulated replicas).

The environments run in-process (``sandbox=disabled``, so each task gets a
copy-on-write RetailEnv): 10,000 bubblewrap sandboxes, one tool server each
(~30 MB, ~0.2 CPU-s to start), do not fit a 2-core, 24 GB box; sandboxed
runs are covered by test_workflow_retail_bwrap.py. Each dialogue is cut to
4 messages (greeting, user, one agent tool call, its result), so every task
makes two LLM calls and one tool call and 10,000 are in flight at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.workflows.retail.db import DATA_DIR_ENV, default_data_dir
from matrix_hpc.workflows.retail.tasks import write_rows_jsonl
from tests.conftest import require_component
from tests.integration.runs import read_rows, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TRIALS = 88  # 114 tasks x 88 = 10,032 rows


def test_ten_thousand_concurrent_dialogues(tmp_path: Path) -> None:
    require_component((default_data_dir() / "db.json").exists(), "tau2-bench retail data",
                      f"put db.json/tasks.json in ../shared/data/tau2_retail or set ${DATA_DIR_ENV}")
    data = tmp_path / "tasks.jsonl"
    n = write_rows_jsonl(data, trials=TRIALS)
    assert n == 114 * TRIALS
    t0 = time.monotonic()
    proc = run_cli(
        "workflow=retail_tool_use", "llm=sim", "sandbox=disabled", "dataset=tau2_retail", f"dataset.path={data}",
        f"output.dir={tmp_path / 'out'}", "run.max_concurrent_tasks=10000", "run.num_workers=2",
        "workflow.max_steps=4",
        "llm.sim.capacity=5000", "llm.sim.ttft_s=0.01", "llm.sim.output_tokens=16", "llm.sim.output_tokens_jitter=8",
        "llm.sim.tool_call_rate=1.0",
        timeout_s=540,
    )
    wall_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "out")
    peak = max_in_flight(rows)
    assert peak >= 10_000  # all admitted at once, not trickled
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["env_backend"] for r in rows} == {"local"}
    assert {r["termination_reason"] for r in rows} == {"max_steps"}
    assert {r["num_tool_calls"] for r in rows} == {1}  # every task's tool call was run by its environment
    print(f"10,032 retail dialogues on llm=sim: {wall_s:.0f} s wall (startup included), {peak} in flight at once")


def max_in_flight(rows: list[dict[str, Any]]) -> int:
    """Most tasks between admission and finish at one moment (from the rows' own timestamps)."""
    events = sorted([(r["t_admitted"], 1) for r in rows] + [(r["t_finished"], -1) for r in rows],
                    key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    return peak
