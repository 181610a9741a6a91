"""Named LLM services that outlive runs (docs/serve.md), on a real local `cluster up` Ray:
two sim services deployed by `serve up` (a process that then exits), two coral runs with
teacher and student on different services, scaled and rolled while idle, checked, taken down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from matrix_hpc.cluster import LocalClusterConf, cluster_down, cluster_status, cluster_up
from tests.integration.runs import (
    REPO,
    assert_each_id_once,
    committed_rows,
    kill_tree,
    log_of,
    read_rows,
    run_cli,
    start_cli,
    wait_for_rows,
    write_jsonl,
)

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray"), pytest.mark.timeout(600)]

ROWS = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "options": [str(2 * i), str(2 * i + 1), "0"],
         "answer": "A"} for i in range(6)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalClusterConf]:
    """One local `cluster up` Ray for the module (the services outlive every command and run on it)."""
    conf = LocalClusterConf(name=f"serve{os.getpid()}", dir=str(tmp_path_factory.mktemp("serve") / "cluster"),
                            workers=0, head_wait_timeout_s=240)
    conf.head.cpus_per_task = 2
    # The cluster's own Prometheus (docs/monitoring.md), checked by the vLLM test below.
    conf.monitoring, conf.monitoring_scrape_interval_s = shutil.which("prometheus") is not None, 1.0
    try:
        cluster_up(conf)
        yield conf
    finally:
        cluster_down(conf)


def serve_cmd(conf: LocalClusterConf, *args: str) -> list[str]:
    return [sys.executable, "-m", "matrix_hpc.cli.main", "serve", *args, "cluster=local", f"cluster.dir={conf.dir}",
            f"cluster.name={conf.name}"]


def serve(conf: LocalClusterConf, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(serve_cmd(conf, *args), cwd=REPO, capture_output=True, text=True, timeout=240, env=env)


def serve_bg(conf: LocalClusterConf, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(serve_cmd(conf, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def status(conf: LocalClusterConf) -> dict[str, dict[str, Any]]:
    out = serve(conf, "status", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    return {s["name"]: s for s in json.loads(out.stdout) if s["kind"] == "llm_service"}


def requests(svc: dict[str, Any]) -> int:
    return sum(r["requests"] for r in svc["replica_list"])


def coral(conf: LocalClusterConf, out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    data = write_jsonl(out.parent / "in.jsonl", ROWS)
    return run_cli("workflow=coral", f"dataset.path={data}", "workflow.max_turns=2",
                   f"output.dir={out}", "cluster=local", f"cluster.dir={conf.dir}", f"cluster.name={conf.name}",
                   *more, timeout_s=300)


def test_deployed_services_outlive_runs_scale_roll_check_and_go_down(tmp_path: Path,
                                                                      cluster: LocalClusterConf) -> None:
    ups = {name: serve_bg(cluster, "up", "llm=sim", f"llm.name={name}", "llm.sim.num_replicas=1")
           for name in ("tea", "stu")}  # two at once: independent services
    for name, proc in ups.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0 and f"llm service '{name}' deployed" in stdout, (stdout + stderr)[-3000:]
    key = Path(cluster.dir) / "services" / "tea" / "api_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text()) >= 40

    # Two runs, teacher on one service, student (and extractor) on the other; the services stay up.
    counts: list[tuple[int, int]] = []
    first_replicas: dict[str, Any] = {}
    for i in range(2):
        out = tmp_path / f"out{i}"
        run = coral(cluster, out, "llm=deployed", "llm.name=stu", "workflow.teacher_llm.service=tea")
        assert run.returncode == 0, log_of(run)[-4000:]
        assert_each_id_once(out, [r["id"] for r in ROWS])
        now = status(cluster)
        counts.append((requests(now["tea"]), requests(now["stu"])))
        replicas = {r["id"]: (r["pid"], r["state"], r["restarts"]) for s in now.values() for r in s["replica_list"]}
        assert sorted(replicas) == ["stu-0", "tea-0"] and all(v[1:] == ("running", 0) for v in replicas.values())
        assert i == 0 or replicas == first_replicas, "a replica was replaced or restarted between runs"
        first_replicas = replicas
        assert key.read_text() not in log_of(run)
    assert 0 < counts[0][0] < counts[1][0] and 0 < counts[0][1] < counts[1][1], counts

    # A run naming a service that is not up fails at once, naming those that are, without a traceback.
    t0 = time.monotonic()
    missing = coral(cluster, tmp_path / "out-missing", "llm=deployed", "llm.name=stu",
                    "workflow.teacher_llm.service=teach")
    assert missing.returncode == 2 and time.monotonic() - t0 < 120
    assert "no LLM service named 'teach'" in missing.stderr and "deployed: stu, tea" in missing.stderr
    assert "Traceback" not in missing.stderr

    # More replicas while idle; a changed engine config replaces the one replica of tea (rolling).
    # (stu also gets an autoscaler, bounds 2-3: idle, it keeps 2; `serve down` must stop it too)
    scaled = serve(cluster, "up", "llm=sim", "llm.name=stu", "llm.sim.num_replicas=2", "llm.autoscale.min_replicas=2",
                   "llm.autoscale.max_replicas=3", "llm.autoscale.interval_s=0.5", "llm.autoscale.cooldown_s=0")
    assert scaled.returncode == 0 and "started stu-1; removed none" in scaled.stdout, log_of(scaled)[-3000:]
    rolled = serve(cluster, "up", "llm=sim", "llm.name=tea", "llm.sim.num_replicas=1", "llm.sim.ttft_s=0.01")
    assert rolled.returncode == 0 and "started tea-1; removed tea-0" in rolled.stdout, log_of(rolled)[-3000:]
    after = status(cluster)
    assert [r["id"] for r in after["stu"]["replica_list"]] == ["stu-0", "stu-1"]
    assert [r["id"] for r in after["tea"]["replica_list"]] == ["tea-1"]
    assert after["tea"]["engine"]["ttft_s"] == 0.01
    assert after["stu"]["autoscale"]["max_replicas"] == 3 and after["tea"]["autoscale"] is None
    assert all(r["state"] == "running" and r["registered"] for s in after.values() for r in s["replica_list"])
    assert _gone([first_replicas["tea-0"][0]]), "the replaced replica's process is still there"

    # llm=openai deploys a proxy entry: here to stu-0 itself, its key taken from the environment once.
    stu0 = next(r for r in after["stu"]["replica_list"] if r["id"] == "stu-0")
    stu_key = (Path(cluster.dir) / "services" / "stu" / "api_key").read_text()
    proxy = serve(cluster, "up", "llm=openai", "llm.name=proxy", f"llm.openai.base_url={stu0['url']}",
                  "llm.openai.api_key_env=STU_KEY", "llm.openai.model=sim", "llm.openai.dialect=vllm",
                  env={**os.environ, "STU_KEY": stu_key})
    assert proxy.returncode == 0 and "started proxy-0" in proxy.stdout, log_of(proxy)[-3000:]

    check = serve(cluster, "check")
    assert check.returncode == 0, log_of(check)[-3000:]
    lines = check.stdout.splitlines()
    assert sum(" ok " in line for line in lines) == 4 and any(line.startswith("proxy ") for line in lines), lines
    assert serve(cluster, "down", "llm.name=proxy").returncode == 0

    # Down: no replica process, no actor, no key left.
    actor_pids = [r["pid"] for s in after.values() for r in s["replica_list"]]
    assert len(actor_pids) == 3 and all(psutil.pid_exists(p) for p in actor_pids)
    for name in ("stu", "tea"):
        down = serve(cluster, "down", f"llm.name={name}")
        assert down.returncode == 0, log_of(down)[-3000:]
    assert not key.exists()
    assert _gone(actor_pids), "replica processes left after serve down"
    left = cluster_status(cluster)
    assert left.services is not None and not left.ray_error  # Ray answered: no registry, no replica actor left
    assert not [s for s in left.services if "llm-" in s], left.services  # registries, replicas, autoscaler


def test_any_openai_server_is_a_managed_replica_from_its_command(tmp_path: Path, cluster: LocalClusterConf) -> None:
    """The generic engine path (``llm.vllm.engine=command``): the sim server started from a command
    template, its key by the variable the template names; a run attaches by name; down leaves nothing."""
    command = '["{python}","-m","matrix_hpc.services.llm.sim_server","--host","{host}","--port","{port}"]'
    up = serve(cluster, "up", "llm=vllm", "llm.name=cmd", "llm.vllm.engine=command", f"llm.vllm.command={command}",
               "llm.vllm.api_key_env=MATRIX_SIM_API_KEY", "llm.vllm.num_replicas=1")
    assert up.returncode == 0 and "llm service 'cmd' deployed" in up.stdout, log_of(up)[-4000:]
    (replica,) = status(cluster)["cmd"]["replica_list"]
    assert replica["state"] == "running", replica
    log = Path(replica["log"]).read_text()
    assert "matrix_hpc.services.llm.sim_server --host" in log and "API key required" in log
    with pytest.raises(urllib.error.HTTPError) as refused:  # the key the replica was started with is required
        urllib.request.urlopen(urllib.request.Request(replica["url"] + "/models"), timeout=10)
    assert refused.value.code == 401
    out = tmp_path / "out"
    run = coral(cluster, out, "llm=deployed", "llm.name=cmd", "workflow.max_turns=1")
    assert run.returncode == 0, log_of(run)[-4000:]
    assert_each_id_once(out, [r["id"] for r in ROWS])
    pids = replica["server_pids"]
    assert pids and all(psutil.pid_exists(p) for p in pids)
    down = serve(cluster, "down", "llm.name=cmd")
    assert down.returncode == 0 and _gone(pids), log_of(down)[-3000:]


def test_scaling_and_a_killed_replica_during_a_run_lose_nothing(tmp_path: Path, cluster: LocalClusterConf) -> None:
    """`serve up` 1 -> 2 -> 1 replicas while a run uses the service, and one replica's process killed
    with SIGKILL: every id once, every row ok (in-flight requests of a removed replica are drained,
    those of the killed one retried on the other), the killed replica restarted."""
    up = serve(cluster, "up", "llm=sim", "llm.name=live", "llm.sim.num_replicas=1", "llm.sim.ttft_s=0.05")
    assert up.returncode == 0, log_of(up)[-3000:]
    # 400 rows: the run must outlast two `serve up`s and a kill (in a CI run of 2026-11-30, 120 rows
    # were all committed 10 s after the run started)
    rows = [{**ROWS[i % len(ROWS)], "id": f"r{i}"} for i in range(400)]
    data, out, log = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", tmp_path / "run.log"
    run = start_cli("workflow=coral", f"dataset.path={data}", f"output.dir={out}", "workflow.max_turns=2",
                    "run.max_concurrent_tasks=8", "llm=deployed", "llm.name=live", "cluster=local",
                    f"cluster.dir={cluster.dir}", f"cluster.name={cluster.name}", stderr=log)
    try:
        def committed() -> int:  # retried when the sink's compaction deletes a file while it is read
            return committed_rows(out) if out.exists() else 0

        def wait_rows(n: int) -> None:
            deadline = time.monotonic() + 120
            while committed() < n:
                assert run.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"fewer than {n} rows after 120 s"
                time.sleep(0.3)

        wait_rows(10)
        more = serve(cluster, "up", "llm=sim", "llm.name=live", "llm.sim.num_replicas=2", "llm.sim.ttft_s=0.05")
        assert more.returncode == 0 and "started live-1" in more.stdout, log_of(more)[-3000:]
        wait_rows(40)
        victim = next(r for r in status(cluster)["live"]["replica_list"] if r["id"] == "live-0")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_rows(70)
        fewer = serve(cluster, "up", "llm=sim", "llm.name=live", "llm.sim.num_replicas=1", "llm.sim.ttft_s=0.05")
        assert fewer.returncode == 0 and "removed live-1" in fewer.stdout, log_of(fewer)[-3000:]
        assert run.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if run.poll() is None:
            kill_tree(run)
    assert_every_row_once_and_ok(out, rows)
    (kept,) = status(cluster)["live"]["replica_list"]  # live-0, killed, is back in a new process
    assert kept["id"] == "live-0" and kept["state"] == "running" and kept["pid"] != victim["pid"], kept
    assert serve(cluster, "down", "llm.name=live").returncode == 0


def assert_every_row_once_and_ok(out: Path, rows: list[dict[str, Any]]) -> None:
    assert_each_id_once(out, [r["id"] for r in rows])
    statuses = Counter(r["status"] for r in read_rows(out))
    assert statuses == {"ok": len(rows)}, statuses


def test_a_killed_registry_comes_back_with_every_replica_and_the_service_keeps_working(
        tmp_path: Path, cluster: LocalClusterConf) -> None:
    """SIGKILL of the registry actor's process while a run routes through it: Ray restarts it and it
    rebuilds its table and record from its 0600 file; the run ends with every row ok, `status` lists
    the replica, `serve up` scales through the new registry (and the run's client routes to the
    added replica), `serve down` leaves no process and no file."""
    up = serve(cluster, "up", "llm=sim", "llm.name=phoenix", "llm.sim.num_replicas=1", "llm.sim.ttft_s=0.05")
    assert up.returncode == 0, log_of(up)[-3000:]
    state = Path(cluster.dir) / "services" / "phoenix" / "registry.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert (Path(cluster.dir) / "services" / "phoenix" / "api_key").read_text() not in state.read_text()
    before = status(cluster)["phoenix"]
    (replica0,) = before["replica_list"]
    rows = [{**ROWS[i % len(ROWS)], "id": f"k{i}"} for i in range(90)]
    data, out, log = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", tmp_path / "run.log"
    run = start_cli("workflow=coral", f"dataset.path={data}", f"output.dir={out}", "workflow.max_turns=2",
                    "run.max_concurrent_tasks=4", "llm=deployed", "llm.name=phoenix", "llm.client.refresh_interval_s=0.5",
                    "cluster=local", f"cluster.dir={cluster.dir}", f"cluster.name={cluster.name}", stderr=log)
    try:
        wait_for_rows(out, 10, while_running=run)
        os.kill(before["registry"]["pid"], signal.SIGKILL)
        assert _gone([before["registry"]["pid"]])
        back = status(cluster)  # restarted by Ray, not re-made by a `serve up`
        assert [(r["id"], r["registered"], r["state"]) for r in back["phoenix"]["replica_list"]] == \
            [("phoenix-0", True, "running")], back
        more = serve(cluster, "up", "llm=sim", "llm.name=phoenix", "llm.sim.num_replicas=2", "llm.sim.ttft_s=0.05")
        assert more.returncode == 0 and "started phoenix-1; removed none" in more.stdout, log_of(more)[-3000:]
        assert run.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if run.poll() is None:
            kill_tree(run)
    assert_every_row_once_and_ok(out, rows)
    after = status(cluster)["phoenix"]
    assert after["registry"]["pid"] != before["registry"]["pid"] and after["registry"]["restored"] >= 1
    by_id = {r["id"]: r for r in after["replica_list"]}
    assert sorted(by_id) == ["phoenix-0", "phoenix-1"], by_id
    assert all(r["state"] == "running" and r["registered"] for r in by_id.values()), by_id
    assert by_id["phoenix-0"]["pid"] == replica0["pid"] and by_id["phoenix-0"]["restarts"] == 0
    assert by_id["phoenix-1"]["requests"] > 0, "the run's client never routed to the replica added after the kill"
    pids = [after["registry"]["pid"], *(r["pid"] for r in by_id.values())]
    down = serve(cluster, "down", "llm.name=phoenix")
    assert down.returncode == 0 and "llm-replica-phoenix-0, llm-replica-phoenix-1" in down.stdout, log_of(down)
    assert _gone(pids), "registry or replica processes left after serve down"
    assert not state.exists()
    left = cluster_status(cluster).services
    assert left is not None and not [s for s in left if "phoenix" in s], left


@pytest.mark.needs("bwrap", "tau2_data")
def test_a_deployed_sandbox_pool_serves_runs_by_name_and_outlives_them(tmp_path: Path,
                                                                       cluster: LocalClusterConf) -> None:
    from matrix_hpc.workflows.tau2.rows import task_rows

    up = serve(cluster, "up", "sandbox=bwrap", "sandbox.pool.name=shared", "sandbox.pool.size=2",
               f"sandbox.scratch_root={tmp_path / 'sandboxes'}")
    assert up.returncode == 0 and "sandbox pool 'shared' deployed (bwrap, size 2)" in up.stdout, log_of(up)[-3000:]

    def granted() -> int:
        listing = serve(cluster, "status")
        line = next(ln for ln in listing.stdout.splitlines() if ln.strip().startswith("shared "))
        return int(line.split("granted=")[1].split(",")[0])

    tasks = [dict(t) for t in task_rows("retail")][:3]
    data = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    args = ["workflow=tau2", "workflow.domain=retail", "dataset=tau2_retail", f"dataset.path={data}",
            "workflow.max_steps=4", "llm=sim", "cluster=local", f"cluster.dir={cluster.dir}",
            f"cluster.name={cluster.name}"]
    missing = run_cli(*args, f"output.dir={tmp_path / 'missing'}", "sandbox=deployed", "sandbox.pool.name=nope")
    assert missing.returncode != 0 and "no sandbox pool named 'nope'" in missing.stderr, log_of(missing)[-3000:]
    assert "deployed: shared" in missing.stderr and "Traceback" not in missing.stderr
    run = run_cli(*args, f"output.dir={tmp_path / 'out'}", "sandbox=deployed", "sandbox.pool.name=shared")
    assert run.returncode == 0, log_of(run)[-4000:]
    assert_each_id_once(tmp_path / "out", [t["id"] for t in tasks])
    assert {r["status"] for r in read_rows(tmp_path / "out")} == {"ok"}
    listed = serve(cluster, "status", "--json")  # pools listed after the LLM services, by kind
    assert listed.returncode == 0, log_of(listed)[-3000:]
    (entry,) = [e for e in json.loads(listed.stdout) if e["kind"] == "sandbox_pool"]
    assert (entry["name"], entry["backend"], entry["size"]) == ("shared", "bwrap", 2), entry
    assert entry["stats"]["granted"] == granted() and entry["stats"]["live"] == 0, entry
    assert granted() >= len(tasks)  # the tasks' sandboxes came from the deployed pool, which is still up
    down = serve(cluster, "down", "sandbox.pool.name=shared")
    assert down.returncode == 0 and "stopped 1 pool actor(s)" in down.stdout, log_of(down)[-3000:]
    assert "sandbox pools: none" in serve(cluster, "status").stdout


def _gone(pids: list[int], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not any(psutil.pid_exists(p) for p in pids)


def prometheus_query(conf: LocalClusterConf, expr: str) -> list[dict[str, Any]]:
    return list(prometheus_get(conf, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"])


def prometheus_get(conf: LocalClusterConf, path: str) -> Any:
    """GET from the cluster's Prometheus (URL and password file from its server.json)."""
    from matrix_hpc.cluster.monitoring import PROMETHEUS_USER, basic_auth

    server = json.loads((Path(conf.dir) / "monitoring" / "server.json").read_text())
    auth = basic_auth(PROMETHEUS_USER, Path(server["password_file"]).read_text())
    request = urllib.request.Request(server["url"] + path, headers={"Authorization": auth})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def targets(conf: LocalClusterConf) -> list[dict[str, Any]]:
    return list(prometheus_get(conf, "/api/v1/targets")["data"]["activeTargets"])


