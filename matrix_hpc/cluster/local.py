"""Local backend: cluster jobs are processes on this machine, started by
submitit's local executor (the same callables and log layout as Slurm)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from matrix_hpc.procs import kill_tree


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

    @contextlib.contextmanager
    def submitting(self, log_path: Path) -> Iterator[None]:
        """Jobs submitted inside inherit ``log_path`` as stdout/stderr instead of
        ours: a long-lived local job holding our pipe would keep
        `matrix-hpc cluster up | tail` (or a captured subprocess) from ever ending."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            with open(log_path, "ab") as log:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                yield
        finally:
            for fd, copy in ((1, saved[0]), (2, saved[1])):
                os.dup2(copy, fd)
                os.close(copy)
