"""Errors of the cluster package: each names the job, its state, its logs
and what to do next."""

from __future__ import annotations

from pathlib import Path


class ClusterError(RuntimeError):
    """A cluster operation failed; the message says what to do."""


class JobFailedError(ClusterError):
    """A cluster job ended (or never started) when it should be running."""

    def __init__(self, what: str, job_id: str, state: str, log_paths: list[Path], stderr_tail: str,
                 hint: str = "") -> None:
        self.job_id, self.state, self.log_paths = job_id, state, log_paths
        logs = ", ".join(str(p) for p in log_paths) or "(no logs yet)"
        tail = stderr_tail.strip() or "(empty)"
        message = f"{what}: job {job_id} is {state}; logs: {logs}\n--- stderr tail ---\n{tail}"
        super().__init__(message + (f"\n{hint}" if hint else ""))

