"""tau2's reward rules: gold trajectories score 1, an agent that skips a write scores 0, each gate holds."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.workflows.tau2.evaluator import (
    ReplayMismatch,
    action_matches,
    action_reward,
    communicate_reward,
    environment_reward,
    evaluate,
    tool_call_pairs,
)
from matrix_hpc.workflows.tau2.scripted import gold_trajectory, write_indices
from matrix_hpc.workflows.tau2.tasks import load_tasks, tasks_by_id

DOMAINS = ("retail", "airline", "telecom")


def agreeing_judge(messages: Sequence[Any], assertions: Sequence[str]) -> list[tuple[bool, str]]:
    """A stand-in for the LLM judge (the workflow's judge role is tested with the workflow)."""
    return [(True, "stub: holds")] * len(assertions)


def _last_successful_write(domain: str, task: dict[str, Any]) -> int | None:
    messages = gold_trajectory(domain, task)
    failed = {m["id"] for m in messages if m["role"] == "tool" and m["error"]}
    writes = [i for i in write_indices(domain, task) if f"call_{i}" not in failed]
    return writes[-1] if writes else None


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_gold_trajectory_scores_one(domain: str) -> None:
    for task in load_tasks(domain):
        result = evaluate(domain, task, gold_trajectory(domain, task), "agent_stop", agreeing_judge)
        assert result.reward == 1.0, f"{domain} task {task['id']!r}: {result.reward_breakdown}"


@pytest.mark.parametrize(("domain", "with_writes"), [("retail", 103), ("airline", 26), ("telecom", 94)])
def test_skipping_one_successful_write_scores_zero(domain: str, with_writes: int) -> None:
    scored = 0
    for task in load_tasks(domain):
        skipped = _last_successful_write(domain, task)
        if skipped is None:
            continue  # tasks whose answer is to change nothing (or whose only write is refused)
        messages = gold_trajectory(domain, task, skip={skipped})
        result = evaluate(domain, task, messages, "agent_stop", agreeing_judge)
        assert result.reward == 0.0, f"{domain} task {task['id']!r} without action {skipped}: {result.reward_breakdown}"
        scored += 1
    assert scored == with_writes


@pytest.mark.parametrize("reason", ["max_steps", "too_many_errors", "agent_error", "user_error"])
def test_premature_termination_scores_zero(reason: str) -> None:
    task = load_tasks("airline")[0]
    result = evaluate("airline", task, gold_trajectory("airline", task), reason)
    assert result.reward == 0.0 and result.note and reason in result.note


def test_nl_assertions_need_a_judge_and_gate_the_reward() -> None:
    task = next(t for t in load_tasks("retail") if t["evaluation_criteria"].get("nl_assertions"))
    assert "NL_ASSERTION" in task["evaluation_criteria"]["reward_basis"]
    messages = gold_trajectory("retail", task)
    with pytest.raises(ValueError, match="workflow.judge_llm"):
        evaluate("retail", task, messages, "user_stop")
    refusing = evaluate("retail", task, messages, "user_stop", lambda m, a: [(False, "no")] * len(a))
    assert refusing.reward == 0.0 and refusing.reward_breakdown == {"DB": 1.0, "NL_ASSERTION": 0.0}


def test_communicate_gates_airline() -> None:
    task = next(t for t in load_tasks("airline") if t["evaluation_criteria"].get("communicate_info"))
    silent = gold_trajectory("airline", task)[:-1]
    result = evaluate("airline", task, silent, "agent_stop")
    assert result.reward == 0.0 and result.reward_breakdown["COMMUNICATE"] == 0.0
    loud = gold_trajectory("airline", task)
    loud[-1]["content"] = loud[-1]["content"].upper()  # case folded, as tau2 does
    assert evaluate("airline", task, loud, "agent_stop").reward == 1.0


def test_action_basis_needs_every_gold_call() -> None:
    task = tasks_by_id("telecom")["[service_issue]airplane_mode_on|lock_sim_card_pin[PERSONA:Easy]"]
    assert "ACTION" in task["evaluation_criteria"]["reward_basis"]
    result = evaluate("telecom", task, gold_trajectory("telecom", task, skip={0}), "agent_stop")
    assert result.reward == 0.0 and result.reward_breakdown["ACTION"] == 0.0


def test_action_comparison_uses_compare_args_or_the_calls_own_arguments() -> None:
    gold = {"name": "get_user_details", "arguments": {"user_id": "a", "x": 1}, "compare_args": ["user_id"]}
    assert action_matches(gold, {"name": "get_user_details", "arguments": {"user_id": "a"}})
    assert not action_matches(gold, {"name": "get_user_details", "arguments": {"user_id": "b"}})
    loose = {"name": "f", "arguments": {"a": 1, "b": 2}}
    assert action_matches(loose, {"name": "f", "arguments": {"a": 1}})  # only the call's keys are compared
    assert action_matches(loose, {"name": "f", "arguments": {}})


def test_strict_replay_refuses_a_tampered_write() -> None:
    task = load_tasks("retail")[0]
    messages = gold_trajectory("retail", task)
    write = write_indices("retail", task)[0]
    for message in messages:
        if message["role"] == "tool" and message["id"] == f"call_{write}":
            message["content"] = '{"status": "forged"}'
    with pytest.raises(ReplayMismatch, match="the trajectory recorded"):
        evaluate("retail", task, messages, "agent_stop", agreeing_judge)


def test_tool_messages_must_answer_tool_calls() -> None:
    with pytest.raises(ValueError, match="Tool message not expected"):
        tool_call_pairs([{"role": "tool", "id": "1", "content": "x"}])
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "name": "f", "arguments": {}}]}
    with pytest.raises(ValueError, match="Tool call id mismatch"):
        tool_call_pairs([call, {"role": "tool", "id": "2", "content": "x"}])


def _read_rewards(domain: str) -> list[dict[str, Any]]:
    path = Path(__file__).resolve().parents[1] / "data" / "tau2_golden" / f"{domain}_rewards.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fp:
        return [json.loads(line) for line in fp]


@pytest.mark.parametrize(("domain", "rows"), [("retail", 217), ("airline", 76), ("telecom", 208)])
def test_every_component_matches_tau2s_evaluator(domain: str, rows: int) -> None:
    """tau2's own evaluator scored the same scripted trajectories (scripts/tau2_golden.py --rewards)."""
    expected_rows = _read_rewards(domain)
    assert len(expected_rows) == rows
    tasks = tasks_by_id(domain)
    for expected in expected_rows:
        task = tasks[expected["task_id"]]
        messages = gold_trajectory(domain, task, skip=set(expected["skip"]))
        env = environment_reward(domain, task, messages)
        action = action_reward(task, messages)
        communicate = communicate_reward(task, messages)
        ours = {
            "env_reward": env.reward,
            "db_match": env.db_match,
            "env_assertions": [check["met"] for check in env.env_assertions],
            "action_reward": action.reward,
            "action_checks": [check["action_match"] for check in action.action_checks],
            "communicate_reward": communicate.reward,
            "communicate_checks": [check["met"] for check in communicate.communicate_checks],
        }
        if expected["reward"] is not None:  # tau2 gave the whole reward (no LLM judge needed)
            ours["reward"] = evaluate(domain, task, messages, "agent_stop").reward
        theirs = {key: expected[key] for key in ours}
        assert ours == theirs, f"{domain} task {expected['task_id']!r} ({expected['variant']})"
