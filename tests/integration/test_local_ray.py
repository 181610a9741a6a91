"""The local Ray a run starts for itself (matrix_hpc/cluster/local_ray.py): with
nothing monitoring it, no dashboard head or autoscaler monitor runs and the
raylet's dashboard agent is the minimal one without modules, actors still run, and Ray's functions are restored after the
start; no idle worker process stays in Ray's pool and the log monitor lists its directory once a second; with monitoring on, Ray starts as it always does. Either way a 1 MB actor
argument travels in the call, not through the object store. Checked on the
processes themselves, in a fresh interpreter (a test process's Ray would hide it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.runs import REPO, kill_tree, start_cli, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray"), pytest.mark.timeout(300)]

#: Three 1 MB actor arguments, then the object store's line of ``memory_summary``: with
#: matrix_hpc's ``max_direct_call_object_size`` they travel in the calls (0 objects),
#: with Ray's default (100 KiB) each goes through the store (cluster/local_ray.py).
INLINE_PROBE = r"""
import ray
from ray._private.internal_api import memory_summary

@ray.remote(num_cpus=0)
class Sizer:
    def n(self, b):
        return len(b)

sizer = Sizer.remote()
assert sum(ray.get([sizer.n.remote(b"x" * 1_000_000) for _ in range(3)], timeout=60)) == 3_000_000
PLASMA = next(x for x in memory_summary(stats_only=True).splitlines() if x.startswith("Plasma memory usage"))
"""

PROBE = r"""
import json, os, sys, time
import psutil, ray
import ray._private.node as ray_node, ray._private.services as services, ray._private.utils as utils
from matrix_hpc.cluster.local_ray import start_local_ray

def replaced():
    return (services.start_api_server, utils.get_dashboard_dependency_error, ray_node.Node.start_monitor,
            services._build_python_executable_command_memory_profileable, services.get_node)

before = replaced()
out = {}
for case, interval in (("lean", None), ("monitored", 5.0)):
    start_local_ray(2, namespace="probe", log_to_driver=False, metrics_interval_s=interval)
    node = ray._private.worker.global_worker.node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    # the agent retitles itself (ray::DashboardAgent): its command is read where the raylet got it
    agents = [a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--dashboard_agent_command=")]
    titles = [p.name() for p in raylet.children(recursive=True)]

    @ray.remote
    class Echo:
        def pid(self):
            return os.getpid()

    exec(INLINE_PROBE)
    config = ray._private.state.state.get_system_config()
    log_monitor = psutil.Process(node.all_processes["log_monitor"][0].process.pid).environ()
    deadline = time.monotonic() + 20  # Ray's prestarted workers that no actor took: gone after ~1 s idle
    while time.monotonic() < deadline and any(p.name() == "ray::IDLE" for p in raylet.children()):
        time.sleep(0.2)
    idle = sum(p.name() == "ray::IDLE" for p in raylet.children())
    agent_log = open(os.path.join(node.get_logs_dir_path(), "dashboard_agent.log")).read()
    loaded = [int(x.split("Loaded ")[1].split()[0]) for x in agent_log.splitlines() if "Loaded " in x and " modules" in x]
    out[case] = {"modules_loaded": loaded, "processes": sorted(node.all_processes), "agents": agents, "plasma": PLASMA, "agent_running": any("DashboardAgent" in t for t in titles),
                 "actor_pid": ray.get(Echo.remote().pid.remote(), timeout=60),
                 "restored": replaced() == before, "idle_workers": idle,
                 "connect_ms": config.get("raylet_client_connect_timeout_milliseconds"),
                 "log_monitor_threshold": log_monitor.get("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD")}
    ray.shutdown()
print("PROBE " + json.dumps(out))
""".replace("exec(INLINE_PROBE)", INLINE_PROBE.replace("\n", "\n    "))


def test_local_ray_skips_the_dashboard_head_and_runs_the_minimal_agent_unless_monitored() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    out = json.loads(line[len("PROBE "):])
    lean, monitored = out["lean"], out["monitored"]
    assert "dashboard" not in lean["processes"], lean["processes"]
    assert "monitor" not in lean["processes"], lean["processes"]  # the autoscaler's: nothing to scale
    assert {"gcs_server", "raylet", "log_monitor"} <= set(lean["processes"]), lean["processes"]
    assert len(lean["agents"]) == 1 and "--minimal" in lean["agents"][0].split(), lean["agents"]
    assert "-m matrix_hpc.cluster.ray_agent " in lean["agents"][0], lean["agents"]  # Ray's agent, no modules
    assert lean["modules_loaded"] == [0], lean["modules_loaded"]
    assert lean["agent_running"] and lean["actor_pid"] > 0 and lean["restored"]
    assert lean["plasma"].startswith("Plasma memory usage 0 MiB, 0 objects"), lean["plasma"]  # 1 MB args inline
    # no idle pooled worker process left, 50 ms between socket connection tries, the log monitor's listing slowed
    assert lean["idle_workers"] == 0 and lean["connect_ms"] == 50 and lean["log_monitor_threshold"] == "0", lean
    # monitored: Ray as it starts by default (the full agent exports the metrics Prometheus scrapes)
    assert {"dashboard", "monitor"} <= set(monitored["processes"]), monitored["processes"]
    assert len(monitored["agents"]) == 1 and "--minimal" not in monitored["agents"][0].split(), monitored["agents"]
    assert "matrix_hpc.cluster.ray_agent" not in monitored["agents"][0], monitored["agents"]
    assert len(monitored["modules_loaded"]) == 1 and monitored["modules_loaded"][0] > 0, monitored["modules_loaded"]
    assert monitored["actor_pid"] > 0 and monitored["restored"]
    assert monitored["plasma"].startswith("Plasma memory usage 0 MiB, 0 objects"), monitored["plasma"]


def test_sigterm_while_the_local_ray_starts_leaves_no_ray_behind(tmp_path: Path) -> None:
    """SIGTERM to `matrix-hpc run` while its local Ray starts (before the driver's own
    handlers): the run exits and takes Ray's daemons with it."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "question": "?"} for i in range(50)])
    run = start_cli(f"dataset.path={data}", f"output.dir={tmp_path / 'out'}")
    daemons: list[psutil.Process] = []
    deadline = time.monotonic() + 60
    while not daemons and run.poll() is None and time.monotonic() < deadline:
        daemons = [p for p in psutil.Process(run.pid).children(recursive=True) if p.name() == "gcs_server"]
        time.sleep(0.02)
    assert daemons, "no Ray daemon seen while the run started"
    os.kill(run.pid, signal.SIGTERM)
    try:
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            kill_tree(run)
    assert run.returncode != 0
    _, alive = psutil.wait_procs(daemons, timeout=30)
    assert not alive, f"Ray's daemons outlived the run: {alive}"
