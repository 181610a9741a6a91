"""tau2 tasks: loading them (all, or a split) and building a task's environment as tau2 does.

A task is kept as tau2's JSON (a dict): the workflow only reads a few keys
(``id``, ``initial_state``, ``evaluation_criteria``) and must carry the rest
through untouched.

Example::

    tasks = load_tasks("telecom", split="base")        # 114 task dicts
    env = build_environment("telecom", tasks[0])      # initial state applied
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from matrix_hpc.workflows.tau2.db import data_dir, read_data_file
from matrix_hpc.workflows.tau2.domains import domain_module
from matrix_hpc.workflows.tau2.environment import EnvFunctionCall, Tau2Environment

Task = dict[str, Any]


@functools.cache
def _all_tasks(domain: str, folder: Path) -> tuple[Task, ...]:
    tasks = read_data_file(folder / "tasks.json")
    if isinstance(tasks, dict) and "tasks" in tasks:
        tasks = tasks["tasks"]
    return tuple(tasks)


def load_splits(domain: str) -> dict[str, list[str]]:
    """Task id lists by split name (``split_tasks.json``)."""
    return read_data_file(data_dir(domain) / "split_tasks.json")  # type: ignore[no-any-return]


def load_tasks(domain: str, split: str | None = "base") -> list[Task]:
    """The domain's tasks in file order; ``split=None`` for all (tau2's default split is ``base``)."""
    tasks = _all_tasks(domain, data_dir(domain))
    if split is None:
        return list(tasks)
    splits = load_splits(domain)
    if split not in splits:
        raise ValueError(f"unknown {domain} split {split!r}; valid splits: {', '.join(splits)}")
    wanted = set(splits[split])
    return [task for task in tasks if task["id"] in wanted]


def tasks_by_id(domain: str) -> dict[str, Task]:
    return {task["id"]: task for task in _all_tasks(domain, data_dir(domain))}


@functools.cache
def _base(domain: str, folder: Path) -> Any:
    return domain_module(domain).load_base(folder)


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Deep-merge ``update`` into ``into`` (nested dicts merge, anything else replaces)."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _updated(db: BaseModel, update: Mapping[str, Any]) -> BaseModel:
    data = db.model_dump()
    _merge(data, update)
    return type(db).model_validate(data)


def apply_initial_state(env: Tau2Environment, task: Mapping[str, Any]) -> None:
    """Initialisation data, then initialisation actions (each followed by a sync), then a final sync."""
    state = task.get("initial_state") or {}
    if state.get("message_history"):
        raise NotImplementedError(
            f"task {task.get('id')!r} starts from a message history; no retail/airline/telecom task does"
        )
    data = state.get("initialization_data") or {}
    if data.get("agent_data") is not None:
        env.tools.db = _updated(env.tools.db, data["agent_data"])
    if data.get("user_data") is not None:
        if env.user_tools is None:
            raise ValueError(f"task {task.get('id')!r} has user_data but domain {env.domain} has no user side")
        env.user_tools.db = _updated(env.user_tools.db, data["user_data"])
    for action in state.get("initialization_actions") or []:
        env.run_function(EnvFunctionCall.from_dict(action))
    env.sync()


def new_environment(domain: str) -> Tau2Environment:
    """A fresh environment at the domain's starting DB(s)."""
    return domain_module(domain).new_environment(_base(domain, data_dir(domain)))  # type: ignore[no-any-return]


def build_environment(domain: str, task: Mapping[str, Any]) -> Tau2Environment:
    """A fresh environment for ``task``, exactly as tau2's evaluator builds its gold environment."""
    env = new_environment(domain)
    apply_initial_state(env, task)
    return env
