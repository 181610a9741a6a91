"""``export tau2``: a workflow=tau2 output as tau2-bench's results JSON, checked against tau2 itself.

The sample is built from real dialogues (the scripted gold agent, and one
that skips a write) on the real environments, turned into output rows by
the store's own row builder. ``tests/data/tau2_golden/export_check.json`` is
what tau2-bench a2c02472 made of that sample (``scripts/tau2_export_check.py``
in a venv with tau2 installed): its ``Results`` JSON schema and its
``compute_metrics``. Regenerate both with::

    .venv/bin/python -m tests.unit.test_tau2_export tests/data/tau2_golden/export_sample.json
    /work/tau2venv/bin/python scripts/tau2_export_check.py tests/data/tau2_golden/export_sample.json
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from matrix_hpc.store.rows import task_row
from matrix_hpc.workflows.tau2.export import ExportError, export_tau2, metrics
from matrix_hpc.workflows.tau2.rows import task_rows
from matrix_hpc.workflows.tau2.workflow import RESULT_COLUMNS
from tests.unit.test_tau2_dialogue import ScriptedLLM, airline_task_with_writes, calls, gold_script, run_dialogue, text

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "tau2_golden"
CONFIG = """workflow:
  name: tau2
  domain: airline
  trials: 2
  max_steps: 200
  max_errors: 10
  agent_temperature: 0.0
  user_temperature: 0.0
llm:
  backend: sim
"""


def _airline_tasks_with_writes(n: int) -> list[dict[str, Any]]:
    first = airline_task_with_writes()
    from matrix_hpc.workflows.tau2.tasks import load_tasks

    others = [t for t in load_tasks("airline") if t["id"] != first["id"]
              and any(a["name"].startswith(("book", "cancel", "update")) for a in
                      t["evaluation_criteria"].get("actions") or [])
              and not t["evaluation_criteria"].get("communicate_info")]
    return [first, *others[: n - 1]]


async def _dialogue(task: dict[str, Any], trial_row: dict[str, Any], skip_last_write: bool) -> dict[str, Any]:
    agent = gold_script(task, "assistant")
    if skip_last_write:
        agent = agent[:-1]
    llm = ScriptedLLM(agent=[*agent, text("Done. ###STOP###")], user=[text("I need help."), text("###STOP###")])
    state = await run_dialogue(llm, trial_row, domain="airline", trials=2)
    return task_row(state, "run-sample", extra=list(RESULT_COLUMNS))


def sample_rows() -> list[dict[str, Any]]:
    """Two airline tasks x two trials: task A solved twice, task B once (the other skips its last write),
    one row failed (not exported)."""
    tasks = _airline_tasks_with_writes(2)
    rows = list(task_rows("airline", None, [t["id"] for t in tasks], trials=2))
    by_id = {(r["task_id"], r["trial"]): r for r in rows}
    plan = [(tasks[0], 0, False), (tasks[0], 1, False), (tasks[1], 0, False), (tasks[1], 1, True)]
    out = [asyncio.run(_dialogue(t, by_id[(t["id"], trial)], skip)) for t, trial, skip in plan]
    out.append({"id": "broken", "status": "failed", "input": "{}", "result": None})
    return out


def export_sample(tmp: Path) -> dict[str, Any]:
    out = tmp / "out"
    (out / "_matrix").mkdir(parents=True)
    (out / "_matrix" / "config.yaml").write_text(CONFIG)
    summary = export_tau2(out, tmp / "results.json", sample_rows())
    assert (summary.simulations, summary.tasks, summary.skipped) == (4, 2, {"failed": 1})
    return json.loads((tmp / "results.json").read_text())


def _stable(results: dict[str, Any]) -> dict[str, Any]:
    """The results without what changes run to run (times, durations)."""
    drop = {"timestamp", "start_time", "end_time", "duration"}
    return {**{k: v for k, v in results.items() if k != "timestamp"},
            "simulations": [{k: v for k, v in s.items() if k not in drop} for s in results["simulations"]]}


def test_export_is_tau2s_results_json_and_tau2s_metrics_agree(tmp_path: Path) -> None:
    results = export_sample(tmp_path)
    check = json.loads((GOLDEN / "export_check.json").read_text())
    jsonschema.validate(results, check["schema"])  # tau2's Results.model_json_schema()
    sample = json.loads((GOLDEN / "export_sample.json").read_text())
    assert _stable(results) == _stable(sample)  # the file tau2 loaded and scored (scripts/tau2_export_check.py)
    ours = metrics(results)
    assert ours["avg_reward"] == pytest.approx(check["metrics"]["avg_reward"]) == 0.75
    assert {str(k): v for k, v in ours["pass_hat_ks"].items()} == pytest.approx(check["metrics"]["pass_hat_ks"])
    assert (ours["total_simulations"], ours["total_tasks"]) == (check["simulations"], check["tasks"])
    sims = results["simulations"]
    assert [s["reward_info"]["reward"] for s in sims] == [1.0, 1.0, 1.0, 0.0]
    assert [m["turn_idx"] for m in sims[0]["messages"]] == list(range(len(sims[0]["messages"])))
    assert sims[3]["reward_info"]["db_check"] == {"db_match": False, "db_reward": 0.0}


def test_a_premature_end_is_scored_as_tau2_notes_it(tmp_path: Path) -> None:
    row = task_rows("airline").__next__()
    llm = ScriptedLLM(agent=[calls(("get_user_details", {"user_id": "x"}))], user=[text("hello")])
    state = asyncio.run(run_dialogue(llm, row, domain="airline", max_steps=4))
    (tmp_path / "out" / "_matrix").mkdir(parents=True)
    (tmp_path / "out" / "_matrix" / "config.yaml").write_text(CONFIG)
    export_tau2(tmp_path / "out", tmp_path / "r.json", [task_row(state, "r", extra=list(RESULT_COLUMNS))])
    sim = json.loads((tmp_path / "r.json").read_text())["simulations"][0]
    assert sim["termination_reason"] == "max_steps"
    assert sim["reward_info"] == {"reward": 0.0, "reward_basis": None, "reward_breakdown": None,
                                  "info": {"note": "Simulation terminated prematurely. Termination reason: max_steps"}}


def test_other_outputs_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "_matrix").mkdir()
    (tmp_path / "_matrix" / "config.yaml").write_text("workflow:\n  name: coral\n")
    with pytest.raises(ExportError, match="workflow='coral'"):
        export_tau2(tmp_path, tmp_path.parent / "x.json", [])
    with pytest.raises(ExportError, match="no _matrix/config.yaml"):
        export_tau2(tmp_path / "nothing", tmp_path.parent / "y.json", [])


if __name__ == "__main__":  # writes the sample that scripts/tau2_export_check.py gives to tau2
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Path(sys.argv[1]).write_text(json.dumps(export_sample(Path(d)), indent=1) + "\n")
