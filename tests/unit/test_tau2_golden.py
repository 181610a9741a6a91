"""Differential tests: our tau2 environments against outputs real tau2-bench (a2c02472) produced.

tests/data/tau2_golden/ was written by ``scripts/tau2_golden.py`` running
tau2-bench itself: every task's gold actions replayed as tau2's evaluator
replays them (fresh environment, initial state, no sync between actions),
plus hand-written probe action lists that exercise errors and quirks. Each
task must give the same outputs (ok flag and text) and the same DB hashes.
"""

from __future__ import annotations

import io
import json

import pytest

from matrix_hpc.workflows.tau2.replay import replay_stream, replay_task
from matrix_hpc.workflows.tau2.tasks import load_tasks, tasks_by_id
from tests.tau2_golden_support import GOLDEN, assert_same, gold_actions, golden_rows


@pytest.mark.parametrize(
    ("domain", "golden", "count"),
    [("retail", "retail.jsonl.gz", 114), ("airline", "airline.jsonl.gz", 50), ("telecom", "telecom.jsonl.gz", 114)],
)
def test_every_gold_trajectory_matches_tau2(domain: str, golden: str, count: int) -> None:
    expected = golden_rows(golden)
    tasks = {task["id"]: task for task in load_tasks(domain, "base")}
    assert len(expected) == len(tasks) == count
    for row in expected:
        task = tasks[row["task_id"]]
        assert_same(replay_task(domain, task, gold_actions(task)), row)


@pytest.mark.parametrize("domain", ["retail", "airline", "telecom"])
def test_probe_action_lists_match_tau2(domain: str) -> None:
    """Errors, argument mistakes and quirks, as tau2 answered them."""
    out, errors = io.StringIO(), io.StringIO()
    with (GOLDEN / f"{domain}_probes_input.jsonl").open(encoding="utf-8") as lines:
        summary = replay_stream(domain, lines, out, errors)
    assert summary.bad_lines == 0, errors.getvalue()
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    expected = golden_rows(f"{domain}_probes.jsonl")
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        assert_same(ours, theirs)


def test_live_calls_sync_as_tau2s_dialogue_does() -> None:
    """Telecom with a sync after every call (tau2's get_response), gold actions and probes."""
    tasks = tasks_by_id("telecom")
    for row in golden_rows("telecom_live.jsonl.gz"):
        task = tasks[row["task_id"]]
        assert_same(replay_task("telecom", task, gold_actions(task), live=True), row)
    out, errors = io.StringIO(), io.StringIO()
    with (GOLDEN / "telecom_probes_input.jsonl").open(encoding="utf-8") as lines:
        replay_stream("telecom", lines, out, errors, live=True)
    expected = golden_rows("telecom_probes_live.jsonl")
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(got) == len(expected) == 3
    for ours, theirs in zip(got, expected, strict=True):
        assert_same(ours, theirs)


@pytest.mark.slow
def test_all_telecom_tasks_match_tau2() -> None:
    expected = golden_rows("telecom_full.jsonl.gz")
    tasks = tasks_by_id("telecom")
    assert len(expected) == len(tasks) == 2285
    for row in expected:
        task = tasks[row["task_id"]]
        assert_same(replay_task("telecom", task, gold_actions(task)), row)
