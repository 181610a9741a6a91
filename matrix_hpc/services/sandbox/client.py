"""What an agent holds (``ctx.sandboxes``): a pool client that leases, renews in the background and releases.

Example::

    pool = make_sandbox_pool(SandboxConf(backend="bwrap"))
    async with pool.lease(task) as sb:          # task: TaskState or a task id
        r = await sb.exec("python3 -c 'print(6*7)'")
    await pool.close()

Leases are released whatever way the task's step ends; the pool itself runs
where ``sandbox.pool.mode`` says (a :class:`PoolBackend` from the registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from matrix_hpc import metrics
from matrix_hpc.background import supervise
from matrix_hpc.services.sandbox.contract import SCRATCH_IN_SANDBOX, Command, SandboxConf
from matrix_hpc.services.sandbox.lease import LeaseGrant, LeaseLost, LeaseOwner, PoolStats, this_process_owner
from matrix_hpc.services.sandbox.process import ExecResult
from matrix_hpc.services.sandbox.registry import pool_backend_class

log = logging.getLogger(__name__)


class PoolBackend(Protocol):
    """Where the pool runs, as a client reaches it: in this process (``local``) or in a Ray actor (``ray``)."""

    def __init__(self, conf: SandboxConf) -> None: ...

    @classmethod
    def available(cls) -> bool:
        """Whether ``sandbox.pool.mode=auto`` may choose this backend here."""
        ...

    @classmethod
    def start_pool(cls, conf: SandboxConf) -> None:
        """Driver side, before any task: create the pool so that configuration errors surface early."""
        ...

    @classmethod
    def stop_pool(cls, conf: SandboxConf) -> None:
        """Driver side, at the end: stop every sandbox of the pool (idempotent)."""
        ...

    async def acquire(self, owner: LeaseOwner, wait_s: float | None, shared: bool = False) -> LeaseGrant: ...

    async def release(self, lease_id: str) -> bool: ...

    async def renew(self, lease_ids: list[str]) -> list[str]: ...

    async def release_task(self, task_id: str) -> int: ...

    async def stats(self) -> PoolStats: ...

    async def call_host(self, grant: LeaseGrant, method: str, *args: Any, **kwargs: Any) -> Any: ...

    async def close(self) -> None: ...


class LeasedSandbox:
    """A leased sandbox as seen by an agent; calls go straight to its host."""

    def __init__(self, backend: PoolBackend, grant: LeaseGrant, owner: LeaseOwner, pool_name: str = "") -> None:
        self._backend = backend
        self.grant = grant
        self.owner = owner
        self.lost = False
        self.pool_name = pool_name  # the metrics' pool label

    @property
    def id(self) -> str:
        return self.grant.sandbox_id

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.lost:
            raise LeaseLost(f"the lease on sandbox {self.id} of task {self.owner.task_id} was reaped "
                            f"(expired or owner judged dead); lease a new sandbox")
        t0 = time.perf_counter()
        try:
            return await self._backend.call_host(self.grant, method, self.id, *args, **kwargs)
        finally:
            metrics.SANDBOX_CALL_S.observe(time.perf_counter() - t0, self.pool_name, method)

    async def exec(self, cmd: Command, *, stdin: bytes | str | None = None, timeout_s: float | None = None,
                   max_output_bytes: int | None = None, env: dict[str, str] | None = None,
                   cwd: str = SCRATCH_IN_SANDBOX) -> ExecResult:
        """See :meth:`Sandbox.exec`."""
        result: ExecResult = await self._call("exec", cmd, stdin=stdin, timeout_s=timeout_s,
                                              max_output_bytes=max_output_bytes, env=env, cwd=cwd)
        return result

    async def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self._call("put_file", path, data, mode)

    async def get_file(self, path: str, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        data: bytes = await self._call("get_file", path, max_bytes)
        return data

    async def start_server(self, argv: Sequence[str], name: str = "server") -> str:
        """Start a long-lived process; returns its unix socket path on the sandbox's node."""
        path: str = await self._call("start_server", list(argv), name)
        return path

    async def server_request(self, line: str, name: str = "server", timeout_s: float = 30.0) -> str:
        reply: str = await self._call("server_request", name, line, timeout_s)
        return reply

    async def wait_server_socket(self, name: str = "server", timeout_s: float = 10.0) -> str:
        path: str = await self._call("wait_server_socket", name, timeout_s)
        return path


