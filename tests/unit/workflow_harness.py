"""Run one task of a workflow in-process against a scripted LLM, through the
worker's own step (``runtime.worker.run_step``: retries restore the state;
Filtered ends the task; a non-retryable error fails it at once; no backoff
wait here) but no Ray and no sinks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from matrix_hpc.runtime.message import OK, TaskState
from matrix_hpc.runtime.worker import StepPolicy, run_step
from matrix_hpc.runtime.workflow import AgentContext, Workflow
from matrix_hpc.services.llm.contract import ChatResult, Choice, Usage

Reply = Callable[[list[dict[str, Any]], dict[str, Any]], "str | Exception"]


class ScriptedLLM:
    """Stands in for ``ctx.llm``: ``reply(messages, params)`` gives the answer text
    (or an exception to raise); every call is recorded in ``calls``."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.calls: list[dict[str, Any]] = []

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        self.calls.append({"messages": json.loads(json.dumps(messages)), **params})
        answer = self.reply(messages, params)
        if isinstance(answer, Exception):
            raise answer
        return ChatResult([Choice(answer)], Usage(len(str(messages)) // 4, max(1, len(answer) // 4)), "fake", 0.0, 1)


def run_task(workflow: Workflow, row: dict[str, Any], llm: ScriptedLLM, task_id: str = "t1",
             max_attempts: int = 3, max_steps: int = 500) -> TaskState:
    import asyncio

    return asyncio.run(_run(workflow, row, llm, task_id, max_attempts, max_steps))


async def _run(workflow: Workflow, row: dict[str, Any], llm: ScriptedLLM, task_id: str, max_attempts: int,
               max_steps: int) -> TaskState:
    workflow.validate_input(row)
    task = TaskState(task_id, row, workflow.first_role)
    ctx = AgentContext(seed=0, services={"llm": llm})
    role: str | None = task.role
    for _ in range(max_steps):
        assert role is not None
        role = await run_step(workflow, workflow.agent(role), role, task, ctx, StepPolicy(max_attempts, 0.0, 0.0))
        if task.status is not None:
            return task
        if role is None:
            task.finish(OK)
            return task
        task.role = role
    raise AssertionError(f"task did not end within {max_steps} steps")
