"""The task message: the whole state of one task, travelling agent to agent.

It is deliberately small and flat (slots, builtin containers) because it is
pickled on every hop between processes. Large bodies could be put in Ray's
object store by the sender; here the history holds plain strings.
"""

from __future__ import annotations

import time
from typing import Any

OK = "ok"
FILTERED = "filtered"
FAILED = "failed"
STATUSES = (OK, FILTERED, FAILED)


class TaskState:
    """One task in flight.

    ``role`` is the role that must run next; ``data`` is the workflow's own
    scratch state; ``result`` holds the workflow's output fields;
    ``history`` is the message list written to the output row. ``sample``
    is which of ``run.samples_per_input`` draws of its input row the task is,
    ``seed`` that draw's seed (None with one draw per row): a workflow passes
    it to what samples (``llm_steps.chat`` sends it with every LLM request).
    """

    __slots__ = (
        "id", "input", "role", "history", "data", "result", "attempt", "attempts",
        "status", "error_type", "error", "reason", "t_admitted", "t_finished", "hops", "sample", "seed",
    )

    def __init__(self, task_id: str, input_row: dict[str, Any], role: str, attempt: int = 1, sample: int = 0,
                 seed: int | None = None) -> None:
        self.id = task_id
        self.input = input_row
        self.role = role
        self.history: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {}
        self.result: dict[str, Any] = {}
        self.attempt = attempt  # admission attempt (re-admission after a lost worker)
        self.attempts = 1  # 1 + retries of its steps
        self.status: str | None = None
        self.error_type: str | None = None
        self.error: str | None = None
        self.reason: str | None = None
        self.t_admitted = time.time()
        self.t_finished: float | None = None
        self.hops = 0
        self.sample = sample
        self.seed = seed

    # Explicit pickling keeps the payload a plain tuple (smaller, faster).
    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)

    def add_message(
        self,
        agent: str,
        content: str,
        *,
        role: str = "assistant",
        t_start: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Append one message to the history (usage when known)."""
        now = time.time()
        self.history.append({
            "agent": agent, "role": role, "content": content,
            "t_start": t_start if t_start is not None else now, "t_end": now,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        })

    def finish(self, status: str, *, error_type: str | None = None, error: str | None = None,
               reason: str | None = None) -> None:
        self.status = status
        self.error_type = error_type
        self.error = error
        self.reason = reason
        self.t_finished = time.time()

    def __repr__(self) -> str:
        return f"TaskState(id={self.id!r}, role={self.role!r}, status={self.status!r})"
