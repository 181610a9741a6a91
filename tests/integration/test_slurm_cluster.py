"""On a real Slurm (.ci/setup_slurm.sh): cluster up -> run -> down, a run
job preempted with USR1 that requeues and finishes, head errors.

Each test names its cluster uniquely and cancels what it started, also on failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from matrix_hpc.cluster import SlurmClusterConf, cluster_down, cluster_status, cluster_up, slurm_available
from matrix_hpc.cluster.errors import JobFailedError
from matrix_hpc.cluster.slurm_run import submit_run, wait_run
from matrix_hpc.cluster.state import ClusterState
from matrix_hpc.procs import find_by_marker
from tests.conftest import require_component
from tests.integration.runs import REPO, read_rows, wait_for_rows, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


@pytest.fixture(autouse=True)
def _slurm() -> None:
    require_component(slurm_available(), "Slurm", "run .ci/setup_slurm.sh as root")


def _rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"q{i:05d}", "question": f"Q{i}?"} for i in range(n)]


def small_conf(tmp_path: Path, tag: str) -> SlurmClusterConf:
    """Shapes that fit the 8-CPU test node several times over."""
    conf = SlurmClusterConf(name=f"{tag}{os.getpid()}", dir=str(tmp_path / "cluster"), head_wait_timeout_s=240)
    for shape, cpus in ((conf.head, 1), (conf.worker, 1), (conf.driver, 2)):
        shape.cpus_per_task, shape.mem_gb, shape.time_min = cpus, 2.0, 30
    conf.slurm.signal_delay_s = 60
    return conf


@pytest.fixture
def cleanup() -> Iterator[list[SlurmClusterConf]]:
    """Clusters registered here are taken down after the test, whatever happened."""
    confs: list[SlurmClusterConf] = []
    yield confs
    for conf in confs:
        cluster_down(conf)


def squeue_names() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def release_requeued(job_id: str, timeout_s: float = 180) -> None:
    """Slurm holds a requeued job back for a while (begin time in the
    future); let it start soon so the test does not wait minutes. Not at
    once: slurmd rejects a launch whose credential is from the same second
    as the requeue ("Job credential revoked") and the job ends FAILED."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if job_state(job_id) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], check=True)
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued within {timeout_s} s (state {job_state(job_id)!r})")


def assert_each_id_once(out: Path, n: int) -> list[dict]:
    rows = read_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicated ids"
    assert set(ids) == {r["id"] for r in _rows(n)}
    return rows


