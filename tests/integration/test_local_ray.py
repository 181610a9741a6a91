"""The local Ray a run starts for itself (matrix_hpc/cluster/local_ray.py): with
nothing monitoring it, no dashboard head runs and the raylet's dashboard agent is
the minimal one, actors still run, and Ray's functions are restored after the
start; with monitoring on, Ray starts as it always does. Checked on the
processes themselves, in a fresh interpreter (a test process's Ray would hide it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.runs import REPO

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray"), pytest.mark.timeout(300)]

PROBE = r"""
import json, os, sys
import psutil, ray
import ray._private.services as services, ray._private.utils as utils
from matrix_hpc.cluster.local_ray import start_local_ray

before = (services.start_api_server, utils.get_dashboard_dependency_error)
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

    out[case] = {"processes": sorted(node.all_processes), "agents": agents, "agent_running": any("DashboardAgent" in t for t in titles),
                 "actor_pid": ray.get(Echo.remote().pid.remote(), timeout=60),
                 "restored": (services.start_api_server, utils.get_dashboard_dependency_error) == before}
    ray.shutdown()
print("PROBE " + json.dumps(out))
"""


def test_local_ray_skips_the_dashboard_head_and_runs_the_minimal_agent_unless_monitored() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    out = json.loads(line[len("PROBE "):])
    lean, monitored = out["lean"], out["monitored"]
    assert "dashboard" not in lean["processes"], lean["processes"]
    assert {"gcs_server", "raylet", "log_monitor"} <= set(lean["processes"]), lean["processes"]
    assert len(lean["agents"]) == 1 and "--minimal" in lean["agents"][0].split(), lean["agents"]
    assert lean["agent_running"] and lean["actor_pid"] > 0 and lean["restored"]
    # monitored: Ray as it starts by default (the full agent exports the metrics Prometheus scrapes)
    assert "dashboard" in monitored["processes"], monitored["processes"]
    assert len(monitored["agents"]) == 1 and "--minimal" not in monitored["agents"][0].split(), monitored["agents"]
    assert monitored["actor_pid"] > 0 and monitored["restored"]
