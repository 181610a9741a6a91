"""What the tau2 golden tests share: tau2-bench's recorded outputs and the comparison with ours.

tests/data/tau2_golden/ was written by ``scripts/tau2_golden.py`` running
tau2-bench (a2c02472) itself; see tests/unit/test_tau2_golden.py.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from matrix_hpc.workflows.tau2.replay import Action

GOLDEN = Path(__file__).resolve().parent / "data" / "tau2_golden"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fp:  # type: ignore[operator]
        return [json.loads(line) for line in fp if line.strip()]


def gold_actions(task: dict[str, Any]) -> list[Action]:
    criteria = task.get("evaluation_criteria") or {}
    return [Action(a["name"], a["arguments"], a.get("requestor", "assistant")) for a in criteria.get("actions") or []]


def golden_rows(name: str) -> list[dict[str, Any]]:
    return read_jsonl(GOLDEN / name)


_PYDANTIC_LINK = re.compile(r"https://errors\.pydantic\.dev/[0-9.]+/")


def masked(output: dict[str, Any]) -> dict[str, Any]:
    """The output with pydantic's version in its error links masked (a library version, not tau2's behaviour)."""
    return {**output, "text": _PYDANTIC_LINK.sub("https://errors.pydantic.dev/<version>/", output["text"])}


def assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for index, (ours, theirs) in enumerate(zip(got["outputs"], expected["outputs"], strict=False)):
        ours, theirs = masked(ours), masked(theirs)
        assert ours == theirs, f"task {got['task_id']!r}, action {index}: ours {ours!r} != tau2's {theirs!r}"
    assert len(got["outputs"]) == len(expected["outputs"])
    assert got["db_hash"] == expected["db_hash"], f"task {got['task_id']!r}: agent DB differs from tau2's"
    assert got["user_db_hash"] == expected["user_db_hash"], f"task {got['task_id']!r}: user DB differs from tau2's"
