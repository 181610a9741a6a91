"""The cluster dir: what `cluster up` started, where the head is, and logs.

Layout (on a filesystem every node sees)::

    <dir>/jobs.json            jobs started by `up` (id, role, backend, log paths)
    <dir>/head.json            the Ray head's address and ports, written by the head job
    <dir>/ray_auth_token       Ray's token (0600; see auth.py), made by `up` or the head
    <dir>/nodes/<role>-<job>-<rank>.json   one per running Ray node (host, pids, tmp dir)
    <dir>/logs/<job>/          submitit's logs (<job>_<rank>_log.out/.err) and ray-<rank>.log
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matrix_hpc.cluster.auth import TOKEN_FILE, ensure_private_dir


@dataclass
class JobRecord:
    job_id: str  # Slurm job id ("123" or "123_0" in an array) or the local controller's pid
    role: str  # head | worker | driver
    backend: str  # local | slurm
    log_dir: str  # submitit folder of this job
    submitted_at: float = field(default_factory=time.time)  # unix time

    def stdout(self, rank: int = 0) -> Path:
        return Path(self.log_dir) / f"{self.job_id}_{rank}_log.out"

    def stderr(self, rank: int = 0) -> Path:
        return Path(self.log_dir) / f"{self.job_id}_{rank}_log.err"

    def ray_log(self, rank: int = 0) -> Path:
        return Path(self.log_dir) / f"ray-{rank}.log"

    def log_paths(self) -> list[Path]:
        return [self.stdout(), self.stderr(), self.ray_log()]


@dataclass
class HeadInfo:
    address: str  # ip:port of the GCS, what `ray start --address` and `ray.init` take
    node_ip: str  # the head node's IP
    gcs_port: int  # GCS port
    dashboard_port: int | None  # None when the dashboard is off
    hostname: str  # the head node's hostname
    job_id: str  # the head job (to check it still runs)
    pid: int  # the head job's python process
    started_at: float  # unix time


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename so a reader on another node never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ClusterState:
    """Reads and writes the cluster dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def head_file(self) -> Path:
        return self.root / "head.json"

    @property
    def token_file(self) -> Path:
        return self.root / TOKEN_FILE

    @property
    def jobs_file(self) -> Path:
        return self.root / "jobs.json"

    @property
    def nodes_dir(self) -> Path:
        return self.root / "nodes"

    def log_folder(self) -> Path:
        """submitit's folder pattern: one subdir per job id."""
        return self.root / "logs" / "%j"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise `up` / `down` on one cluster dir (created private, see auth.py)."""
        ensure_private_dir(self.root)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def jobs(self) -> list[JobRecord]:
        try:
            data = json.loads(self.jobs_file.read_text())
        except FileNotFoundError:
            return []
        return [JobRecord(**j) for j in data.get("jobs", [])]

    def save_jobs(self, jobs: list[JobRecord]) -> None:
        write_json_atomic(self.jobs_file, {"jobs": [asdict(j) for j in jobs]})

    def add_jobs(self, new: list[JobRecord]) -> None:
        self.save_jobs(self.jobs() + new)

    def head(self) -> HeadInfo | None:
        try:
            return HeadInfo(**json.loads(self.head_file.read_text()))
        except FileNotFoundError:
            return None

    def write_head(self, info: HeadInfo) -> None:
        write_json_atomic(self.head_file, asdict(info))

    def node_file(self, role: str, job_id: str, rank: int) -> Path:
        return self.nodes_dir / f"{role}-{job_id}-{rank}.json"

    def nodes(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.nodes_dir.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                out.append(json.loads(path.read_text()))
        return out

    def clear_runtime_files(self) -> None:
        """Forget the head, nodes and token (after `down`; the next `up` makes a new
        token); logs stay for post-mortems."""
        self.head_file.unlink(missing_ok=True)
        self.token_file.unlink(missing_ok=True)
        for path in self.nodes_dir.glob("*.json"):
            path.unlink(missing_ok=True)
