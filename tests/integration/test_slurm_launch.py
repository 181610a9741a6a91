"""On a real Slurm: the sbatch scripts in launch/ and a Hydra multirun sweep
through the submitit launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrix_hpc.cli.sweep_cmd import format_sweep, sweep_points
from matrix_hpc.cluster import slurm_available
from matrix_hpc.procs import find_by_marker
from tests.conftest import require_component
from tests.integration.runs import REPO, wait_for_rows, write_jsonl
from tests.integration.test_slurm_cluster import _rows, assert_each_id_once, job_state, release_requeued

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


@pytest.fixture(autouse=True)
def _slurm() -> None:
    require_component(slurm_available(), "Slurm", "run .ci/setup_slurm.sh as root")


def sbatch(script: str, log: Path, *args: str, wait: bool = False) -> subprocess.CompletedProcess[str]:
    """Submit a launch/ script sized for the test node (command-line flags beat its #SBATCH lines)."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--mem=4G", "--time=15", f"--output={log}",
           *(["--wait"] if wait else []), str(REPO / "launch" / script), *args]
    env = {**os.environ, "MATRIX_PYTHON": sys.executable, "MATRIX_WORKDIR": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_single_node_sbatch_drains_on_usr1_requeues_and_completes(tmp_path: Path) -> None:
    n = 900
    data = write_jsonl(tmp_path / "in.jsonl", _rows(n))
    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = sbatch("single_node.sbatch", log, f"dataset.path={data}", f"output.dir={out}", "run.num_cpus=2",
                  "run.max_concurrent_tasks=10", "workflow.step_delay_ms=20", "output.flush_interval_s=0.2",
                  "run.progress_interval_s=0")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    try:
        wait_for_rows(out, 40, timeout_s=300, poll_s=0.5)
        # --batch: only the batch shell gets it, as with the script's --signal=B:USR1@120
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        release_requeued(job_id)
        deadline = time.time() + 400
        while job_state(job_id) and time.time() < deadline:
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert "USR1: asking the driver to drain" in text and f"requeueing job {job_id}" in text, text[-3000:]
    assert sacct_state(job_id) == "COMPLETED", text[-3000:]
    rows = assert_each_id_once(out, n)
    assert len({r["run_id"] for r in rows}) == 2


@pytest.mark.slow  # 42 s; the multi-node sbatch path also runs in the head-death test below
def test_multi_node_sbatch_on_one_node_runs_the_driver_on_its_ray(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", _rows(120))
    out, log, cluster_dir = tmp_path / "out", tmp_path / "job.log", tmp_path / "cluster"
    os.environ["MATRIX_CLUSTER_DIR"] = str(cluster_dir)
    try:
        proc = sbatch("multi_node.sbatch", log, f"dataset.path={data}", f"output.dir={out}",
                      "run.progress_interval_s=0", wait=True)
    finally:
        del os.environ["MATRIX_CLUSTER_DIR"]
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Ray head at" in text and "driver exited with code 0" in text
    assert_each_id_once(out, 120)
    assert (cluster_dir / "logs").is_dir()
    assert not find_by_marker(str(cluster_dir)), "Ray processes outlived the job"


# slow: a 3-node sbatch job and a head kill (~70 s); CI runs it when its time budget holds
@pytest.mark.slow
def test_multi_node_sbatch_stops_its_driver_when_the_ray_head_dies(tmp_path: Path) -> None:
    """A head that dies (a port taken, a node lost) must end the job, not leave the driver
    retrying its Ray until the time limit."""
    import psutil

    data = write_jsonl(tmp_path / "in.jsonl", _rows(3000))
    out, log, cluster_dir = tmp_path / "out", tmp_path / "job.log", tmp_path / "cluster"
    os.environ["MATRIX_CLUSTER_DIR"] = str(cluster_dir)
    try:
        proc = sbatch("multi_node.sbatch", log, f"dataset.path={data}", f"output.dir={out}", "run.max_concurrent_tasks=4",
                      "workflow.step_delay_ms=50", "output.flush_interval_s=0.2", "run.progress_interval_s=0")
    finally:
        del os.environ["MATRIX_CLUSTER_DIR"]
    job_id = proc.stdout.strip()
    try:
        wait_for_rows(out, 10, timeout_s=300, poll_s=0.5)
        heads = [p for p in find_by_marker(str(cluster_dir)) if p.name() != "srun"
                 and "matrix_hpc.cluster.ray_node" in p.cmdline() and "head" in p.cmdline()]
        assert len(heads) == 1, [p.cmdline() for p in find_by_marker(str(cluster_dir))]
        heads[0].send_signal(15)  # the head node stops its Ray and exits, as after a failure
        deadline = time.time() + 240
        while job_state(job_id) and time.time() < deadline:
            time.sleep(2)
    finally:
        subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert "the Ray head stopped" in text and "driver exited with code" in text, text[-3000:]
    assert sacct_state(job_id) == "FAILED", text[-3000:]
    assert not [p for p in find_by_marker(str(cluster_dir)) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE], "processes outlived the job"


def test_hydra_multirun_sweep_on_slurm_gives_one_output_dir_per_point(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", _rows(80))
    cmd = [sys.executable, "-m", "matrix_hpc.cli.main", "run", "-m", "hydra/launcher=submitit_slurm",
           "run.max_concurrent_tasks=8,16", f"dataset.path={data}",
           f"output.dir={tmp_path}/out/mct_${{run.max_concurrent_tasks}}", f"hydra.sweep.dir={tmp_path}/sweep",
           "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4",
           "run.num_cpus=2", "run.progress_interval_s=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mct_16", "mct_8"]
    for point in ("mct_8", "mct_16"):
        assert_each_id_once(tmp_path / "out" / point, 80)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    table = format_sweep(sweep_points(tmp_path / "sweep"))
    assert [line.split()[:3] for line in table.splitlines()[1:]] == [
        ["0", "run.max_concurrent_tasks=8", "80"], ["1", "run.max_concurrent_tasks=16", "80"]]
