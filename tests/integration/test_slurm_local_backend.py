"""The cluster lifecycle with the local backend (no Slurm needed): the same
head/worker callables and cluster dir, processes on this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from matrix_hpc.cluster import LocalClusterConf, cluster_down, cluster_main, cluster_status
from matrix_hpc.cluster.auth import node_env
from matrix_hpc.cluster.state import ClusterState
from matrix_hpc.procs import find_by_marker
from tests.integration.runs import REPO
from tests.integration.test_local_ray import INLINE_PROBE

pytestmark = pytest.mark.integration


def test_local_cluster_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = LocalClusterConf(name="loc", dir=str(tmp_path / "c"), workers=1, head_wait_timeout_s=180,
                            worker_resources={"sandbox_host": 2.0})
    conf.worker.cpus_per_task = 1
    try:
        # `up` in a process whose output is captured: it must return while the cluster keeps running
        # (the local jobs must not hold the caller's pipes open).
        code = ("import sys; from matrix_hpc.cluster import LocalClusterConf, cluster_main; "
                f"c = LocalClusterConf(name='loc', dir={conf.dir!r}, workers=1, head_wait_timeout_s=180, "
                "worker_resources={'sandbox_host': 2.0}); c.worker.cpus_per_task = 1; "
                "sys.exit(cluster_main('up', c))")
        up = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        assert "head: " in up.stdout
        status = cluster_status(conf, ask_ray=False)
        assert status.head is not None and [j.state for j in status.jobs] == ["RUNNING", "RUNNING"]
        assert cluster_main("status", conf) == 0
        printed = capsys.readouterr().out
        assert "ray nodes: 2 alive" in printed and "'partition:local': 1.0" in printed
        assert "'sandbox_host': 2.0" in printed and status.head.address in printed
        markers = [n["tmp_dir"] for n in ClusterState(conf.cluster_dir).nodes()]
        assert len(markers) == 2 and all(find_by_marker(m) for m in markers)
        # the head's --system-config reaches a driver that joins: 1 MB actor arguments travel in the calls
        client = f"import ray; ray.init(address={status.head.address!r})\n{INLINE_PROBE}\nprint('PLASMA', PLASMA)"
        joined = subprocess.run([sys.executable, "-c", client], cwd=REPO, capture_output=True, text=True, timeout=180,
                                env=node_env(ClusterState(conf.cluster_dir).token_file))
        assert "PLASMA Plasma memory usage 0 MiB, 0 objects" in joined.stdout, (joined.stdout, joined.stderr[-2000:])
    finally:
        cluster_down(conf)
    assert not [p for m in markers for p in find_by_marker(m)], "Ray processes left after down"
    assert cluster_status(conf).jobs == [] and cluster_status(conf).head is None


def test_cluster_main_reports_bad_action_and_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cluster_main("restart", LocalClusterConf()) == 2
    assert "valid actions: up, status, down" in capsys.readouterr().err
    assert cluster_main("status", {"backend": "local", "wrokers": 2}) == 2
    assert "unknown cluster setting(s) ['wrokers']" in capsys.readouterr().err