def _task_key(task: Any, attempt: int | None) -> tuple[str, int]:
    if isinstance(task, str):
        return task, attempt or 0
    return str(task.id), attempt if attempt is not None else int(getattr(task, "attempt", 0))


class SandboxPoolClient:
    """``ctx.sandboxes``: lease, use, release; renews its leases in the background."""

    def __init__(self, backend: PoolBackend, conf: SandboxConf) -> None:
        self.backend = backend
        self.conf = conf
        self.held: dict[str, LeasedSandbox] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    async def acquire(self, task: Any, *, attempt: int | None = None, wait_s: float | None = None) -> LeasedSandbox:
        """Lease a started sandbox for ``task`` (a TaskState or task id). Release it with :meth:`release`."""
        return await self._lease(task, attempt, wait_s, shared=False)

    async def task_sandbox(self, task: Any, *, attempt: int | None = None,
                           wait_s: float | None = None) -> LeasedSandbox:
        """The sandbox of ``task`` shared by all its steps, in any process (leased on first use).

        For environments that live as long as the task (a tool server per
        task). End it with ``release_task(task.id)`` in the task's last step;
        otherwise it goes when no process holding it renews it any more, or
        after ``max_lease_s``.
        """
        return await self._lease(task, attempt, wait_s, shared=True)

    async def _lease(self, task: Any, attempt: int | None, wait_s: float | None, shared: bool) -> LeasedSandbox:
        task_id, att = _task_key(task, attempt)
        owner = this_process_owner(task_id, att)
        grant = await self.backend.acquire(owner, wait_s, shared)
        leased = LeasedSandbox(self.backend, grant, owner, self.conf.pool.name)
        self.held[grant.lease_id] = leased
        self._ensure_heartbeat()
        return leased

    async def release(self, leased: LeasedSandbox) -> None:
        self.held.pop(leased.grant.lease_id, None)
        leased.lost = True  # no use after release
        await self.backend.release(leased.grant.lease_id)

    @contextlib.asynccontextmanager
    async def lease(self, task: Any, *, attempt: int | None = None,
                    wait_s: float | None = None) -> AsyncIterator[LeasedSandbox]:
        """``async with pool.lease(task) as sb:`` — released however the block ends."""
        leased = await self.acquire(task, attempt=attempt, wait_s=wait_s)
        try:
            yield leased
        finally:
            await asyncio.shield(self.release(leased))

    async def release_task(self, task_id: str) -> int:
        """Release everything leased for ``task_id`` by anyone (call when a task ends or fails)."""
        for lease_id, leased in list(self.held.items()):
            if leased.owner.task_id == task_id:
                self.held.pop(lease_id, None)
                leased.lost = True
        return await self.backend.release_task(task_id)

    async def stats(self) -> PoolStats:
        return await self.backend.stats()

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = supervise(self._renew_forever, "sandbox lease heartbeat")

    async def _renew_forever(self) -> None:
        interval = self.conf.pool.lease_ttl_s / 4
        while self.held:
            await asyncio.sleep(interval)
            try:
                lost = await self.backend.renew(list(self.held))
            except Exception as exc:  # the pool may be restarting; the next beat retries
                log.warning("renewing sandbox leases failed: %s", exc)
                continue
            for lease_id in lost:
                leased = self.held.pop(lease_id, None)
                if leased is not None:
                    leased.lost = True

    async def close(self) -> None:
        """Release what this client holds and stop its heartbeat."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for leased in list(self.held.values()):
            with contextlib.suppress(Exception):
                await self.release(leased)
        await self.backend.close()


def make_sandbox_pool(conf: SandboxConf) -> SandboxPoolClient:
    """The per-process pool client (``ctx.sandboxes``) for ``conf.pool.mode``.

    ``local`` keeps every sandbox in this process; ``ray`` joins (or
    creates) the cluster-wide pool actor; ``auto`` picks ``ray`` when Ray is
    initialised. Picklable factories can simply call this in each worker.
    """
    return SandboxPoolClient(pool_backend_class(conf.pool.mode)(conf), conf)
