"""The "Write your own workflow" example of the README, run exactly as
written (copied out of the document) on a real local Ray with the sim LLM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.integration.runs import env_with_repo, read_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DOC = REPO_ROOT / "README.md"


def example_code() -> str:
    section = DOC.read_text().split("### Write your own workflow", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_example_is_complete_and_short() -> None:
    code = example_code()
    assert len(code.splitlines()) < 50
    assert "from matrix_hpc.runtime import" in code and "matrix_hpc.workflows" not in code  # public API only
    compile(code, "quiz_maker.py", "exec")


def test_the_example_runs(tmp_path: Path) -> None:
    (tmp_path / "quiz_maker.py").write_text(example_code())
    topics = ["algebra", "volcanoes", "rivers", "jazz", "enzymes", "tides", "bridges", "prime numbers",
              "glaciers", "the Roman Empire", "photosynthesis", "black holes"]
    (tmp_path / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n"
                                                   for i, t in enumerate(topics)))
    proc = subprocess.run([sys.executable, "quiz_maker.py", "llm=sim", "dataset.path=topics.jsonl",
                           "output.dir=out", "run.progress_interval_s=0", "run.num_cpus=2"],
                          cwd=tmp_path, env=env_with_repo(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(f"t{i}" for i in range(len(topics)))
    for r in rows:
        assert [m["agent"] for m in r["messages"]] == ["writer", "judge"]
        assert r["question"] and r["verdict"] in ("strong", "weak")
        assert r["status"] == ("ok" if r["verdict"] == "strong" else "filtered")
        if r["status"] == "filtered":
            assert r["reason"] == "judge: weak question"
        assert r["messages"][0]["completion_tokens"] > 0
