"""tau2's reward, as its evaluator computes it (``EvaluationType.ALL``), as pure functions.

A trajectory is a list of messages in tau2's JSON shape::

    {"role": "assistant" | "user", "content": str | None,
     "tool_calls": [{"id": str, "name": str, "arguments": {...}, "requestor": "assistant" | "user"}] | None}
    {"role": "tool", "id": str, "content": str, "requestor": ..., "error": bool}

The rules (tau2-bench a2c02472):

- termination gate: a dialogue that did not end by the agent or the user
  stopping (``agent_stop``/``user_stop``) scores 0, whatever else holds;
- DB: the trajectory's state-changing tool calls are replayed (strictly: a
  replayed output that differs from the recorded one is an error) on a fresh
  environment, syncing after each call as a live dialogue does; the task's
  gold actions are replayed on another fresh environment without syncing;
  1 when both agent and user DB hashes are equal;
- ENV_ASSERTION: each assertion function run on the replayed environment
  returns its expected value;
- ACTION: every gold action is matched by some tool call of the trajectory
  (same name; equal ``compare_args``, or every argument the call gave);
- COMMUNICATE: every ``communicate_info`` string occurs, case-folded, in some
  agent message with its commas removed;
- NL_ASSERTION: a judge (an LLM in the workflow) says each assertion holds.

The reward is the product of the components named in the task's
``reward_basis``; the others are still computed and reported.

Example::

    result = evaluate(domain, task, messages, termination_reason="agent_stop", judge=my_judge)
    result.reward, result.reward_breakdown
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matrix_hpc.workflows.tau2.environment import EnvFunctionCall, Tau2Environment
from matrix_hpc.workflows.tau2.tasks import build_environment

Message = Mapping[str, Any]
# A judge answers, for each NL assertion, whether the trajectory meets it and why.
NLJudge = Callable[[Sequence[Message], Sequence[str]], Sequence[tuple[bool, str]]]

STOP_REASONS = frozenset({"agent_stop", "user_stop"})
ENV_BASES = frozenset({"DB", "ENV_ASSERTION"})
DEFAULT_REWARD_BASIS = ("DB", "COMMUNICATE")  # tau2's default when a task names none


class ReplayMismatch(ValueError):
    """A replayed tool call answered differently from what the trajectory recorded."""


@dataclass
class RewardResult:
    reward: float
    reward_basis: list[str] | None = None
    reward_breakdown: dict[str, float] = field(default_factory=dict)
    db_match: bool | None = None
    env_assertions: list[dict[str, Any]] = field(default_factory=list)  # {"assertion", "met"}
    action_checks: list[dict[str, Any]] = field(default_factory=list)  # {"action", "action_match"}
    communicate_checks: list[dict[str, Any]] = field(default_factory=list)  # {"info", "met"}
    nl_assertions: list[dict[str, Any]] = field(default_factory=list)  # {"nl_assertion", "met", "justification"}
    note: str | None = None


# --- replaying a trajectory (tau2's Environment.set_state)


def tool_call_pairs(messages: Sequence[Message]) -> list[tuple[Mapping[str, Any], Message]]:
    """Each tool call of the trajectory with the tool message that answered it, checked as tau2 checks."""
    pairs: list[tuple[Mapping[str, Any], Message]] = []
    pending = list(messages)[::-1]
    while pending:
        message = pending.pop()
        role = message.get("role")
        if role == "tool":
            raise ValueError("Tool message not expected. Tool messages should always follow a tool call.")
        if role not in ("assistant", "user") or message.get("tool_calls") is None:
            continue
        for call in message["tool_calls"]:
            if not pending:
                raise ValueError("Tool message expected. Got None.")
            answer = pending.pop()
            if answer.get("role") != "tool":
                raise ValueError(f"Tool message expected. Got a {answer.get('role')} message")
            if call.get("id", "") != answer.get("id", ""):
                raise ValueError(f"Tool call id mismatch. Got {call.get('id')} and {answer.get('id')}")
            pairs.append((call, answer))
    return pairs


def _as_json_or_text(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


def replay_trajectory(
    domain: str, task: Mapping[str, Any], messages: Sequence[Message], strict: bool = True
) -> Tau2Environment:
    """A fresh environment for ``task`` with the trajectory's state-changing calls re-applied."""
    env = build_environment(domain, task)
    for call, answer in tool_call_pairs(messages):
        name = call["name"]
        if not env.has_tool(name) or not env.is_mutating(name):
            continue  # hallucinated tools changed nothing; reads are not re-run
        output = env.step(name, call.get("arguments") or {}, call.get("requestor", "assistant"))
        if strict and _as_json_or_text(output.text) != _as_json_or_text(answer.get("content")):
            raise ReplayMismatch(
                f"replayed {name}({call.get('arguments')}) returned {output.text!r}, "
                f"the trajectory recorded {answer.get('content')!r}"
            )
    env.sync()
    return env


