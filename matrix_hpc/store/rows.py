"""The output row: one per task, whatever its fate."""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState

MESSAGE_TYPE = pa.struct([
    ("agent", pa.string()),
    ("role", pa.string()),
    ("content", pa.string()),
    ("t_start", pa.float64()),
    ("t_end", pa.float64()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
])

BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("status", pa.string()),  # ok | filtered | failed
    ("error_type", pa.string()),
    ("error", pa.string()),
    ("reason", pa.string()),  # why a task was filtered
    ("input", pa.string()),  # the input row as JSON (or the raw line when unparseable)
    ("messages", pa.list_(MESSAGE_TYPE)),
    ("result", pa.string()),  # the workflow's output fields as JSON
    ("attempts", pa.int32()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("t_admitted", pa.float64()),
    ("t_finished", pa.float64()),
    ("duration_s", pa.float64()),
    ("run_id", pa.string()),
]

#: Columns that differ between two runs of the same tasks (timing, run identity).
TIMING_COLUMNS = ("t_admitted", "t_finished", "duration_s", "run_id")
TIMING_MESSAGE_FIELDS = ("t_start", "t_end")


def output_schema(extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    return pa.schema(BASE_FIELDS + list((extra or {}).items()))


def task_row(task: TaskState, run_id: str, extra: Iterable[str] = ()) -> dict[str, Any]:
    prompt = sum(m.get("prompt_tokens") or 0 for m in task.history)
    completion = sum(m.get("completion_tokens") or 0 for m in task.history)
    finished = task.t_finished or task.t_admitted
    row: dict[str, Any] = {
        "id": task.id,
        "status": task.status,
        "error_type": task.error_type,
        "error": task.error,
        "reason": task.reason,
        "input": task.input if isinstance(task.input, str) else json.dumps(task.input, default=str),
        "messages": task.history,
        "result": json.dumps(task.result, default=str) if task.result else None,
        "attempts": task.attempts,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "t_admitted": task.t_admitted,
        "t_finished": finished,
        "duration_s": finished - task.t_admitted,
        "run_id": run_id,
    }
    for name in extra:
        row[name] = task.result.get(name)
    return row


def tasks_to_table(tasks: list[TaskState], run_id: str, schema: pa.Schema) -> pa.Table:
    extra = schema.names[len(BASE_FIELDS):]
    return pa.Table.from_pylist([task_row(t, run_id, extra) for t in tasks], schema=schema)
