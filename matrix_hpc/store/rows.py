"""The output row: one per task, whatever its fate."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

import pyarrow as pa


class TaskLike(Protocol):
    """What the store reads of a finished task (the runtime's TaskState has
    these attributes; the store does not import the runtime)."""

    id: str
    input: Any
    history: list[dict[str, Any]]
    result: dict[str, Any]
    attempts: int
    status: str | None
    error_type: str | None
    error: str | None
    reason: str | None
    t_admitted: float
    t_finished: float | None
    sample: int
    seed: int | None


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
    ("sample", pa.int32()),  # which of run.samples_per_input draws of the input row (0..N-1)
    ("seed", pa.int64()),  # that draw's seed (null with one draw per row)
]

#: Columns that differ between two runs of the same tasks (timing, run identity).
TIMING_COLUMNS = ("t_admitted", "t_finished", "duration_s", "run_id")
TIMING_MESSAGE_FIELDS = ("t_start", "t_end")


def output_schema(extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The base columns and a workflow's typed result columns (``extra``), which
    must not reuse a base column's name (readers refuse a duplicate column)."""
    clash = sorted(set(extra or {}) & {name for name, _ in BASE_FIELDS})
    if clash:
        raise ValueError(f"the workflow's result column(s) {clash} reuse names of the output's own columns; rename "
                         "them in its result_columns() (the own columns: " + ", ".join(n for n, _ in BASE_FIELDS) + ")")
    return pa.schema(BASE_FIELDS + list((extra or {}).items()))


def task_row(task: TaskLike, run_id: str, extra: Iterable[str] = ()) -> dict[str, Any]:
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
        "sample": task.sample,
        "seed": task.seed,
    }
    for name in extra:
        row[name] = task.result.get(name)
    return row


ENCODING_ERROR = "OutputEncodingError"


def tasks_to_table(tasks: list[TaskLike], run_id: str, schema: pa.Schema) -> pa.Table:
    """The rows of ``tasks`` as one table (raises when a value does not fit
    the schema; :func:`encode_rows` turns such rows into failed rows)."""
    extra = schema.names[len(BASE_FIELDS):]
    return pa.Table.from_pylist([task_row(t, run_id, extra) for t in tasks], schema=schema)


def encode_rows(tasks: list[TaskLike], run_id: str, schema: pa.Schema) -> tuple[pa.Table, int]:
    """Encode ``tasks``; a row that cannot be encoded becomes a ``failed`` row
    naming the column, the value's Python type and the Arrow type expected.

    Returns the table and how many rows were turned into failed rows. The
    whole batch is tried first; only a failing batch is encoded row by row.
    """
    extra = schema.names[len(BASE_FIELDS):]
    rows = [_safe_row(t, run_id, extra) for t in tasks]
    try:
        return pa.Table.from_pylist(rows, schema=schema), 0
    except _ENCODE_ERRORS:
        pass
    fixed = [_encodable(row, schema) for row in rows]
    bad = sum(1 for row, new in zip(rows, fixed, strict=True) if new is not row)
    return pa.Table.from_pylist(fixed, schema=schema), bad


_ENCODE_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


def _safe_row(task: TaskLike, run_id: str, extra: list[str]) -> dict[str, Any]:
    try:
        return task_row(task, run_id, extra)
    except Exception as e:  # a result/history that cannot even be read into a row
        return _failed_row(getattr(task, "id", "?"), run_id, f"the task's row could not be built: "
                                                          f"{type(e).__name__}: {e}", None)


def _encodable(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """``row`` itself when it encodes, else a failed row naming the culprits."""
    try:
        pa.Table.from_pylist([row], schema=schema)
        return row
    except _ENCODE_ERRORS:
        pass
    culprits = [_describe(name, row.get(name), schema.field(name).type, e)
                for name in schema.names if (e := _encode_error(row.get(name), schema.field(name).type))]
    error = "; ".join(culprits) or "the row does not match the output schema"
    failed = dict(row, status="failed", error_type=ENCODING_ERROR, error=f"output row not writable: {error}",
                  reason=None)
    for name in schema.names:
        if _encode_error(failed.get(name), schema.field(name).type):
            failed[name] = None
    try:
        pa.Table.from_pylist([failed], schema=schema)
        return failed
    except _ENCODE_ERRORS:
        return _failed_row(str(row.get("id")), row.get("run_id"), failed["error"], row.get("input"))


def _encode_error(value: Any, arrow_type: pa.DataType) -> Exception | None:
    try:
        pa.array([value], type=arrow_type)
        return None
    except _ENCODE_ERRORS as e:
        return e


def _describe(column: str, value: Any, arrow_type: pa.DataType, error: Exception) -> str:
    return (f"column {column!r}: a {type(value).__name__} value ({str(value)[:80]!r}) does not fit "
            f"Arrow type {arrow_type} ({type(error).__name__}: {str(error)[:120]})")


def _failed_row(task_id: str, run_id: Any, error: str, input_value: Any) -> dict[str, Any]:
    return {"id": task_id, "status": "failed", "error_type": ENCODING_ERROR, "error": error,
            "input": input_value if isinstance(input_value, str) else None,
            "run_id": run_id if isinstance(run_id, str) else None, "attempts": 1}
