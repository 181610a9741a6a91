"""Workflow rows of tau2 tasks: what a row holds, which rows a run selects, and writing them.

A row is ``{"id": "<task_id>#<trial>", "task_id", "trial", "seed", "task": "<tau2 task JSON>"}``;
the task travels as JSON text so every domain's tasks fit one column type.
Trial seeds are drawn as tau2 draws them: ``random.seed(300)`` then one
``randint(0, 1000000)`` per trial, so trial ``k`` has the seed tau2 gives it.

Example::

    python -m matrix_hpc.workflows.tau2 tasks --domain airline --trials 4 --out data/tau2_airline.jsonl
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matrix_hpc.workflows.tau2.tasks import load_splits, load_tasks

DEFAULT_SEED = 300  # tau2's
MAKE_ROWS = "python -m matrix_hpc.workflows.tau2 tasks --domain D --out rows.jsonl"


def trial_seeds(trials: int, seed: int = DEFAULT_SEED) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, 1000000) for _ in range(trials)]


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    trial: int
    seed: int
    task: dict[str, Any]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskRow:
        missing = [k for k in ("task", "trial", "seed") if k not in row]
        if missing:
            raise ValueError(f"tau2 row {row.get('id')!r} lacks {missing}; write rows with `{MAKE_ROWS}`")
        task = row["task"]
        if isinstance(task, str):
            try:
                task = json.loads(task)
            except json.JSONDecodeError as e:
                raise ValueError(f"tau2 row {row.get('id')!r}: 'task' is not JSON ({e.msg})") from None
        if not isinstance(task, dict) or "id" not in task or "user_scenario" not in task:
            raise ValueError(f"tau2 row {row.get('id')!r}: 'task' is not a tau2 task (needs id and user_scenario)")
        return cls(str(task["id"]), int(row["trial"]), int(row["seed"]), task)


def unselected(row: TaskRow, split: str | None, task_ids: Sequence[str] | None, trials: int,
               domain: str | None = None) -> str | None:
    """Why a run's settings leave this row out (None: selected)."""
    if task_ids is not None and row.task_id not in {str(t) for t in task_ids}:
        return f"task {row.task_id!r} is not in workflow.task_ids"
    if row.trial >= trials:
        return f"trial {row.trial} is beyond workflow.trials={trials}"
    if split is not None and task_ids is None and domain is not None:
        if row.task_id not in set(load_splits(domain).get(split, ())):
            return f"task {row.task_id!r} is not in the {domain} split {split!r}"
    return None


def task_rows(domain: str, split: str | None = "base", task_ids: Sequence[str] | None = None,
              trials: int = 1, seed: int = DEFAULT_SEED) -> Iterator[dict[str, Any]]:
    tasks = load_tasks(domain, split=split if task_ids is None else None)
    if task_ids is not None:
        wanted = {str(t) for t in task_ids}
        unknown = wanted - {str(t["id"]) for t in tasks}
        if unknown:
            raise ValueError(f"unknown {domain} task ids: {sorted(unknown)[:10]}")
        tasks = [t for t in tasks if str(t["id"]) in wanted]
    for trial, trial_seed in enumerate(trial_seeds(trials, seed)):
        for task in tasks:
            yield {"id": f"{task['id']}#{trial}", "task_id": str(task["id"]), "trial": trial, "seed": trial_seed,
                   "task": json.dumps(task)}
