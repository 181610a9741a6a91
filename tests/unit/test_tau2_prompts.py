"""What the LLMs see, against tau2-bench a2c02472's own rendering (golden files made by tau2).

``tests/data/tau2_golden/prompts.json``: sha256 of tau2's agent system prompt per
domain and of its user-simulator system prompt for a few tasks;
``tool_schemas.json``: tau2's OpenAI tool schemas (ours must have the same
names, order and parameters; descriptions are our own docstrings').
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.workflows.tau2 import prompts
from matrix_hpc.workflows.tau2.judge import parse_verdicts
from matrix_hpc.workflows.tau2.schemas import tool_schemas
from matrix_hpc.workflows.tau2.tasks import tasks_by_id

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "tau2_golden"
DOMAINS = ("retail", "airline", "telecom")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("domain", DOMAINS)
def test_system_prompts_are_tau2s(domain: str) -> None:
    golden = json.loads((GOLDEN / "prompts.json").read_text())[domain]
    assert sha(prompts.agent_system_prompt(prompts.domain_policy(domain))) == golden["agent_system_prompt_sha256"]
    tasks = tasks_by_id(domain)
    with_tools = domain == "telecom"
    for task_id, digest in golden["user_system_prompt_sha256"].items():
        assert sha(prompts.user_system_prompt(tasks[task_id]["user_scenario"], with_tools)) == digest, task_id


def _without_descriptions(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_descriptions(v) for k, v in value.items() if k != "description"}
    if isinstance(value, list):
        return [_without_descriptions(v) for v in value]
    return value


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("side", ["assistant", "user"])
def test_tool_schemas_have_tau2s_names_and_parameters(domain: str, side: str) -> None:
    theirs = json.loads((GOLDEN / "tool_schemas.json").read_text())[domain][side]
    ours = tool_schemas(domain, side)
    assert [s["function"]["name"] for s in ours] == [s["function"]["name"] for s in theirs]
    for mine, tau2 in zip(ours, theirs, strict=True):
        assert _without_descriptions(mine["function"]["parameters"]) == \
            _without_descriptions(tau2["function"]["parameters"]), mine["function"]["name"]
        assert mine["type"] == "function" and mine["function"]["description"]


def test_judge_verdicts_by_position_and_unreadable_answers_rule_unmet() -> None:
    answer = json.dumps({"results": [{"expectedOutcome": "a", "reasoning": "yes", "metExpectation": True},
                                     {"expectedOutcome": "b", "reasoning": "no", "metExpectation": False}]})
    assert parse_verdicts(answer, ["a", "b"]) == [(True, "yes"), (False, "no")]
    assert parse_verdicts("```json\n" + answer + "\n```", ["a", "b"])[0] == (True, "yes")
    assert parse_verdicts(answer, ["a", "b", "c"])[2] == (False, "the judge gave no verdict for assertion 2")
    assert all(not met for met, _ in parse_verdicts("sure", ["a", "b"]))


def test_the_judge_prompt_is_tau2s_indented_text() -> None:
    text = prompts.judge_user_prompt([{"role": "assistant", "content": "Hi"}, {"role": "tool", "content": "x"}], ["a"])
    assert text == "\n        conversation:\n        assistant: Hi\ntool: x\n        \n" \
                   "        expectedOutcomes:\n        ['a']\n        "
    assert prompts.JUDGE_SYSTEM_PROMPT.startswith("\n        TASK\n") and "\n        \n        Example" in \
        prompts.JUDGE_SYSTEM_PROMPT
