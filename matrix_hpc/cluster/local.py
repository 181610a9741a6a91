"""Local backend: cluster jobs are processes on this machine, started by
submitit's local executor (the same callables and log layout as Slurm)."""

from __future__ import annotations

from pathlib import Path

from matrix_hpc.cluster.ray_node import kill_tree


class LocalBackend:
    name = "local"

    def executor_cluster(self) -> str:
        return "local"

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """RUNNING while the job's controller process lives, else FINISHED."""
        import psutil

        out = {}
        for job_id in job_ids:
            try:
                alive = psutil.Process(int(job_id)).status() != psutil.STATUS_ZOMBIE
            except (psutil.NoSuchProcess, ValueError):
                alive = False
            out[job_id] = "RUNNING" if alive else "FINISHED"
        return out

    def cancel(self, job_ids: list[str]) -> None:
        # submitit's local controller only forwards SIGTERM, and the job's
        # python ignores it: stop the whole process tree instead.
        for job_id in job_ids:
            kill_tree(int(job_id), grace_s=10.0)

    def result_file(self, log_dir: Path, job_id: str) -> Path:
        return log_dir / f"{job_id}_0_result.pkl"
