"""Slurm backend: job states from squeue (live) and sacct (finished),
cancellation with scancel. Works without accounting too: a job that left
squeue and is unknown to sacct reads as FINISHED."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

#: Slurm states in which a job still holds (or waits for) resources.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def slurm_available() -> bool:
    """True if sbatch exists and the controller answers."""
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        return False
    try:
        return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmBackend:
    name = "slurm"

    def executor_cluster(self) -> str:
        return "slurm"

    def states(self, job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        out = _squeue_states(job_ids)
        missing = [j for j in job_ids if j not in out]
        if missing:
            out.update(_sacct_states(missing))
        return {j: out.get(j, "FINISHED") for j in job_ids}

    @contextlib.contextmanager
    def submitting(self, log_path: Path) -> Iterator[None]:
        """Nothing to detach: sbatch returns at once."""
        yield

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)


def _squeue_states(job_ids: list[str]) -> dict[str, str]:
    # Ask for every job of ours rather than -j: squeue -j fails outright when
    # one of the ids has already been purged.
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    wanted = set(job_ids)
    out = {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in wanted:
            out[job_id] = state
    return out


def _sacct_states(job_ids: list[str]) -> dict[str, str]:
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        out[job_id] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    return out
