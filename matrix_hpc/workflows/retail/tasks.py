"""tau2-bench retail tasks: typed objects and workflow input rows.

Example::

    tasks = load_tasks(split="test")           # 40 typed RetailTask objects
    rows = [task_to_row(t) for t in tasks]     # JSON-serialisable, each with an "id"
    RetailTask.from_row(rows[0]) == tasks[0]   # True

The run's input is a JSONL file of these rows (``dataset.path``)::

    python -m matrix_hpc.workflows.retail --split test --out data/tau2_retail_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matrix_hpc.workflows.retail.db import default_data_dir

SPLITS = ("base", "train", "test")


@dataclass(frozen=True)
class GoldAction:
    action_id: str  # e.g. "0_4"
    name: str  # tool name
    arguments: dict[str, Any]  # tool arguments, as the agent should send them
    compare_args: tuple[str, ...] | None = None  # args tau2's action check compares (None: all)


@dataclass(frozen=True)
class UserInstructions:
    reason_for_call: str  # why the simulated user calls
    known_info: str | None = None  # what the user knows (name, zip, email, ...)
    unknown_info: str | None = None  # what the user does not know
    task_instructions: str | None = None  # how the user behaves
    domain: str = "retail"


@dataclass(frozen=True)
class RetailTask:
    id: str  # tau2 task id ("0".."113")
    instructions: UserInstructions  # the user simulator's scenario
    actions: tuple[GoldAction, ...]  # gold trajectory replayed for the reward
    communicate_info: tuple[str, ...] = ()  # strings the agent must say
    reward_basis: tuple[str, ...] = ("DB", "COMMUNICATE")  # as in tasks.json
    persona: str | None = None  # optional user persona
    purpose: str | None = None  # task author's note on what it tests
    nl_assertions: tuple[str, ...] | None = None  # LLM-judged assertions (none in retail)

    @property
    def user_scenario(self) -> str:
        """The scenario text handed to the user-simulator LLM."""
        ins = self.instructions
        parts = [f"Persona:\n\t{self.persona}"] if self.persona else []
        parts.append(f"Domain: {ins.domain}")
        parts.append(f"Reason for call:\n\t{ins.reason_for_call}")
        for label, text in (("Known info", ins.known_info), ("Unknown info", ins.unknown_info),
                            ("Task instructions", ins.task_instructions)):
            if text:
                parts.append(f"{label}:\n\t{text}")
        return "\n".join(parts)

    @property
    def gold_calls(self) -> list[tuple[str, dict[str, Any]]]:
        return [(a.name, a.arguments) for a in self.actions]

    @classmethod
    def from_tau2(cls, raw: Mapping[str, Any]) -> RetailTask:
        """Parse one entry of tau2's tasks.json."""
        scenario = raw.get("user_scenario") or {}
        ins = scenario.get("instructions") or {}
        if isinstance(ins, str):  # tau2 also allows free-text instructions
            ins = {"reason_for_call": ins}
        crit = raw.get("evaluation_criteria") or {}
        actions = tuple(
            GoldAction(
                action_id=str(a.get("action_id", f"{raw['id']}_{i}")),
                name=a["name"],
                arguments=dict(a.get("arguments") or {}),
                compare_args=tuple(a["compare_args"]) if a.get("compare_args") is not None else None,
            )
            for i, a in enumerate(crit.get("actions") or [])
        )
        nl = crit.get("nl_assertions")
        return cls(
            id=str(raw["id"]),
            instructions=UserInstructions(
                reason_for_call=ins.get("reason_for_call", ""),
                known_info=ins.get("known_info"),
                unknown_info=ins.get("unknown_info"),
                task_instructions=ins.get("task_instructions"),
                domain=ins.get("domain") or "retail",
            ),
            actions=actions,
            communicate_info=tuple(crit.get("communicate_info") or ()),
            reward_basis=tuple(crit.get("reward_basis") or ("DB", "COMMUNICATE")),
            persona=scenario.get("persona"),
            purpose=(raw.get("description") or {}).get("purpose"),
            nl_assertions=tuple(nl) if nl is not None else None,
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RetailTask:
        """Inverse of :func:`task_to_row` (a trial row's ``task_id`` names the tau2 task)."""
        return cls(
            id=str(row.get("task_id") or row["id"]),
            instructions=UserInstructions(**row["instructions"]),
            actions=tuple(
                GoldAction(a["action_id"], a["name"], json.loads(a["arguments"]),
                           tuple(a["compare_args"]) if a.get("compare_args") is not None else None)
                for a in row["gold_actions"]
            ),
            communicate_info=tuple(row.get("communicate_info") or ()),
            reward_basis=tuple(row.get("reward_basis") or ("DB", "COMMUNICATE")),
            persona=row.get("persona"),
            purpose=row.get("purpose"),
            nl_assertions=tuple(row["nl_assertions"]) if row.get("nl_assertions") is not None else None,
        )


def task_to_row(task: RetailTask) -> dict[str, Any]:
    """A workflow input row: JSON-serialisable, one ``id``, uniform types per column.

    Tool arguments differ per tool, so each gold action carries them as a JSON
    string (``arguments``) to keep the column's type uniform for Parquet.
    """
    ins = task.instructions
    return {
        "id": task.id,
        "domain": ins.domain,
        "user_scenario": task.user_scenario,
        "instructions": {
            "reason_for_call": ins.reason_for_call, "known_info": ins.known_info,
            "unknown_info": ins.unknown_info, "task_instructions": ins.task_instructions,
            "domain": ins.domain,
        },
        "persona": task.persona,
        "purpose": task.purpose,
        "gold_actions": [
            {"action_id": a.action_id, "name": a.name, "arguments": json.dumps(a.arguments, sort_keys=True),
             "compare_args": list(a.compare_args) if a.compare_args is not None else None}
            for a in task.actions
        ],
        "communicate_info": list(task.communicate_info),
        "reward_basis": list(task.reward_basis),
        "nl_assertions": list(task.nl_assertions) if task.nl_assertions is not None else None,
    }


def _split_ids(data_dir: Path, split: str) -> list[str] | None:
    if split == "base" and not (data_dir / "split_tasks.json").exists():
        return None
    path = data_dir / "split_tasks.json"
    with path.open() as f:
        splits = json.load(f)
    if split not in splits:
        raise ValueError(f"unknown split {split!r} in {path}; choose one of {sorted(splits)}")
    return [str(i) for i in splits[split]]


def load_tasks(
    data_dir: str | os.PathLike[str] | None = None, split: str = "base", tasks_file: str = "tasks.json"
) -> list[RetailTask]:
    """Load tau2 retail tasks (``split``: base = all 114, train = 74, test = 40), in file order."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / tasks_file
    if not path.exists():
        raise FileNotFoundError(
            f"retail tasks {path} not found; pass data_dir (or set $MATRIX_HPC_TAU2_RETAIL_DIR) "
            "to the folder holding tau2-bench's retail tasks.json and db.json"
        )
    with path.open() as f:
        tasks = [RetailTask.from_tau2(raw) for raw in json.load(f)]
    wanted = _split_ids(root, split)
    if wanted is None:
        return tasks
    keep = set(wanted)
    return [t for t in tasks if t.id in keep]


def iter_task_rows(
    data_dir: str | os.PathLike[str] | None = None, split: str = "base"
) -> Iterator[dict[str, Any]]:
    """Input rows for the retail workflow, one per task."""
    for task in load_tasks(data_dir, split):
        yield task_to_row(task)


@dataclass
class RetailTasksConf:
    """Where the retail tasks come from (the dataset config of workflow=retail_tool_use)."""

    data_dir: str | None = None  # folder with tasks.json/db.json/policy.md; None: default_data_dir()
    split: str = "base"  # base (114 tasks), train (74) or test (40)
    task_ids: list[str] = field(default_factory=list)  # only these ids; empty: all of the split

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"RetailTasksConf.split={self.split!r}; choose one of {list(SPLITS)}")

    def rows(self) -> Iterator[dict[str, Any]]:
        wanted = set(self.task_ids)
        for row in iter_task_rows(self.data_dir, self.split):
            if not wanted or row["id"] in wanted:
                yield row


def load_policy(data_dir: str | os.PathLike[str] | None = None) -> str:
    """The agent's system prompt: the retail policy text."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    return (root / "policy.md").read_text()


def trial_rows(row: dict[str, Any], trials: int) -> Iterator[dict[str, Any]]:
    """``trials`` rows of one task (ids ``<id>/<k>``, ``task_id`` = the tau2 id); one row as-is when 1."""
    if trials <= 1:
        yield row
        return
    for k in range(trials):
        yield {**row, "id": f"{row['id']}/{k}", "task_id": row["id"]}


def write_rows_jsonl(out: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                     split: str = "base", trials: int = 1) -> int:
    """Write the split's input rows to a JSONL file (atomically); returns the row count.

    ``trials`` > 1 writes each task that many times (tau2's ``num_trials``).
    """
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w") as f:
        for task_row in iter_task_rows(data_dir, split):
            for row in trial_rows(task_row, trials):
                f.write(json.dumps(row) + "\n")
                count += 1
    tmp.replace(path)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.workflows.retail",
                                     description="write tau2 retail tasks as workflow input rows (JSONL)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--split", default="base", choices=SPLITS, help="base (114), train (74) or test (40)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with tasks.json (default: $MATRIX_HPC_TAU2_RETAIL_DIR)")
    parser.add_argument("--trials", type=int, default=1, help="rows per task (ids <id>/<k>), like tau2's num_trials")
    args = parser.parse_args(argv)
    count = write_rows_jsonl(args.out, args.data_dir, args.split, args.trials)
    print(f"wrote {count} retail task rows ({args.split}) to {args.out}", file=sys.stderr)
    return 0
