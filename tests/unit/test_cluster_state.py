"""The cluster dir: jobs.json, head.json, node files, error texts."""

from __future__ import annotations

import json
from pathlib import Path

from matrix_hpc.cluster.errors import JobFailedError
from matrix_hpc.cluster.state import ClusterState, HeadInfo, JobRecord
from matrix_hpc.procs import tail_text as tail


def _head(job_id: str = "7") -> HeadInfo:
    return HeadInfo(address="10.0.0.1:6379", node_ip="10.0.0.1", gcs_port=6379, dashboard_port=None,
                    hostname="n1", job_id=job_id, pid=1, started_at=0.0)


def test_jobs_and_head_round_trip(tmp_path: Path) -> None:
    state = ClusterState(tmp_path)
    assert state.jobs() == [] and state.head() is None
    state.add_jobs([JobRecord("7", "head", "slurm", str(tmp_path / "logs" / "7"))])
    state.add_jobs([JobRecord("8_0", "worker", "slurm", str(tmp_path / "logs" / "8_0"))])
    assert [(j.job_id, j.role) for j in state.jobs()] == [("7", "head"), ("8_0", "worker")]
    state.write_head(_head())
    assert state.head() == _head()
    assert not list(tmp_path.glob(".head.json.*"))  # the temporary file was renamed away


def test_log_paths_follow_submitit_layout(tmp_path: Path) -> None:
    job = JobRecord("8_0", "worker", "slurm", str(tmp_path / "logs" / "8_0"))
    assert job.stdout() == tmp_path / "logs" / "8_0" / "8_0_0_log.out"
    assert job.stderr() == tmp_path / "logs" / "8_0" / "8_0_0_log.err"
    assert job.ray_log() == tmp_path / "logs" / "8_0" / "ray-0.log"


def test_clear_runtime_files_keeps_logs(tmp_path: Path) -> None:
    state = ClusterState(tmp_path)
    state.write_head(_head())
    node = state.node_file("worker", "8", 0)
    node.parent.mkdir(parents=True)
    node.write_text(json.dumps({"role": "worker"}))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "x.log").write_text("keep")
    assert state.nodes() == [{"role": "worker"}]
    state.clear_runtime_files()
    assert state.head() is None and state.nodes() == []
    assert (tmp_path / "logs" / "x.log").exists()


def test_job_failed_error_names_id_state_logs_and_stderr(tmp_path: Path) -> None:
    err = tmp_path / "7_0_log.err"
    err.write_text("".join(f"line {i}\n" for i in range(100)) + "ray: bad thing happened\n")
    e = JobFailedError("the head failed", "7", "FAILED", [err], tail(err, max_lines=5), hint="do X")
    text = str(e)
    assert "job 7 is FAILED" in text and str(err) in text and "ray: bad thing happened" in text
    assert "line 10\n" not in text and text.endswith("do X")
    assert tail(tmp_path / "missing.err") == ""
