"""Differential tests: our tau2 environments against outputs real tau2-bench (a2c02472) produced.

tests/data/tau2_golden/ was written by ``scripts/tau2_golden.py`` running
tau2-bench itself: every task's gold actions replayed as tau2's evaluator
replays them (fresh environment, initial state, no sync between actions),
plus hand-written probe action lists that exercise errors and quirks. Each
task must give the same outputs (ok flag and text) and the same DB hashes.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.workflows.tau2.replay import Action, replay_stream, replay_task
from matrix_hpc.workflows.tau2.tasks import load_tasks, tasks_by_id

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "tau2_golden"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fp:  # type: ignore[operator]
        return [json.loads(line) for line in fp if line.strip()]


def _gold_actions(task: dict[str, Any]) -> list[Action]:
    criteria = task.get("evaluation_criteria") or {}
    return [Action(a["name"], a["arguments"], a.get("requestor", "assistant")) for a in criteria.get("actions") or []]


def _golden_rows(name: str) -> list[dict[str, Any]]:
    return _read_jsonl(GOLDEN / name)


_PYDANTIC_LINK = re.compile(r"https://errors\.pydantic\.dev/[0-9.]+/")


def _masked(output: dict[str, Any]) -> dict[str, Any]:
    """The output with pydantic's version in its error links masked (a library version, not tau2's behaviour)."""
    return {**output, "text": _PYDANTIC_LINK.sub("https://errors.pydantic.dev/<version>/", output["text"])}


def _assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for index, (ours, theirs) in enumerate(zip(got["outputs"], expected["outputs"], strict=False)):
        ours, theirs = _masked(ours), _masked(theirs)
        assert ours == theirs, f"task {got['task_id']!r}, action {index}: ours {ours!r} != tau2's {theirs!r}"
    assert len(got["outputs"]) == len(expected["outputs"])
    assert got["db_hash"] == expected["db_hash"], f"task {got['task_id']!r}: agent DB differs from tau2's"
    assert got["user_db_hash"] == expected["user_db_hash"], f"task {got['task_id']!r}: user DB differs from tau2's"


@pytest.mark.parametrize(
    ("domain", "golden", "count"),
    [("retail", "retail.jsonl.gz", 114), ("airline", "airline.jsonl.gz", 50), ("telecom", "telecom.jsonl.gz", 114)],
)
def test_every_gold_trajectory_matches_tau2(domain: str, golden: str, count: int) -> None:
    expected = _golden_rows(golden)
    tasks = {task["id"]: task for task in load_tasks(domain, "base")}
    assert len(expected) == len(tasks) == count
    for row in expected:
        task = tasks[row["task_id"]]
        _assert_same(replay_task(domain, task, _gold_actions(task)), row)


@pytest.mark.parametrize("domain", ["retail", "airline", "telecom"])
def test_probe_action_lists_match_tau2(domain: str) -> None:
    """Errors, argument mistakes and quirks, as tau2 answered them."""
    out, errors = io.StringIO(), io.StringIO()
    with (GOLDEN / f"{domain}_probes_input.jsonl").open(encoding="utf-8") as lines:
        summary = replay_stream(domain, lines, out, errors)
    assert summary.bad_lines == 0, errors.getvalue()
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    expected = _golden_rows(f"{domain}_probes.jsonl")
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        _assert_same(ours, theirs)


def test_live_calls_sync_as_tau2s_dialogue_does() -> None:
    """Telecom with a sync after every call (tau2's get_response), gold actions and probes."""
    tasks = tasks_by_id("telecom")
    for row in _golden_rows("telecom_live.jsonl.gz"):
        task = tasks[row["task_id"]]
        _assert_same(replay_task("telecom", task, _gold_actions(task), live=True), row)
    out, errors = io.StringIO(), io.StringIO()
    with (GOLDEN / "telecom_probes_input.jsonl").open(encoding="utf-8") as lines:
        replay_stream("telecom", lines, out, errors, live=True)
    expected = _golden_rows("telecom_probes_live.jsonl")
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(got) == len(expected) == 3
    for ours, theirs in zip(got, expected, strict=True):
        _assert_same(ours, theirs)


@pytest.mark.slow
def test_all_telecom_tasks_match_tau2() -> None:
    expected = _golden_rows("telecom_full.jsonl.gz")
    tasks = tasks_by_id("telecom")
    assert len(expected) == len(tasks) == 2285
    for row in expected:
        task = tasks[row["task_id"]]
        _assert_same(replay_task("telecom", task, _gold_actions(task)), row)
