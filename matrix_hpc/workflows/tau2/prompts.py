"""The texts the dialogue's LLMs read, composed as tau2-bench a2c02472 composes them.

- the agent: tau2's ``AGENT_INSTRUCTION`` and the domain policy (telecom:
  main policy plus tech-support manual, wrapped in tags);
- the user simulator: tau2's simulation guidelines (the tools variant when
  the user has tools, i.e. telecom) and the task's ``user_scenario`` rendered
  as tau2's ``str(UserScenario)``;
- the NL-assertion judge: tau2's prompts, indentation included.

The guideline files in ``prompts/`` are tau2's own (MIT, see its LICENSE).

Example::

    agent_system_prompt(domain_policy("retail")).startswith("<instructions>")   # True
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matrix_hpc.workflows.tau2.db import data_dir

_PROMPTS = Path(__file__).resolve().parent / "prompts"

AGENT_INSTRUCTION = """You are a customer service agent that helps the user according to the <policy> provided below.
In each turn you can either:
- Send a message to the user.
- Make a tool call.
You cannot do both at the same time.

Try to be helpful and always follow the policy. Always make sure you generate valid JSON only."""


def agent_system_prompt(policy: str) -> str:
    return f"<instructions>\n{AGENT_INSTRUCTION}\n</instructions>\n<policy>\n{policy}\n</policy>"


@functools.cache
def domain_policy(domain: str) -> str:
    """The policy the agent follows (tau2's ``environment.policy``; telecom in its default 'manual' type)."""
    folder = data_dir(domain)
    if domain != "telecom":
        return (folder / "policy.md").read_text(encoding="utf-8")
    main = (folder / "main_policy.md").read_text(encoding="utf-8")
    manual = (folder / "tech_support_manual.md").read_text(encoding="utf-8")
    return (f"<main_policy>\n{main}\n</main_policy>\n"
            f"<tech_support_policy>\n{manual}\n</tech_support_policy>")


@functools.cache
def user_guidelines(with_tools: bool) -> str:
    name = "simulation_guidelines_tools.md" if with_tools else "simulation_guidelines.md"
    return (_PROMPTS / name).read_text(encoding="utf-8").replace("<PERSONA_GUIDELINES>", "")


def _indent(text: str) -> str:
    return textwrap.indent(text, "\t")


def scenario_text(scenario: Mapping[str, Any]) -> str:
    """tau2's ``str(UserScenario)``: persona, then the (structured or plain) instructions."""
    lines: list[str] = []
    if scenario.get("persona") is not None:
        lines += ["Persona:", _indent(scenario["persona"])]
    instructions = scenario["instructions"]
    if isinstance(instructions, Mapping):
        parts = [f"Domain: {instructions['domain']}",
                 f"Reason for call:\n{_indent(instructions['reason_for_call'])}"]
        if instructions.get("known_info") is not None:
            parts.append(f"Known info:\n{_indent(instructions['known_info'])}")
        if instructions.get("unknown_info") is not None:
            parts.append(f"Unknown info:\n{_indent(instructions['unknown_info'])}")
        parts.append(f"Task instructions:\n{_indent(instructions['task_instructions'])}")
        instructions = "\n".join(parts)
    lines += ["Instructions:", _indent(str(instructions))]
    return "\n".join(lines)


def user_system_prompt(scenario: Mapping[str, Any], with_tools: bool) -> str:
    return f"{user_guidelines(with_tools)}\n\n<scenario>\n{scenario_text(scenario)}\n</scenario>".strip()


# tau2's NL-assertion judge (evaluator_nl_assertions.py); the indentation is part of tau2's prompt
# (its two whitespace-only lines are written '       \x20' so that linters keep them).
JUDGE_SYSTEM_PROMPT = """
        TASK
        - You will be given a list of expected outcomes and a conversation that was collected during a test case run.
        - The conversation is between an agent and a customer.
        - Your job is to evaluate whether the agent satisfies each of the expected outcomes.
        - Grade each expected outcome individually.

        FORMAT
        - Your response should be a JSON object with the following fields:
        - `reasoning`: a short explanation for your classification
        - `metExpectation`: `true` if the agent satisfies the expected outcomes, `false` otherwise
        - `expectedOutcome`: repeat the expectation from the input that you are grading
       \x20
        Example response structure:
        {
            "results": [
                {
                    "expectedOutcome": "<one of the expected outcomes from the input>",
                    "reasoning": "<reasoning trace>",
                    "metExpectation": <false or true>,
                }
            ]
        }
        """


def judge_user_prompt(messages: Sequence[Mapping[str, Any]], assertions: Sequence[str]) -> str:
    conversation = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)
    return f"""
        conversation:
        {conversation}
       \x20
        expectedOutcomes:
        {list(assertions)}
        """
