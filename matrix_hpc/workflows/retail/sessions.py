"""Each task's retail environment, held by the process that runs the ``env`` role.

With a sandbox service, a task's environment is a tool server inside a
sandbox leased for that task: the server's code and its own copy of
``db.json`` are written into the sandbox's scratch dir (no binds needed,
nothing of the host is writable inside), and requests travel over the
pool's stdio relay, which works wherever the sandbox runs. Without one it is
an in-process :class:`RetailEnv` on a shared copy-on-write snapshot.

:class:`EnvSessions` registers itself in ``ctx.services`` so the worker's
``on_task_end`` hook releases a task's sandbox whatever the task's fate
(ok, filtered, failed after retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrix_hpc.workflows.retail.client import LineToolClient, LocalToolClient, ToolClient, ToolServerError
from matrix_hpc.workflows.retail.db import RetailSnapshot, default_data_dir
from matrix_hpc.workflows.retail.env import RetailEnv, tool_schemas
from matrix_hpc.workflows.retail.reward import GoldHashCache, GoldState
from matrix_hpc.workflows.retail.tasks import RetailTask, load_policy

log = logging.getLogger(__name__)

SERVICE_NAME = "retail_envs"  # key in ctx.services
SERVER_NAME = "retail"  # the tool server's name inside the sandbox
_PACKAGE_DIR = Path(__file__).resolve().parent  # matrix_hpc/workflows/retail
_PACKAGE_IN_SCRATCH = "matrix_hpc/workflows/retail"  # importable with cwd=/scratch (namespace parents)


class SandboxSetupError(RuntimeError):
    """The task's sandbox or its tool server could not be started."""


@dataclass
class EnvSession:
    client: ToolClient  # where the task's tools run
    lease: Any = None  # Any: the pool's LeasedSandbox, None in-process
    backend: str = "local"  # 'sandbox' | 'local'


class EnvSessions:
    """Per-process environments by task id, plus what every task shares (policy, schemas, snapshot)."""

    def __init__(self, data_dir: str | None, sandboxes: Any, server_timeout_s: float,
                 request_timeout_s: float) -> None:  # Any: SandboxPoolClient or None
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.sandboxes = sandboxes
        self.server_timeout_s = server_timeout_s
        self.request_timeout_s = request_timeout_s
        self.sessions: dict[str, EnvSession] = {}
        self._released: set[str] = set()  # released here before their task ended (no pool call needed then)
        self.policy = load_policy(self.data_dir)
        self.tools = tool_schemas()
        self._snapshot: RetailSnapshot | None = None
        self._gold: GoldHashCache | None = None
        self._server_files: dict[str, bytes] | None = None

    # -- opening ---------------------------------------------------------
    async def open(self, task_id: str, attempt: int) -> EnvSession:
        """The task's environment, started fresh (a retried start releases the old one first)."""
        await self.release(task_id)
        session = await (self._open_sandbox(task_id, attempt) if self.sandboxes is not None else self._open_local())
        self.sessions[task_id] = session
        return session

    def get(self, task_id: str) -> EnvSession:
        try:
            return self.sessions[task_id]
        except KeyError:
            raise RuntimeError(
                f"task {task_id}: its retail environment is not in this process (pid-local state); "
                "keep the 'env' role in one place (it is routed by task id) and do not restart workers mid-task"
            ) from None

    async def _open_local(self) -> EnvSession:
        return EnvSession(LocalToolClient(RetailEnv(self.snapshot)))

    async def _open_sandbox(self, task_id: str, attempt: int) -> EnvSession:
        lease = await self.sandboxes.acquire(task_id, attempt=attempt)
        try:
            for path, data in self.server_files().items():
                await lease.put_file(path, data)
            await lease.start_server(self.server_argv(), name=SERVER_NAME)
            send = functools.partial(lease.server_request, name=SERVER_NAME, timeout_s=self.request_timeout_s)
            client = LineToolClient(send, where=f"sandbox {lease.id}")
            # the first answer also waits out the server's start (it reads stdin once ready)
            first = functools.partial(lease.server_request, name=SERVER_NAME, timeout_s=self.server_timeout_s)
            await LineToolClient(first, where=f"sandbox {lease.id}").ping()
        except BaseException as e:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.sandboxes.release(lease))
            if isinstance(e, Exception):
                raise SandboxSetupError(
                    f"task {task_id}: the retail tool server did not start in sandbox {lease.id}: {e}"
                ) from e
            raise
        return EnvSession(client, lease, "sandbox")

    def server_argv(self) -> list[str]:
        return [sys.executable, "-m", "matrix_hpc.workflows.retail.tool_server", "--db", "/scratch/db.json"]

    def server_files(self) -> dict[str, bytes]:
        """The server's code and DB, as scratch-relative paths (read once per process)."""
        if self._server_files is None:
            files = {f"{_PACKAGE_IN_SCRATCH}/{p.name}": p.read_bytes() for p in _PACKAGE_DIR.glob("*.py")}
            files["db.json"] = (self.data_dir / "db.json").read_bytes()
            self._server_files = files
        return self._server_files

    # -- shared state ----------------------------------------------------
    @property
    def snapshot(self) -> RetailSnapshot:
        if self._snapshot is None:
            self._snapshot = RetailSnapshot.from_file(self.data_dir / "db.json")
        return self._snapshot

    async def gold_state(self, task: RetailTask, session: EnvSession) -> GoldState:
        """In-process: cached per task id; sandboxed: replayed by the task's own server."""
        if session.lease is None:
            if self._gold is None:
                self._gold = GoldHashCache(self.snapshot)
            return self._gold.get(task)
        return await session.client.gold_state(task)

    # -- ending ----------------------------------------------------------
    async def release(self, task_id: str) -> None:
        """Close the task's environment and give its sandbox back; never raises (the row must not be lost)."""
        session = self.sessions.pop(task_id, None)
        if session is None:
            return
        self._released.add(task_id)
        with contextlib.suppress(Exception):
            await session.client.close()
        if session.lease is not None and self.sandboxes is not None:
            try:
                await asyncio.shield(self.sandboxes.release(session.lease))
            except Exception as e:  # the pool's reaper ends it later
                log.warning("releasing sandbox %s of task %s failed: %s", session.lease.id, task_id, e)

    async def on_task_end(self, task_id: str) -> None:
        """The worker's hook: the task ended (any status) in this process."""
        if task_id in self.sessions:
            await self.release(task_id)
        if task_id in self._released:
            self._released.discard(task_id)
        elif self.sandboxes is not None:
            # the task ended in another role's process: the pool releases by task id
            await self.sandboxes.release_task(task_id)

    async def close(self) -> None:
        for task_id in list(self.sessions):
            with contextlib.suppress(Exception):
                await self.release(task_id)


def tool_error_is_fatal(error: Exception) -> bool:
    """Errors of the environment's transport (not of a tool): retrying could repeat a write."""
    return isinstance(error, (ToolServerError, OSError)) or type(error).__name__ in ("SandboxError", "LeaseLost")