def wait_for_series(conf: LocalClusterConf, expr: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while not (found := prometheus_query(conf, expr)):
        assert time.monotonic() < deadline, f"no series for {expr} after {timeout_s} s"
        time.sleep(1)
    return found


@pytest.mark.vllm
@pytest.mark.needs("prometheus")
def test_deployed_vllm_service_serves_a_run_and_goes_down(tmp_path: Path, cluster: LocalClusterConf) -> None:
    up = serve(cluster, "up", "llm=vllm", "llm.name=tiny", "llm.vllm.model=models/tiny-llama",
               "llm.vllm.num_replicas=1", "llm.vllm.max_model_len=512", "+llm.vllm.extra_engine_args.enforce-eager=true")
    assert up.returncode == 0 and "llm service 'tiny' deployed" in up.stdout, log_of(up)[-4000:]
    out = tmp_path / "out"
    run = coral(cluster, out, "llm=deployed", "llm.name=tiny", "workflow.speaker_max_tokens=8", "workflow.max_turns=1")
    assert run.returncode == 0, log_of(run)[-4000:]
    assert_each_id_once(out, [r["id"] for r in ROWS])
    (replica,) = status(cluster)["tiny"]["replica_list"]
    assert replica["state"] == "running" and replica["url"].endswith("/v1") and replica["node"]
    assert replica["outstanding"] == 0  # from the engine's own /metrics (running + waiting), idle now
    log = Path(replica["log"])
    assert log == Path(cluster.dir) / "services" / "tiny" / "logs" / "vllm-tiny-0.log"
    assert "vllm.entrypoints" in log.read_text()
    server_pids = replica["server_pids"]
    assert server_pids and all(psutil.pid_exists(p) for p in server_pids)
    check = serve(cluster, "check", "llm.name=tiny")
    assert check.returncode == 0 and " ok " in check.stdout, log_of(check)[-3000:]
    # The cluster's Prometheus found the service and scrapes the replica's own metrics with the
    # service's key (the replica refuses requests without it), and every Ray node of the cluster.
    prom = cluster_status(cluster, ask_ray=False).prometheus
    assert prom.startswith("http://127.0.0.1:"), prom
    with pytest.raises(urllib.error.HTTPError) as refused:  # other users of the node get nothing
        urllib.request.urlopen(prom + "/api/v1/targets", timeout=10)
    assert refused.value.code == 401
    replica_host = replica["url"].split("://", 1)[1].split("/", 1)[0]
    served = wait_for_series(cluster, 'sum by (instance) (vllm:request_success_total{job="vllm-tiny"})')
    assert [s["metric"]["instance"] for s in served] == [replica_host]
    assert float(served[0]["value"][1]) >= len(ROWS)  # the run's calls, counted by the engine itself
    ray_up = wait_for_series(cluster, 'up{job="ray"} == 1')
    assert len(ray_up) == 1  # the head (this cluster has no worker jobs)
    down = serve(cluster, "down", "llm.name=tiny")
    assert down.returncode == 0, log_of(down)[-3000:]
    assert _gone(server_pids), "vLLM server processes left after serve down"
    deadline = time.monotonic() + 60  # a service gone: its scrape job goes too (config reloaded)
    while any(t["labels"]["job"] == "vllm-tiny" for t in targets(cluster)):
        assert time.monotonic() < deadline, "the cluster's Prometheus still scrapes a service that is down"
        time.sleep(1)
