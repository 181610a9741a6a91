"""coral and natural_reasoning end to end on a real local Ray with the
simulated LLM service, 10,000 tasks admitted at once (run.max_concurrent_tasks
=10000). One Ray for both runs; each run starts and stops its own sim replicas."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.store.layout import REJECTED_DIR, data_files
from tests.conftest import REPO_ROOT
from tests.integration.runs import read_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N_TASKS = 10_000
FAST_SIM = ["llm=sim", "llm.sim.num_replicas=2", f"llm.sim.capacity={N_TASKS}", "llm.sim.ttft_s=0.01",
            "llm.sim.time_per_output_token_s=0", "llm.sim.output_tokens=16", "llm.sim.output_tokens_jitter=8",
            "run.num_workers=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from make_workflow_samples import mmlu_pro_rows, web_doc_rows, write_jsonl
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("inputs")
    write_jsonl(out / "mmlu.jsonl", mmlu_pro_rows(N_TASKS))
    write_jsonl(out / "docs.jsonl", web_doc_rows(N_TASKS))
    return out


def run(overrides: list[str]) -> Any:
    from matrix_hpc.app.run import execute
    from matrix_hpc.cli.config_check import compose

    cfg = compose([*overrides, "run.progress_interval_s=0", "run.summary=false",
                   f"run.max_concurrent_tasks={N_TASKS}"], str(REPO_ROOT / "conf"))
    return execute(cfg)


def peak_overlap(rows: list[dict[str, Any]]) -> int:
    """Most tasks that were admitted and not yet finished at one instant."""
    events = sorted([(r["t_admitted"], 1) for r in rows] + [(r["t_finished"], -1) for r in rows])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


@pytest.mark.slow  # 30 s; ≥ 1,000 concurrent dialogues are also run by test_workflow_tau2_scale.py
def test_coral_10k_concurrent_dialogues(local_ray: None, inputs: Path, tmp_path: Path) -> None:
    from matrix_hpc.workflows.coral import summarize

    result = run(["workflow=coral", "dataset=mmlu_pro_sample", f"dataset.path={inputs / 'mmlu.jsonl'}",
                  f"output.dir={tmp_path / 'out'}", "workflow.max_turns=2", *FAST_SIM])
    rows = read_rows(tmp_path / "out")
    assert not result.interrupted
    assert sorted(int(r["id"]) for r in rows) == list(range(N_TASKS))
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["error"]][:3]
    assert peak_overlap(rows) > N_TASKS // 2  # far above the default concurrency of 1,000
    for r in rows:
        first = r["messages"][0]
        assert first["agent"] == "student" and "(A) " in first["content"]
        assert r["turns"] in (1, 2) and len(r["answers"]) == r["turns"]
        assert r["answer_key"] == json.loads(r["input"])["answer"]
        if r["agreed"]:
            assert r["agreed_answer"] == r["teacher_answer"] == r["student_answer"] and r["stop_reason"] == "agreed"
            assert r["correct"] == (r["agreed_answer"] == r["answer_key"])
        else:
            assert r["turns"] == 2 and r["stop_reason"] == "max_turns" and not r["correct"]
        assert r["completion_tokens"] > 0
    s = summarize(rows)
    assert 0 < s["agreement_rate"] < 1 and 1 <= s["mean_turns"] <= 2


def test_natural_reasoning_10k_concurrent_documents(local_ray: None, inputs: Path, tmp_path: Path) -> None:
    from matrix_hpc.workflows.natural_reasoning import CATEGORIES, summarize

    # min_score=1 and no \boxed{} requirement let the sim's random answers reach every stage.
    result = run(["workflow=natural_reasoning", "dataset=web_docs_sample", f"dataset.path={inputs / 'docs.jsonl'}",
                  f"output.dir={tmp_path / 'out'}", "workflow.min_score=1", "workflow.require_boxed=false",
                  "output.keep=ok", *FAST_SIM])
    assert not result.interrupted
    kept = [r for f in data_files(tmp_path / "out", include_rejected=False) for r in _read(f)]
    rejected = [r for f in (tmp_path / "out" / REJECTED_DIR).glob("shard=*/*.parquet") for r in _read(f)]
    assert {r["status"] for r in kept} == {"ok"} and {r["status"] for r in rejected} == {"filtered"}
    rows = kept + rejected
    assert len({r["id"] for r in rows}) == len(rows) == N_TASKS
    by_kind: dict[str, set[str | None]] = {}
    for r in rows:
        kind = json.loads(r["input"])["kind"]
        by_kind.setdefault(kind, set()).add(r["dropped_at"])
        if r["status"] == "filtered":
            assert r["reason"].startswith(r["dropped_at"] + ": ")
        else:
            assert r["question"] and r["category"] in CATEGORIES and len(r["scores"]) == 4
    assert by_kind["other_language"] == {"filter"} and by_kind["empty"] == {"filter"}
    s = summarize(rows)
    assert s["questions"] == len(kept) > 0 and all(s["dropped_at"][stage] > 0 for stage in ("filter", "score"))


def _read(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