# --- components


def _criteria(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return task.get("evaluation_criteria")


def _reward_basis(criteria: Mapping[str, Any]) -> list[str]:
    basis = criteria.get("reward_basis")
    return list(basis) if basis is not None else list(DEFAULT_REWARD_BASIS)


def environment_reward(domain: str, task: Mapping[str, Any], messages: Sequence[Message]) -> RewardResult:
    """DB and ENV_ASSERTION (tau2's EnvironmentEvaluator)."""
    criteria = _criteria(task)
    if criteria is None:
        return RewardResult(reward=1.0, note="No evaluation criteria")
    if criteria.get("actions") is None and criteria.get("env_assertions") is None:
        return RewardResult(reward=1.0, db_match=True, note="No expected actions or env assertions")
    predicted = replay_trajectory(domain, task, messages)
    gold = build_environment(domain, task)
    for action in criteria.get("actions") or []:
        gold.call(action["name"], action.get("arguments") or {}, action.get("requestor", "assistant"))
    db_match = gold.db_hash() == predicted.db_hash() and gold.user_db_hash() == predicted.user_db_hash()
    checks = []
    for assertion in criteria.get("env_assertions") or []:
        met = predicted.run_assertion(EnvFunctionCall.from_dict(assertion), assertion.get("assert_value", True))
        checks.append({"assertion": dict(assertion), "met": met})
    basis = _reward_basis(criteria)
    breakdown: dict[str, float] = {}
    if "DB" in basis:
        breakdown["DB"] = 1.0 if db_match else 0.0
    if "ENV_ASSERTION" in basis:
        breakdown["ENV_ASSERTION"] = 1.0 if all(check["met"] for check in checks) else 0.0
    return RewardResult(
        reward=_product(breakdown.values()),
        reward_basis=basis,
        reward_breakdown=breakdown,
        db_match=db_match,
        env_assertions=checks,
    )


def action_matches(action: Mapping[str, Any], call: Mapping[str, Any]) -> bool:
    """tau2's ``Action.compare_with_tool_call`` (the requestor is not compared)."""
    if action["name"] != call.get("name"):
        return False
    given = call.get("arguments") or {}
    compared = action.get("compare_args")
    keys = list(given.keys()) if compared is None else list(compared)
    if not keys:
        return True
    expected = action.get("arguments") or {}
    return {k: v for k, v in given.items() if k in keys} == {k: v for k, v in expected.items() if k in keys}


def action_reward(task: Mapping[str, Any], messages: Sequence[Message]) -> RewardResult:
    """ACTION (tau2's ActionEvaluator): every gold action matched by some tool call."""
    criteria = _criteria(task)
    gold = (criteria or {}).get("actions")
    if not gold:
        return RewardResult(reward=1.0, reward_breakdown={"ACTION": 1.0}, note="No actions to evaluate")
    calls = [
        call
        for message in messages
        if message.get("role") in ("assistant", "user") and message.get("tool_calls") is not None
        for call in message["tool_calls"]
    ]
    checks = [{"action": dict(a), "action_match": any(action_matches(a, c) for c in calls)} for a in gold]
    reward = 1.0 if all(check["action_match"] for check in checks) else 0.0
    return RewardResult(reward=reward, reward_breakdown={"ACTION": reward}, action_checks=checks)


def communicate_reward(task: Mapping[str, Any], messages: Sequence[Message]) -> RewardResult:
    """COMMUNICATE (tau2's CommunicateEvaluator): each string said by the agent, commas ignored."""
    wanted = (_criteria(task) or {}).get("communicate_info")
    if not wanted:
        return RewardResult(reward=1.0, reward_breakdown={"COMMUNICATE": 1.0}, note="No communicate_info to evaluate")
    said = [
        str(m["content"]).lower().replace(",", "")
        for m in messages
        if m.get("role") == "assistant" and m.get("content") is not None and str(m["content"]).strip()
    ]
    checks = [{"info": info, "met": any(info.lower() in text for text in said)} for info in wanted]
    reward = 1.0 if all(check["met"] for check in checks) else 0.0
    return RewardResult(reward=reward, reward_breakdown={"COMMUNICATE": reward}, communicate_checks=checks)


def nl_assertion_reward(task: Mapping[str, Any], messages: Sequence[Message], judge: NLJudge | None) -> RewardResult:
    """NL_ASSERTION: the judge's verdict on each assertion; 1 only when all hold."""
    assertions = (_criteria(task) or {}).get("nl_assertions")
    if not assertions:
        return RewardResult(reward=1.0, reward_breakdown={"NL_ASSERTION": 1.0}, note="No nl_assertions to evaluate")
    if judge is None:
        raise ValueError(
            f"task {task.get('id')!r} is scored on NL_ASSERTION but no judge was given; "
            "set workflow.judge_llm (or pass judge=...)"
        )
    verdicts = list(judge(messages, assertions))
    if len(verdicts) != len(assertions):
        raise ValueError(f"the judge answered {len(verdicts)} verdicts for {len(assertions)} NL assertions")
    checks = [
        {"nl_assertion": text, "met": bool(met), "justification": why}
        for text, (met, why) in zip(assertions, verdicts, strict=True)
    ]
    reward = 1.0 if all(check["met"] for check in checks) else 0.0
    return RewardResult(reward=reward, reward_breakdown={"NL_ASSERTION": reward}, nl_assertions=checks)


# --- the whole reward


def _product(values: Any) -> float:
    result = 1.0
    for value in values:
        result *= value
    return result


def evaluate(
    domain: str,
    task: Mapping[str, Any],
    messages: Sequence[Message],
    termination_reason: str,
    judge: NLJudge | None = None,
) -> RewardResult:
    """tau2's ``evaluate_simulation`` with ``EvaluationType.ALL``."""
    if termination_reason not in STOP_REASONS:
        return RewardResult(
            reward=0.0, note=f"Simulation terminated prematurely. Termination reason: {termination_reason}"
        )
    criteria = _criteria(task)
    if criteria is None:
        return RewardResult(reward=1.0, note="No evaluation criteria")
    basis = _reward_basis(criteria)
    env = environment_reward(domain, task, messages)
    action = action_reward(task, messages)
    communicate = communicate_reward(task, messages)
    nl = nl_assertion_reward(task, messages, judge) if "NL_ASSERTION" in basis else None
    reward, breakdown = 1.0, {}
    for part, applies in (
        (env, bool(ENV_BASES & set(basis))),
        (action, "ACTION" in basis),
        (nl, "NL_ASSERTION" in basis),
        (communicate, "COMMUNICATE" in basis),
    ):
        if applies and part is not None:
            breakdown.update(part.reward_breakdown)
            reward *= part.reward
    return RewardResult(
        reward=reward,
        reward_basis=basis,
        reward_breakdown=breakdown,
        db_match=env.db_match,
        env_assertions=env.env_assertions,
        action_checks=action.action_checks,
        communicate_checks=communicate.communicate_checks,
        nl_assertions=nl.nl_assertions if nl is not None else [],
    )
