"""The task message: the whole state of one task, travelling agent to agent.

It is deliberately small and flat (slots, builtin containers) because it is
pickled on every hop between processes. Large bodies could be put in Ray's
object store by the sender; here the history holds plain strings.

The history travels *sealed*: messages that were already pickled on an
earlier hop are kept as those bytes and only unpickled when a step reads
``history``; a hop whose step only appends (``add_message``) or does not look
at the history passes them on as one bytes object (a copy) instead of
unpickling and pickling every message again. On the overhead workload
placed per role, pickling and unpickling tasks (mostly their history) was
~45% of the worker actors' CPU.
"""

from __future__ import annotations

import io
import pickle
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
        "id", "input", "role", "_history", "_sealed", "_sealed_len", "data", "result", "attempt", "attempts",
        "status", "error_type", "error", "reason", "t_admitted", "t_finished", "hops", "sample", "seed",
    )

    def __init__(self, task_id: str, input_row: dict[str, Any], role: str, attempt: int = 1, sample: int = 0,
                 seed: int | None = None) -> None:
        self.id = task_id
        self.input = input_row
        self.role = role
        self._history: list[dict[str, Any]] = []  # the messages after the sealed ones (all, once read)
        self._sealed = b""  # the first _sealed_len messages: pickled lists, one after another, not read here yet
        self._sealed_len = 0
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

    @property
    def history(self) -> list[dict[str, Any]]:
        """The messages so far: a plain list that a step may read and change."""
        if self._sealed_len:
            self._unseal()
        return self._history

    @history.setter
    def history(self, messages: list[dict[str, Any]]) -> None:
        self._history, self._sealed, self._sealed_len = messages, b"", 0

    @property
    def history_len(self) -> int:
        """``len(history)`` without unpickling sealed messages."""
        return self._sealed_len + len(self._history)

    def truncate_history(self, n: int) -> None:
        """Keep the first ``n`` messages (drops what a failed step added)."""
        if n >= self._sealed_len:
            del self._history[n - self._sealed_len:]
        else:
            del self.history[n:]

    def _unseal(self) -> None:
        earlier: list[dict[str, Any]] = []
        buf = io.BytesIO(self._sealed)
        while buf.tell() < len(self._sealed):
            earlier.extend(pickle.load(buf))
        earlier.extend(self._history)
        self._history, self._sealed, self._sealed_len = earlier, b"", 0

    # Explicit pickling keeps the payload a plain tuple (smaller, faster), the
    # history sealed (see the module's docstring). Attributes are listed, not
    # looped over, and __reduce__ names the rebuilding function (the default
    # protocol probes the class for several hooks first): this runs for every
    # task on every hop between processes (1.5 against 2.2 us of CPU on an 18-field test class).
    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (self.__getstate__(),)

    def __getstate__(self) -> tuple[Any, ...]:
        sealed, sealed_len = self._sealed, self._sealed_len
        if self._history:
            sealed += pickle.dumps(self._history, protocol=pickle.HIGHEST_PROTOCOL)
            sealed_len += len(self._history)
        return (self.id, self.input, self.role, sealed, sealed_len, self.data, self.result, self.attempt,
                self.attempts, self.status, self.error_type, self.error, self.reason, self.t_admitted,
                self.t_finished, self.hops, self.sample, self.seed)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.id, self.input, self.role, self._sealed, self._sealed_len, self.data, self.result, self.attempt,
         self.attempts, self.status, self.error_type, self.error, self.reason, self.t_admitted,
         self.t_finished, self.hops, self.sample, self.seed) = state
        self._history = []

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
        self._history.append({  # not self.history: appending needs no sealed message read
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


def _restore(state: tuple[Any, ...]) -> TaskState:
    task = TaskState.__new__(TaskState)
    task.__setstate__(state)
    return task


def pack_tasks(tasks: list[TaskState]) -> bytes | list[TaskState]:
    """A batch of tasks as the argument of one Ray call: pickled here by the
    C pickler, which Ray then copies as plain bytes. Ray's own serializer
    (cloudpickle) calls back into Python for every task (its reducer hook and
    dispatch table); measured actor to actor, 256 tasks a call, a packed
    batch costs ~20% less CPU per task on each side. A batch holding something
    only cloudpickle can pickle (a lambda in ``task.data``) goes as the list,
    to Ray's serializer."""
    try:
        return pickle.dumps(tasks, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # PicklingError, TypeError, AttributeError: whatever the C pickler refuses
        return tasks


def unpack_tasks(batch: bytes | list[TaskState]) -> list[TaskState]:
    """The tasks of a batch made by :func:`pack_tasks` (or the list itself)."""
    tasks: list[TaskState] = pickle.loads(batch) if isinstance(batch, bytes) else batch
    return tasks
