"""A scripted dialogue that follows a task's gold actions: the reference trajectory for reward tests.

Each gold action becomes one message with one tool call (from the agent or,
in telecom, the user), answered by a tool message from a live environment
that syncs after every call, as tau2's orchestrator does. The agent then
says every ``communicate_info`` string and stops. ``skip`` leaves out the
actions at the given indices -- the "agent that forgets a write".

Example::

    messages = gold_trajectory("airline", task)
    evaluate("airline", task, messages, termination_reason="agent_stop").reward   # 1.0
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from matrix_hpc.workflows.tau2.tasks import build_environment


def gold_trajectory(domain: str, task: Mapping[str, Any], skip: Collection[int] = ()) -> list[dict[str, Any]]:
    """tau2-shaped messages of a dialogue that performs the task's gold actions (minus ``skip``)."""
    env = build_environment(domain, task)
    criteria = task.get("evaluation_criteria") or {}
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Hi, I need help.", "tool_calls": None}]
    for index, action in enumerate(criteria.get("actions") or []):
        if index in skip:
            continue
        requestor = action.get("requestor", "assistant")
        call = {
            "id": f"call_{index}",
            "name": action["name"],
            "arguments": action.get("arguments") or {},
            "requestor": requestor,
        }
        output = env.step(call["name"], call["arguments"], requestor)
        messages.append({"role": requestor, "content": None, "tool_calls": [call]})
        messages.append(
            {"role": "tool", "id": call["id"], "content": output.text, "requestor": requestor, "error": not output.ok}
        )
    summary = " ".join(criteria.get("communicate_info") or []) or "Done."
    messages.append({"role": "assistant", "content": summary, "tool_calls": None})
    return messages


def write_indices(domain: str, task: Mapping[str, Any]) -> list[int]:
    """Indices of the gold actions that call state-changing tools."""
    env = build_environment(domain, task)
    actions = (task.get("evaluation_criteria") or {}).get("actions") or []
    return [i for i, a in enumerate(actions) if env.has_tool(a["name"]) and env.is_mutating(a["name"])]