def test_cluster_up_run_on_it_then_down_leaves_nothing(tmp_path: Path, cleanup: list,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A token of the submitting shell must not leak into the cluster or the run:
    # every node and driver reads the cluster's own token file (docs/security.md).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    conf = small_conf(tmp_path, "ud")
    cleanup.append(conf)
    status = cluster_up(conf)
    assert status.head is not None
    assert [(j.role, j.state) for j in status.jobs] == [("head", "RUNNING"), ("worker", "RUNNING")]
    assert f"matrix-head-{conf.name}" in squeue_names() and f"matrix-worker-{conf.name}" in squeue_names()

    cluster_up(conf)  # again: adds a worker job to the same head
    status = cluster_status(conf)
    assert sum(n["alive"] for n in status.nodes) == 3, status
    assert status.total.get("partition:slurm") == 2.0  # each worker node carries its partition resource

    data = write_jsonl(tmp_path / "in.jsonl", _rows(150))
    out = tmp_path / "out"
    job = submit_run([f"dataset.path={data}", f"output.dir={out}", "cluster=slurm", f"cluster.dir={conf.dir}",
                      f"cluster.name={conf.name}", "run.progress_interval_s=0", "run.num_workers=3"],
                     conf, cwd=str(REPO))
    assert wait_run(job, conf) == 0
    assert_each_id_once(out, 150)
    driver_log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert status.head.address in driver_log  # the run joined this cluster's Ray, not a Ray of its own
    # run.spread_workers: the 3 workers go round robin over the cluster's 3 Ray
    # nodes, one each, not packed on one
    placed = re.search(r"placed 3 worker\(s\) on (\d) node\(s\)", driver_log)
    assert placed and int(placed.group(1)) == 3, driver_log[-3000:]

    markers = [n["tmp_dir"] for n in ClusterState(conf.cluster_dir).nodes()]
    assert len(markers) == 3
    cancelled = cluster_down(conf)
    assert len(cancelled) == 4  # head, two workers, the run
    assert not [n for n in squeue_names() if n.endswith(f"-{conf.name}")]
    assert not [p for m in [*markers, str(conf.cluster_dir)] for p in find_by_marker(m)], "stray processes"
    assert cluster_status(conf).head is None


def test_run_job_preempted_with_usr1_requeues_and_writes_each_id_once(tmp_path: Path, cleanup: list) -> None:
    conf = small_conf(tmp_path, "pre")
    cleanup.append(conf)
    n = 900
    data = write_jsonl(tmp_path / "in.jsonl", _rows(n))
    out = tmp_path / "out"
    job = submit_run([f"dataset.path={data}", f"output.dir={out}", "run.num_cpus=2", "run.max_concurrent_tasks=10",
                      "workflow.step_delay_ms=20", "output.flush_interval_s=0.2", "run.progress_interval_s=0"],
                     conf, cwd=str(REPO))
    wait_for_rows(out, 40, timeout_s=300, poll_s=0.5)
    subprocess.run(["scancel", "--signal=USR1", str(job.job_id)], check=True)  # what Slurm sends before the limit
    release_requeued(str(job.job_id))
    assert wait_run(job, conf) == 0
    rows = assert_each_id_once(out, n)
    assert len({r["run_id"] for r in rows}) == 2  # rows came from the first run and from the resumed one
    log = Path(job.paths.stderr).read_text()
    assert "Caught signal SIGUSR1" in log and "INTERRUPTED" in log and "DUE TO JOB REQUEUE" in log


def test_head_that_never_starts_ends_with_a_clear_error(tmp_path: Path, cleanup: list) -> None:
    conf = small_conf(tmp_path, "late")
    cleanup.append(conf)
    conf.head_wait_timeout_s = 8
    conf.slurm.additional_parameters = {"begin": "now+1hour"}  # stays PENDING
    t0 = time.time()
    with pytest.raises(JobFailedError) as e:
        cluster_up(conf)
    assert time.time() - t0 < 60
    text = str(e.value)
    assert "did not come up within cluster.head_wait_timeout_s=8" in text
    assert f"job {e.value.job_id} is PENDING" in text and "_log.err" in text and "squeue" in text


def test_failing_head_job_reports_state_logs_and_stderr(tmp_path: Path, cleanup: list) -> None:
    conf = small_conf(tmp_path, "bad")
    cleanup.append(conf)
    conf.slurm.setup = ["echo matrix-test-boom >&2", "exit 3"]
    with pytest.raises(JobFailedError) as e:
        cluster_up(conf)
    text = str(e.value)
    assert "ended before it came up" in text and "FAILED" in text and "matrix-test-boom" in text
    assert str(conf.cluster_dir / "logs") in text


def test_cli_run_with_cluster_slurm_submits_the_driver_and_waits(tmp_path: Path, cleanup: list) -> None:
    """`matrix-hpc run cluster=slurm ...` from outside an allocation goes through Slurm."""
    import sys

    conf = small_conf(tmp_path, "cli")
    cleanup.append(conf)
    data = write_jsonl(tmp_path / "in.jsonl", _rows(60))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "matrix_hpc.cli.main", "run", "cluster=slurm", f"cluster.dir={conf.dir}",
           f"cluster.name={conf.name}", "cluster.driver.cpus_per_task=2", "cluster.driver.mem_gb=2",
           f"dataset.path={data}", f"output.dir={out}", "run.num_cpus=2", "run.progress_interval_s=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted run as Slurm job" in proc.stderr
    drivers = [j for j in ClusterState(conf.cluster_dir).jobs() if j.role == "driver"]
    assert len(drivers) == 1 and drivers[0].stdout().exists()
    assert_each_id_once(out, 60)


def test_cli_cluster_status_and_down_on_a_cluster_that_is_not_up(tmp_path: Path) -> None:
    import sys

    base = [sys.executable, "-m", "matrix_hpc.cli.main", "cluster"]
    args = ["cluster=slurm", "cluster.name=idle", f"cluster.dir={tmp_path / 'c'}"]
    status = subprocess.run([*base, "status", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "head: not running" in status.stdout and "jobs: none" in status.stdout
    down = subprocess.run([*base, "down", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "cancelled" in down.stdout, down.stderr
