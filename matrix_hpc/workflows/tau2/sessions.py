"""Each task's tau2 environment, held by the process that runs the ``env`` role.

With a sandbox service, a task's environment is :mod:`server` inside a
sandbox leased for that task: the package's code and the domain's data files
are written into the sandbox's scratch dir (nothing of the host is writable
inside, no binds needed), and requests travel over the pool's stdio relay.
With ``workflow.sandbox_data_dir`` the data is read where the run's
``sandbox.binds`` mount it instead of being copied per task.
Without one (``sandbox=disabled``) it is an in-process environment.

:class:`EnvSessions` sits in ``ctx.services`` so the worker's ``on_task_end``
hook releases a task's sandbox whatever the task's fate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from matrix_hpc.workflows.tau2.db import data_dir
from matrix_hpc.workflows.tau2.environment import Tau2Environment
from matrix_hpc.workflows.tau2.tools import ToolOutput

log = logging.getLogger(__name__)

SERVICE_NAME = "tau2_envs"  # key in ctx.services
SERVER_NAME = "tau2env"  # the server's name inside the sandbox
_PACKAGE_DIR = Path(__file__).resolve().parent
_PACKAGE_IN_SCRATCH = "matrix_hpc/workflows/tau2"  # importable with cwd=/scratch (namespace parents)
_DATA_FILES = {"retail": ("db.json",), "airline": ("db.json",), "telecom": ("db.toml", "user_db.toml")}


class EnvServerError(RuntimeError):
    """The sandboxed environment could not be started or answered outside its protocol."""


class TaskEnv(Protocol):
    backend: str

    async def step(self, calls: Sequence[Mapping[str, Any]]) -> list[ToolOutput]: ...
    async def close(self) -> None: ...


class LocalEnv:
    """An in-process environment (no sandbox)."""

    backend = "local"

    def __init__(self, env: Tau2Environment) -> None:
        self.env = env

    async def step(self, calls: Sequence[Mapping[str, Any]]) -> list[ToolOutput]:
        return [self.env.step(c["name"], c.get("arguments") or {}, c.get("requestor", "assistant")) for c in calls]

    async def close(self) -> None:
        return None


class SandboxEnv:
    """The environment server in a leased sandbox, reached through the pool."""

    backend = "sandbox"

    def __init__(self, lease: Any, timeout_s: float) -> None:  # Any: the pool's LeasedSandbox
        self.lease = lease
        self.timeout_s = timeout_s
        self._next_id = 0

    async def request(self, payload: Mapping[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        self._next_id += 1
        line = json.dumps({**payload, "id": self._next_id})
        reply = await self.lease.server_request(line, name=SERVER_NAME, timeout_s=timeout_s or self.timeout_s)
        try:
            answer: dict[str, Any] = json.loads(reply)
        except json.JSONDecodeError:
            raise EnvServerError(f"tau2 env server in sandbox {self.lease.id} answered a non-JSON line: "
                                 f"{reply[:200]!r}") from None
        if "protocol_error" in answer:
            raise EnvServerError(f"tau2 env server in sandbox {self.lease.id}: {answer['protocol_error']}")
        if answer.get("id") != self._next_id:
            raise EnvServerError(f"tau2 env server in sandbox {self.lease.id} answered id {answer.get('id')}, "
                                 f"expected {self._next_id}")
        return answer

    async def step(self, calls: Sequence[Mapping[str, Any]]) -> list[ToolOutput]:
        answer = await self.request({"op": "step", "calls": list(calls)})
        return [ToolOutput(bool(o["ok"]), str(o["text"])) for o in answer["outputs"]]

    async def close(self) -> None:
        return None  # the sandbox's release stops the server


@dataclass
class _Held:
    env: TaskEnv
    lease: Any = None  # Any: LeasedSandbox, None in-process


class EnvSessions:
    """This process's task environments by task id."""

    def __init__(self, domain: str, sandboxes: Any, start_timeout_s: float, request_timeout_s: float,
                 data_dir_inside: str | None = None) -> None:
        self.domain = domain
        self.data_dir_inside = data_dir_inside  # the domain's data bound read-only here; None: copied per task
        self.sandboxes = sandboxes  # Any: SandboxPoolClient, or None to run in-process
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self.held: dict[str, _Held] = {}
        self._released: set[str] = set()
        self._files: dict[str, bytes] | None = None

    async def open(self, task_id: str, attempt: int, task: Mapping[str, Any]) -> TaskEnv:
        """A fresh environment for ``task`` (a retried open releases the old one first)."""
        await self.release(task_id)
        if self.sandboxes is None:
            from matrix_hpc.workflows.tau2.tasks import build_environment

            held = _Held(LocalEnv(build_environment(self.domain, task)))
        else:
            held = await self._open_sandbox(task_id, attempt, task)
        self.held[task_id] = held
        return held.env

    def get(self, task_id: str) -> TaskEnv:
        try:
            return self.held[task_id].env
        except KeyError:
            raise RuntimeError(f"task {task_id}: its tau2 environment is not in this process; the 'env' role "
                               "must stay where the task's environment was opened (it is routed by task id)") from None

    async def _open_sandbox(self, task_id: str, attempt: int, task: Mapping[str, Any]) -> _Held:
        lease = await self.sandboxes.acquire(task_id, attempt=attempt)
        try:
            for path, data in self.server_files().items():
                await lease.put_file(path, data)
            await lease.start_server(self.server_argv(), name=SERVER_NAME)
            env = SandboxEnv(lease, self.request_timeout_s)
            await env.request({"op": "open", "task": dict(task)}, timeout_s=self.start_timeout_s)
        except BaseException as e:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.sandboxes.release(lease))
            if isinstance(e, Exception):
                raise EnvServerError(f"task {task_id}: the tau2 {self.domain} environment did not start in "
                                     f"sandbox {lease.id}: {e}") from e
            raise
        return _Held(env, lease)

    def server_argv(self) -> list[str]:
        return [sys.executable, "-m", "matrix_hpc.workflows.tau2.server", "--domain", self.domain,
                "--data-dir", self.data_dir_inside or "/scratch/data"]

    def server_files(self) -> dict[str, bytes]:
        """The server's code and the domain's data, as scratch-relative paths (read once per process)."""
        if self._files is None:
            files = {f"{_PACKAGE_IN_SCRATCH}/{p.relative_to(_PACKAGE_DIR)}": p.read_bytes()
                     for p in sorted(_PACKAGE_DIR.rglob("*.py"))}
            if self.data_dir_inside is None:
                folder = data_dir(self.domain)
                files.update({f"data/{name}": (folder / name).read_bytes() for name in _DATA_FILES[self.domain]})
                files["data/tasks.json"] = b"[]"  # the task arrives with 'open'; the lookup wants the file
            self._files = files
        return self._files

    async def release(self, task_id: str) -> None:
        """Close the task's environment and give its sandbox back; never raises (the row must not be lost)."""
        held = self.held.pop(task_id, None)
        if held is None:
            return
        self._released.add(task_id)
        with contextlib.suppress(Exception):
            await held.env.close()
        if held.lease is not None and self.sandboxes is not None:
            try:
                await asyncio.shield(self.sandboxes.release(held.lease))
            except Exception as e:  # the pool's reaper ends it later
                log.warning("releasing sandbox %s of task %s failed: %s", held.lease.id, task_id, e)

    async def on_task_end(self, task_id: str) -> None:
        """The worker's hook: the task ended (any status)."""
        if task_id in self.held:
            await self.release(task_id)
        if task_id in self._released:
            self._released.discard(task_id)
        elif self.sandboxes is not None:
            await self.sandboxes.release_task(task_id)  # the task ended in another role's process

    async def close(self) -> None:
        for task_id in list(self.held):
            with contextlib.suppress(Exception):
                await self.release(task_id)


def transport_failed(error: Exception) -> bool:
    """Errors of the environment's transport, not of a tool: a retry could repeat a write."""
    return isinstance(error, (EnvServerError, OSError)) or type(error).__name__ in ("SandboxError", "LeaseLost")
