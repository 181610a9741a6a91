"""The replay command as a user runs it: a subprocess, JSONL in, JSONL out, bad lines named."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "tau2_golden"


def _run(tmp_path: Path, domain: str, lines: list[str]) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "matrix_hpc.workflows.tau2", "replay", "--domain", domain]
    proc = subprocess.run(cmd + ["--input", str(source), "--output", str(target)], capture_output=True, text=True)
    rows = [json.loads(line) for line in target.read_text().splitlines()] if target.exists() else []
    return proc, rows


def _gold_lines(domain: str, count: int) -> tuple[list[str], list[dict]]:
    from matrix_hpc.workflows.tau2.tasks import tasks_by_id

    with gzip.open(GOLDEN / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as fp:
        expected = [json.loads(line) for line in fp][:count]
    tasks = tasks_by_id(domain)
    lines = []
    for row in expected:
        actions = (tasks[row["task_id"]].get("evaluation_criteria") or {}).get("actions") or []
        lines.append(json.dumps({"task_id": row["task_id"], "actions": actions}))
    return lines, expected


@pytest.mark.parametrize("domain", ["retail", "airline", "telecom"])
def test_replay_matches_tau2_and_names_bad_lines(tmp_path: Path, domain: str) -> None:
    lines, expected = _gold_lines(domain, 3)
    bad = ["{not json", json.dumps({"task_id": "no-such-task", "actions": []})]
    proc, rows = _run(tmp_path, domain, [lines[0], bad[0], lines[1], bad[1], lines[2]])
    assert proc.returncode == 1
    assert "line 2: not JSON" in proc.stderr
    assert "line 4: unknown task_id 'no-such-task'" in proc.stderr
    assert rows == expected


def test_requestor_is_checked_per_action(tmp_path: Path) -> None:
    line = json.dumps({"task_id": "0", "actions": [{"name": "calculate", "arguments": {}, "requestor": "system"}]})
    proc, rows = _run(tmp_path, "retail", [line])
    assert "line 1: actions[0]: \"requestor\" must be one of assistant, user, got 'system'" in proc.stderr
    assert rows == []


def test_missing_input_is_named(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "matrix_hpc.workflows.tau2", "replay", "--domain", "retail"]
    proc = subprocess.run(
        cmd + ["--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "none.jsonl does not exist" in proc.stderr
