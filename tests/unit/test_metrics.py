"""matrix_hpc.metrics outside Ray (a no-op that costs little) and the
Prometheus plumbing of matrix_hpc.cluster.monitoring that needs no server:
the config it writes, the file-SD lists, the error for a missing binary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from matrix_hpc import metrics
from matrix_hpc.cluster.monitoring import (
    MonitoringError,
    PrometheusConf,
    PrometheusServer,
    prometheus_config,
    write_targets,
)


def test_recording_outside_ray_is_a_cheap_no_op() -> None:
    assert not metrics.ray_connected()  # unit tests run without Ray
    m = metrics.Metric("counter", "matrix_test_noop_total", "test", ("role",))
    n, batches = 20_000, []
    for _ in range(5):  # the best of 5: a busy machine slows some batches, not the code
        t0 = time.perf_counter()
        for _ in range(n):
            m.inc(1, "a")
        batches.append((time.perf_counter() - t0) / n * 1e6)
    per_call_us = min(batches)
    assert m._impl in (None, False) and per_call_us < 5, per_call_us  # no Ray object was made


def test_labels_are_the_run_labels_then_the_call_site_ones() -> None:
    m = metrics.Metric("histogram", "matrix_test_tags_seconds", "test", ("role", "error_type"), (1.0,))
    metrics.set_run("run-1", "coral")
    try:
        assert m._tags(("student", "ValueError")) == {"run_id": "run-1", "workflow": "coral", "role": "student",
                                                      "error_type": "ValueError"}
        with pytest.raises(ValueError):  # a call site that forgets a label is a bug, not a silent blank
            m._tags(("student",))
        metrics.set_run("run-2", "coral")  # a new run in the process: cached label dicts are dropped
        assert m._tags(("student", "ValueError"))["run_id"] == "run-2"
    finally:
        metrics.set_run("", "")


def test_deltas_publish_only_the_increase() -> None:
    seen: list[tuple[float, tuple[str, ...]]] = []

    class Recorder(metrics.Metric):
        def inc(self, value: float = 1.0, *tags: str) -> None:
            seen.append((value, tags))

    m = Recorder("counter", "matrix_test_deltas_total", "test", ("status",))
    pub = metrics.Deltas()
    for total in (0, 3, 3, 10):
        pub.publish(m, total, "ok")
    pub.publish(m, 2, "failed")
    assert seen == [(3, ("ok",)), (7, ("ok",)), (2, ("failed",))]


def test_every_metric_name_is_unique_and_prometheus_safe() -> None:
    names = [m.name for m in metrics._ALL if not m.name.startswith("matrix_test_")]
    assert len(names) == len(set(names))
    for m in metrics._ALL:
        assert m.name.startswith("matrix_") and m.name.replace("_", "").isalnum()
        assert m.tag_keys[:2] == ("run_id", "workflow") and "task_id" not in m.tag_keys  # bounded labels
        if m.kind == "counter":
            assert m.name.endswith("_total")


def test_config_scrapes_ray_and_vllm_with_the_key_by_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    config = prometheus_config(1.5, tmp_path / "ray.json", tmp_path / "vllm.json", key_file)
    assert config["global"]["scrape_interval"] == "1500ms"
    ray_job, vllm_job = config["scrape_configs"]
    assert ray_job["file_sd_configs"][0]["files"] == [str(tmp_path / "ray.json")]
    assert vllm_job["authorization"] == {"type": "Bearer", "credentials_file": str(key_file)}
    assert [j["job_name"] for j in prometheus_config(1, tmp_path / "r", None, None)["scrape_configs"]] == ["ray"]


def test_each_deployed_service_is_a_job_with_its_own_key_file(tmp_path: Path) -> None:
    services = {"b": (tmp_path / "b.json", tmp_path / "key-b"), "a": (tmp_path / "a.json", None)}
    jobs = prometheus_config(5, tmp_path / "ray.json", None, None, services)["scrape_configs"]
    assert [j["job_name"] for j in jobs] == ["ray", "vllm-a", "vllm-b"]
    assert "authorization" not in jobs[1] and jobs[2]["file_sd_configs"][0]["files"] == [str(tmp_path / "b.json")]
    assert jobs[2]["authorization"] == {"type": "Bearer", "credentials_file": str(tmp_path / "key-b")}


def test_targets_file_is_replaced_whole_and_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    assert write_targets(path, ["b:2", "a:1", "a:1"], {"job": "ray"})
    assert json.loads(path.read_text()) == [{"targets": ["a:1", "b:2"], "labels": {"job": "ray"}}]
    assert not write_targets(path, ["a:1", "b:2"], {"job": "ray"})
    assert write_targets(path, [], {"job": "ray"}) and json.loads(path.read_text())[0]["targets"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_missing_prometheus_binary_names_the_fix(tmp_path: Path) -> None:
    server = PrometheusServer(PrometheusConf(binary="no-such-prometheus"), tmp_path / "c", tmp_path / "d",
                              tmp_path / "log")
    with pytest.raises(MonitoringError, match=r"apt-get install prometheus.*prometheus\.binary"):
        server.start()


def test_bad_intervals_are_refused() -> None:
    with pytest.raises(ValueError, match="prometheus.scrape_interval_s"):
        PrometheusConf(scrape_interval_s=0)


def test_the_switch_turns_recording_off_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.SWITCH_ENV, "off")
    m = metrics.Metric("gauge", "matrix_test_switch", "test")
    m.set(1.0)
    assert m._impl is False  # cached: later records skip even the Ray check


def test_a_failing_record_never_reaches_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def inc(self, value: float, tags: dict[str, str]) -> None:
            raise RuntimeError("Ray is shutting down")

    m = metrics.Metric("counter", "matrix_test_broken_total", "test")
    m._impl = Broken()
    m.inc(1)  # no exception: the step or commit that records goes on
    assert m._impl is False and "matrix_test_broken_total" in caplog.text


def test_monitoring_without_prometheus_fails_before_ray_with_the_fix(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.cli.config_check import compose
    from matrix_hpc.cli.run_cmd import run_from_config

    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "1", "text": "x"}\n')
    cfg = compose([f"dataset.path={data}", f"output.dir={tmp_path / 'out'}", "monitoring=true",
                   "prometheus.binary=no-such-prometheus"], str(Path(__file__).resolve().parents[2] / "conf"))
    assert run_from_config(cfg) != 0
    err = capsys.readouterr().err
    assert "no-such-prometheus" in err and "apt-get install prometheus" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "_matrix" / "monitoring").exists()


def test_batched_histogram_publishes_prometheus_histogram_series() -> None:
    sent: dict[tuple[str, tuple[str, ...]], float] = {}

    class Recorder(metrics.Metric):
        def set(self, value: float, *tags: str) -> None:
            sent[(self.name, tags)] = value

    h = metrics.BatchedHistogram("matrix_test_batched_seconds", "test", ("role",), (0.1, 1.0), publish_s=3600)
    for part in ("_bucket", "_sum", "_count"):  # record into dicts instead of Ray
        m = getattr(h, part)
        m.__class__ = Recorder
    for v in (0.05, 0.1, 0.5, 2.0, 3.0):
        h.observe(v, "student")  # the first observation publishes at once, the rest wait for publish_s
    assert sent[("matrix_test_batched_seconds_count", ("student",))] == 1
    h.flush()
    assert {le: sent[("matrix_test_batched_seconds_bucket", ("student", le))] for le in ("0.1", "1.0", "+Inf")} == \
        {"0.1": 2, "1.0": 3, "+Inf": 5}  # cumulative, `le` inclusive as Prometheus has it
    assert sent[("matrix_test_batched_seconds_count", ("student",))] == 5
    assert sent[("matrix_test_batched_seconds_sum", ("student",))] == pytest.approx(5.65)


def test_batched_counters_and_gauges_reach_ray_once_per_publish() -> None:
    sent: list[tuple[str, str, float]] = []

    class FakeRay:  # stands for a ray.util.metrics object: what reaches Ray, in order
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, value: float, tags: dict[str, str]) -> None:
            sent.append((self.name, tags["replica"], value))

        def set(self, value: float, tags: dict[str, str]) -> None:
            sent.append((self.name, tags["replica"], value))

    calls = metrics.Metric("counter", "matrix_test_batched_total", "test", ("replica",), batched=True)
    load = metrics.Metric("gauge", "matrix_test_batched_load", "test", ("replica",), batched=True)
    try:
        calls._impl, load._impl = FakeRay("calls"), FakeRay("load")
        metrics.flush_batched()  # a publish period starts now
        for i in range(1, 1001):
            calls.inc(2, "a")
            load.set(i, "a")
        calls.inc(1, "b")
        assert sent == []  # kept in the process until the period ends
        metrics.flush_batched()
        assert sorted(sent) == [("calls", "a", 2000.0), ("calls", "b", 1.0), ("load", "a", 1000)]
        metrics.flush_batched()
        assert len(sent) == 3  # nothing new, nothing sent
    finally:
        metrics._ALL.remove(calls)
        metrics._ALL.remove(load)
