"""One writer per output directory.

A run holds :class:`OutputLock` for its whole life. Two things make it:

- a POSIX record lock (``fcntl.lockf``) on ``_matrix/lock``. NFSv4 and Lustre
  honour it across nodes, and the kernel drops it when the holder dies, even
  by SIGKILL, so a crashed run never blocks the next one;
- a holder record ``_matrix/lock.json`` (host, pid, Slurm job id, run id,
  since, heartbeat), rewritten every ``heartbeat_s`` by a thread, so a refusal
  can name the holder and a lost node can be told from a live one.

The takeover rule. When a node is lost, the filesystem may keep its lock for
a long time (until the NFS lease or the Lustre eviction ends). Slurm requeues
such a job under the same ``SLURM_JOB_ID``. So: if the lock is held, and the
record names *our own* Slurm job id, and its heartbeat is older than
``stale_after_s`` (default 300 s, 30 missed heartbeats), the holder is our own
dead predecessor and we take over (logged) without the record lock. Any other
holder, or a fresh heartbeat, is refused with :class:`OutputLocked`.

    with OutputLock(Path("out/run1"), run_id):
        scan = scan_output(Path("out/run1"))
        ...
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from matrix_hpc.store.layout import META_DIR

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
HOLDER_FILE = "lock.json"

# POSIX locks belong to the process: a second lockf from this process would
# succeed, and closing any descriptor of the file would drop the lock. So the
# process remembers what it holds.
_held_here: dict[Path, str] = {}
_held_lock = threading.Lock()


class OutputLocked(RuntimeError):
    """Another live run writes this output directory."""


class OutputLock:
    """Exclusive right to write ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: Path, run_id: str, heartbeat_s: float = 10.0, stale_after_s: float = 300.0) -> None:
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._meta = self.out_dir / META_DIR
        self._fd: int | None = None
        self._since = 0.0
        self._taken_over = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost = threading.Event()  # set when another run took the output over (we were presumed dead)

    @property
    def holder_path(self) -> Path:
        return self._meta / HOLDER_FILE

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputLocked` naming the live holder."""
        self._meta.mkdir(parents=True, exist_ok=True)
        key = (self._meta / LOCK_FILE).resolve()
        with _held_lock:
            if key in _held_here:
                raise OutputLocked(f"{self.out_dir} is already locked by run {_held_here[key]} in this process "
                                   f"(pid {os.getpid()})")
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._try_lockf(fd):
                self._take_over_or_refuse(fd)
            self._fd = fd
            _held_here[key] = self.run_id
        self._since = time.time()
        self._write_record()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"output-lock {self.out_dir}", daemon=True)
        self._beat.start()

    @staticmethod
    def _try_lockf(fd: int) -> bool:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise

    def _take_over_or_refuse(self, fd: int) -> None:
        holder = read_holder(self.out_dir)
        age_s = time.time() - float(holder.get("heartbeat", 0) or 0)
        ours = os.environ.get("SLURM_JOB_ID")
        if ours and holder.get("slurm_job_id") == ours and age_s > self.stale_after_s:
            log.warning("taking over the lock of %s from %s: same Slurm job %s (a requeue), heartbeat %.0f s old "
                        "(> %.0f s); its node is presumed lost", self.out_dir, describe_holder(holder), ours,
                        age_s, self.stale_after_s)
            self._taken_over = True
            return
        os.close(fd)
        raise OutputLocked(
            f"{self.out_dir} is being written by {describe_holder(holder)} (heartbeat {age_s:.0f} s ago). "
            "Wait for that run to end, stop it, or use another output.dir. A holder killed on this cluster "
            "releases the lock by itself; a lost node's lock is taken over by its requeued Slurm job once the "
            f"heartbeat is {self.stale_after_s:.0f} s old.")

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "run_id": self.run_id, "since": self._since, "heartbeat": time.time(),
                "taken_over": self._taken_over}

    def _write_record(self) -> None:
        tmp = self._meta / f".{HOLDER_FILE}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(self._record()))
        os.replace(tmp, self.holder_path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_holder(self.out_dir)
            if holder and holder.get("run_id") != self.run_id:
                self.lost.set()  # never overwrite the new holder's record
                log.error("output lock of %s was taken over by %s (this run's heartbeat was presumed dead); "
                          "this run must stop writing", self.out_dir, describe_holder(holder))
                return
            try:
                self._write_record()
            except Exception:  # keep beating: a missed beat only ages the record
                log.exception("output lock of %s: heartbeat write failed; retrying in %.0f s", self.out_dir,
                              self.heartbeat_s)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if read_holder(self.out_dir).get("run_id") == self.run_id:
                self.holder_path.unlink(missing_ok=True)
        finally:
            with _held_lock:
                _held_here.pop((self._meta / LOCK_FILE).resolve(), None)
                os.close(self._fd)  # closing drops the POSIX lock
                self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def read_holder(out_dir: Path) -> dict[str, Any]:
    """The holder record ({} when absent or unreadable)."""
    try:
        return dict(json.loads((Path(out_dir) / META_DIR / HOLDER_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (no holder record yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0) or 0)))
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}{job}, since {since})"
