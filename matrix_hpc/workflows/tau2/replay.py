"""Replay action lists through fresh environments: the stable interface for checking against tau2.

Input, one JSON object a line::

    {"task_id": "...", "actions": [{"name": "...", "arguments": {...}, "requestor": "assistant"|"user"}]}

(``requestor`` is optional, default ``assistant``). Each line gets a fresh
environment for its task, initial state applied, then every action in order
through :meth:`Tau2Environment.call` -- no sync between them, as tau2's
evaluator replays gold actions. Output, one line per good input line::

    {"task_id": "...", "outputs": [{"ok": true, "text": "..."}], "db_hash": "...", "user_db_hash": "..." | null}

A bad input line is reported (naming its number) and skipped; the others go on.
With ``--live`` the environment syncs after every call, as in a dialogue
(this matters in telecom only).

Example::

    python -m matrix_hpc.workflows.tau2 replay --domain retail --input actions.jsonl --output results.jsonl
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from matrix_hpc.workflows.tau2.environment import REQUESTORS
from matrix_hpc.workflows.tau2.tasks import Task, build_environment, tasks_by_id


@dataclass(frozen=True)
class Action:
    name: str
    arguments: dict[str, Any]
    requestor: str = "assistant"


class BadLine(ValueError):
    """An input line that cannot be replayed; the message says what is wrong with it."""


def parse_line(text: str, known_ids: Mapping[str, Task]) -> tuple[str, list[Action]]:
    """(task id, actions) of one input line; raises :class:`BadLine` saying what is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise BadLine(f"expected a JSON object, got {type(row).__name__}")
    task_id = row.get("task_id")
    if not isinstance(task_id, str):
        raise BadLine('"task_id" must be a string')
    if task_id not in known_ids:
        raise BadLine(f"unknown task_id {task_id!r}")
    raw_actions = row.get("actions")
    if not isinstance(raw_actions, list):
        raise BadLine('"actions" must be a list')
    return task_id, [_parse_action(index, raw) for index, raw in enumerate(raw_actions)]


def _parse_action(index: int, raw: Any) -> Action:
    where = f"actions[{index}]"
    if not isinstance(raw, dict):
        raise BadLine(f"{where} must be an object with name, arguments and optional requestor")
    name, arguments = raw.get("name"), raw.get("arguments")
    requestor = raw.get("requestor", "assistant")
    if not isinstance(name, str):
        raise BadLine(f'{where}: "name" must be a string')
    if not isinstance(arguments, dict):
        raise BadLine(f'{where}: "arguments" must be an object (use {{}} for a tool without parameters)')
    if requestor not in REQUESTORS:
        raise BadLine(f'{where}: "requestor" must be one of {", ".join(REQUESTORS)}, got {requestor!r}')
    return Action(name=name, arguments=arguments, requestor=requestor)


def replay_task(domain: str, task: Task, actions: Iterable[Action], live: bool = False) -> dict[str, Any]:
    """One output row: the actions through a fresh environment for ``task``.

    ``live`` syncs after every call, as a dialogue does (``Tau2Environment.step``);
    the default replays as tau2's evaluator replays gold actions.
    """
    env = build_environment(domain, task)
    run = env.step if live else env.call
    outputs = [run(a.name, a.arguments, a.requestor) for a in actions]
    return {
        "task_id": task["id"],
        "outputs": [{"ok": out.ok, "text": out.text} for out in outputs],
        "db_hash": env.db_hash(),
        "user_db_hash": env.user_db_hash(),
    }


@dataclass
class ReplaySummary:
    replayed: int = 0
    bad_lines: int = 0


def replay_stream(domain: str, lines: Iterable[str], out: TextIO, errors: TextIO, live: bool = False) -> ReplaySummary:
    """Replay every input line to ``out``; report bad lines to ``errors`` (``line N: ...``)."""
    known = tasks_by_id(domain)
    summary = ReplaySummary()
    for number, text in _numbered(lines):
        try:
            task_id, actions = parse_line(text, known)
        except BadLine as exc:
            errors.write(f"line {number}: {exc}; line skipped\n")
            summary.bad_lines += 1
            continue
        out.write(json.dumps(replay_task(domain, known[task_id], actions, live), ensure_ascii=False) + "\n")
        summary.replayed += 1
    return summary


def _numbered(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    for number, text in enumerate(lines, start=1):
        if text.strip():
            yield number, text
