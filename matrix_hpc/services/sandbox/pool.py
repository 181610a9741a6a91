"""Leasing sandboxes to tasks: capacity, owners, expiry, reaping.

Three layers, each usable alone:

- :class:`SandboxHost` runs the sandboxes of one process (in-process, or
  inside a Ray host actor on a worker node);
- :class:`PoolCore` decides who gets which sandbox: at most ``size`` alive,
  at most ``max_per_node`` per node, waiters queue (bounded by
  ``lease_wait_s``), every lease has an owner (task id, attempt, process)
  and an expiry, and expired or orphaned leases are reaped;
- :class:`SandboxPoolClient` is what an agent holds (``ctx.sandboxes``): it
  leases, renews its leases in the background (heartbeat) and releases them
  whatever way the task's step ends.

Example::

    pool = make_sandbox_pool(SandboxConf(backend="bwrap"))
    async with pool.lease(task) as sb:          # task: TaskState or a task id
        r = await sb.exec("python3 -c 'print(6*7)'")
    await pool.close()

A lease for attempt N of a task releases that task's leases from earlier
attempts (a retried task never holds two sandboxes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from matrix_hpc.services.sandbox.base import (
    Command,
    Sandbox,
    SandboxConf,
    SandboxError,
    ServerProcess,
    create_sandbox,
    scratch_root_path,
    sweep_stale_dirs,
)
from matrix_hpc.services.sandbox.process import ExecResult

log = logging.getLogger(__name__)


class SandboxPoolExhausted(SandboxError):
    """No sandbox became free within ``lease_wait_s``."""


class LeaseLost(SandboxError):
    """The pool reaped this lease (expired, or its owner was judged dead)."""


@dataclass(frozen=True)
class LeaseOwner:
    task_id: str  # the task the sandbox serves
    attempt: int  # the task's attempt; a later attempt releases earlier ones
    process: str  # "pid<N>@<host>" of the leasing process
    actor_id: str | None = None  # Ray actor id of the leasing process, when it is an actor
    pid: int | None = None  # OS pid of the leasing process


@dataclass
class Lease:
    lease_id: str
    sandbox_id: str
    owner: LeaseOwner
    host_index: int  # which host runs the sandbox
    node_id: str  # node of that host
    granted_at: float  # time.time() when granted
    renewed_at: float  # last heartbeat
    expires_at: float  # reaped after this unless renewed (never beyond granted_at + max_lease_s)
    shared: bool = False  # the task's sandbox, shared by all its steps in any process (task_sandbox)


def this_process_owner(task_id: str, attempt: int) -> LeaseOwner:
    """Owner record for a lease taken by the calling process."""
    actor_id = None
    try:
        import ray

        if ray.is_initialized():
            actor_id = ray.get_runtime_context().get_actor_id()
    except ImportError:
        pass
    return LeaseOwner(task_id=task_id, attempt=attempt, process=f"pid{os.getpid()}@{socket.gethostname()}",
                      actor_id=actor_id, pid=os.getpid())


# --------------------------------------------------------------------------- host


class SandboxHost:
    """Runs the sandboxes of one process; every method names the sandbox by id."""

    def __init__(self, conf: SandboxConf) -> None:
        self.conf = conf
        self.sandboxes: dict[str, Sandbox] = {}
        root = scratch_root_path(conf)
        swept = sweep_stale_dirs(root)  # also checks that the root is private to us, before any sandbox starts
        if swept:
            log.warning("removed %d sandbox dirs left by a crashed pool under %s", swept, root)

    def node_id(self) -> str:
        try:
            import ray

            if ray.is_initialized():
                return str(ray.get_runtime_context().get_node_id())
        except ImportError:
            pass
        return socket.gethostname()

    async def start(self, sandbox_id: str) -> None:
        sandbox = create_sandbox(self.conf, sandbox_id)
        self.sandboxes[sandbox_id] = sandbox
        try:
            await sandbox.start()
        except BaseException:
            self.sandboxes.pop(sandbox_id, None)
            raise

    async def stop(self, sandbox_id: str) -> bool:
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return False
        await sandbox.stop()
        return True

    async def stop_all(self) -> int:
        ids = list(self.sandboxes)
        await asyncio.gather(*(self.stop(i) for i in ids), return_exceptions=True)
        return len(ids)

    def live(self) -> list[str]:
        return list(self.sandboxes)

    def _get(self, sandbox_id: str) -> Sandbox:
        try:
            return self.sandboxes[sandbox_id]
        except KeyError:
            raise LeaseLost(f"sandbox {sandbox_id} is not running on this host (released or reaped)") from None

    async def exec(self, sandbox_id: str, cmd: Command, **kwargs: Any) -> ExecResult:
        return await self._get(sandbox_id).exec(cmd, **kwargs)

    async def put_file(self, sandbox_id: str, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self._get(sandbox_id).put_file(path, data, mode)

    async def get_file(self, sandbox_id: str, path: str, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        return await self._get(sandbox_id).get_file(path, max_bytes)

    async def start_server(self, sandbox_id: str, argv: Sequence[str], name: str = "server") -> str:
        server = await self._get(sandbox_id).start_server(argv, name)
        return str(server.socket_path)

    async def server_request(self, sandbox_id: str, name: str, line: str, timeout_s: float = 30.0) -> str:
        return await self._server(sandbox_id, name).request(line, timeout_s)

    async def wait_server_socket(self, sandbox_id: str, name: str, timeout_s: float = 10.0) -> str:
        return str(await self._server(sandbox_id, name).wait_socket(timeout_s))

    def _server(self, sandbox_id: str, name: str) -> ServerProcess:
        servers = self._get(sandbox_id).servers
        if name not in servers:
            raise SandboxError(f"sandbox {sandbox_id} has no server named {name!r}; start_server first")
        return servers[name]


# --------------------------------------------------------------------------- core


class HostRef(Protocol):
    node_id: str

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


class LocalHostRef:
    """A :class:`SandboxHost` in this process."""

    def __init__(self, host: SandboxHost) -> None:
        self.host = host
        self.node_id = host.node_id()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.host, method)(*args, **kwargs)
        return await result if asyncio.iscoroutine(result) else result


@dataclass
class PoolStats:
    live: int = 0  # sandboxes alive (leased or starting)
    waiting: int = 0  # lease requests waiting for capacity
    granted: int = 0  # leases granted since start
    released: int = 0  # leases released by their owner
    reaped: int = 0  # leases reaped (expired, owner dead, superseded attempt)
    per_node: dict[str, int] = field(default_factory=dict)  # live sandboxes per node


class PoolCore:
    """Lease bookkeeping over a fixed set of hosts; all methods run on one event loop."""

    def __init__(self, conf: SandboxConf, hosts: list[HostRef]) -> None:
        if not hosts:
            raise ValueError("a sandbox pool needs at least one host")
        self.conf = conf
        self.pool = conf.pool
        self.hosts = hosts
        self.leases: dict[str, Lease] = {}
        self.live_per_host = [0] * len(hosts)  # includes sandboxes still starting
        self.stats = PoolStats()
        self._cond = asyncio.Condition()
        self._task_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # task id -> (lock, users)

    # -- capacity
    def _node_live(self, node_id: str) -> int:
        return sum(n for n, h in zip(self.live_per_host, self.hosts, strict=True) if h.node_id == node_id)

    def _pick_host(self) -> int | None:
        if sum(self.live_per_host) >= self.pool.size:
            return None
        eligible = [i for i, h in enumerate(self.hosts) if self._node_live(h.node_id) < self.pool.max_per_node]
        return min(eligible, key=lambda i: self.live_per_host[i]) if eligible else None

    async def _reserve(self, wait_s: float) -> int:
        deadline = time.monotonic() + wait_s
        async with self._cond:
            self.stats.waiting += 1
            try:
                while (index := self._pick_host()) is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._exhausted(wait_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), remaining)
            finally:
                self.stats.waiting -= 1
            self.live_per_host[index] += 1
            return index

    def _exhausted(self, wait_s: float) -> SandboxPoolExhausted:
        return SandboxPoolExhausted(
            f"no sandbox became free within {wait_s:.0f}s: pool '{self.pool.name}' has all "
            f"{sum(self.live_per_host)} of size={self.pool.size} (max_per_node={self.pool.max_per_node}) leased; "
            "raise sandbox.pool.size / sandbox.pool.max_per_node, lower run.max_concurrent_tasks, "
            "or raise sandbox.pool.lease_wait_s"
        )

    async def _free(self, index: int) -> None:
        async with self._cond:
            self.live_per_host[index] -= 1
            self._cond.notify()

    # -- leases
    async def acquire(self, owner: LeaseOwner, wait_s: float | None = None, shared: bool = False) -> Lease:
        """Start a sandbox for ``owner`` (waiting for capacity) and lease it.

        ``shared``: return the task's shared lease (same task id and attempt)
        when there is one, so that every step of a task uses one sandbox.
        """
        if not shared:
            return await self._acquire_new(owner, wait_s, shared=False)
        entry = self._task_locks.setdefault(owner.task_id, (asyncio.Lock(), [0]))
        lock, users = entry
        users[0] += 1
        try:
            async with lock:  # concurrent first uses of a task start one sandbox
                for lease in self.leases.values():
                    if lease.shared and lease.owner.task_id == owner.task_id and lease.owner.attempt == owner.attempt:
                        self._set_expiry(lease, time.time())
                        return lease
                return await self._acquire_new(owner, wait_s, shared=True)
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._task_locks.pop(owner.task_id, None)

    async def _acquire_new(self, owner: LeaseOwner, wait_s: float | None, shared: bool) -> Lease:
        for old in [lease for lease in self.leases.values() if lease.owner.task_id == owner.task_id
                    and lease.owner.attempt < owner.attempt]:
            await self._end(old, reaped=True)
        index = await self._reserve(self.pool.lease_wait_s if wait_s is None else wait_s)
        sandbox_id = f"{_safe(owner.task_id)[:40]}-{uuid.uuid4().hex[:10]}"
        try:
            await self.hosts[index].call("start", sandbox_id)
        except BaseException:
            await self._free(index)
            raise
        now = time.time()
        lease = Lease(lease_id=uuid.uuid4().hex, sandbox_id=sandbox_id, owner=owner, host_index=index,
                      node_id=self.hosts[index].node_id, granted_at=now, renewed_at=now, expires_at=now,
                      shared=shared)
        self._set_expiry(lease, now)
        self.leases[lease.lease_id] = lease
        self.stats.granted += 1
        return lease

    def _set_expiry(self, lease: Lease, now: float) -> None:
        lease.renewed_at = now
        lease.expires_at = min(now + self.pool.lease_ttl_s, lease.granted_at + self.pool.max_lease_s)

    def renew(self, lease_ids: Sequence[str]) -> list[str]:
        """Extend leases; returns the ids the pool no longer holds (lost)."""
        now, lost = time.time(), []
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is None:
                lost.append(lease_id)
            else:
                self._set_expiry(lease, now)
        return lost

    async def release(self, lease_id: str) -> bool:
        lease = self.leases.get(lease_id)
        if lease is None:
            return False
        await self._end(lease, reaped=False)
        return True

    async def release_task(self, task_id: str) -> int:
        """Release every lease held for ``task_id`` (the task ended or failed)."""
        mine = [lease for lease in self.leases.values() if lease.owner.task_id == task_id]
        for lease in mine:
            await self._end(lease, reaped=False)
        return len(mine)

    async def _end(self, lease: Lease, *, reaped: bool) -> None:
        if self.leases.pop(lease.lease_id, None) is None:
            return  # ended concurrently
        try:
            await self.hosts[lease.host_index].call("stop", lease.sandbox_id)
        except Exception as exc:  # a dead host took its sandboxes with it (die-with-parent)
            log.warning("stopping sandbox %s failed: %s", lease.sandbox_id, exc)
        finally:
            if reaped:
                self.stats.reaped += 1
            else:
                self.stats.released += 1
            await self._free(lease.host_index)

    async def reap(self, dead_owner: Callable[[list[LeaseOwner]], Awaitable[set[LeaseOwner]]] | None = None) -> int:
        """End expired leases and leases whose owner ``dead_owner`` reports dead."""
        now = time.time()
        doomed = [lease for lease in self.leases.values() if lease.expires_at <= now]
        if dead_owner is not None:
            owners = list({lease.owner for lease in self.leases.values() if lease.expires_at > now})
            dead = await dead_owner(owners) if owners else set()
            doomed += [lease for lease in self.leases.values() if lease.owner in dead and lease not in doomed]
        for lease in doomed:
            log.info("reaping sandbox %s of task %s (owner %s)", lease.sandbox_id, lease.owner.task_id,
                     lease.owner.process)
            await self._end(lease, reaped=True)
        return len(doomed)

    def snapshot(self) -> PoolStats:
        per_node: dict[str, int] = {}
        for n, h in zip(self.live_per_host, self.hosts, strict=True):
            per_node[h.node_id] = per_node.get(h.node_id, 0) + n
        return PoolStats(live=sum(self.live_per_host), waiting=self.stats.waiting, granted=self.stats.granted,
                         released=self.stats.released, reaped=self.stats.reaped, per_node=per_node)

    async def shutdown(self) -> None:
        for lease in list(self.leases.values()):
            await self._end(lease, reaped=False)
        for host in self.hosts:
            with contextlib.suppress(Exception):
                await host.call("stop_all")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "task"


async def run_reaper(core: PoolCore, dead_owner: Any = None) -> None:
    """Reap forever, every ``reap_interval_s``; cancel to stop."""
    while True:
        await asyncio.sleep(core.pool.reap_interval_s)
        try:
            await core.reap(dead_owner)
        except Exception:  # keep reaping whatever one round hit
            log.exception("sandbox reaper round failed")


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class LeaseGrant:
    """What a client gets back: enough to address the sandbox directly."""

    lease_id: str
    sandbox_id: str
    host: Any  # Any: a HostRef in-process, a Ray actor handle for the Ray pool
    node_id: str


class PoolBackend(Protocol):
    async def acquire(self, owner: LeaseOwner, wait_s: float | None, shared: bool = False) -> LeaseGrant: ...

    async def release(self, lease_id: str) -> bool: ...

    async def renew(self, lease_ids: list[str]) -> list[str]: ...

    async def release_task(self, task_id: str) -> int: ...

    async def stats(self) -> PoolStats: ...

    async def call_host(self, grant: LeaseGrant, method: str, *args: Any, **kwargs: Any) -> Any: ...

    async def close(self) -> None: ...


class LeasedSandbox:
    """A leased sandbox as seen by an agent; calls go straight to its host."""

    def __init__(self, backend: PoolBackend, grant: LeaseGrant, owner: LeaseOwner) -> None:
        self._backend = backend
        self.grant = grant
        self.owner = owner
        self.lost = False

    @property
    def id(self) -> str:
        return self.grant.sandbox_id

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.lost:
            raise LeaseLost(f"the lease on sandbox {self.id} of task {self.owner.task_id} was reaped "
                            f"(expired or owner judged dead); lease a new sandbox")
        return await self._backend.call_host(self.grant, method, self.id, *args, **kwargs)

    async def exec(self, cmd: Command, *, stdin: bytes | str | None = None, timeout_s: float | None = None,
                   max_output_bytes: int | None = None, env: dict[str, str] | None = None,
                   cwd: str = "/scratch") -> ExecResult:
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
        task_id, att = _task_key(task, attempt)
        owner = this_process_owner(task_id, att)
        grant = await self.backend.acquire(owner, wait_s)
        leased = LeasedSandbox(self.backend, grant, owner)
        self.held[grant.lease_id] = leased
        self._ensure_heartbeat()
        return leased

    async def task_sandbox(self, task: Any, *, attempt: int | None = None,
                           wait_s: float | None = None) -> LeasedSandbox:
        """The sandbox of ``task`` shared by all its steps, in any process (leased on first use).

        For environments that live as long as the task (a tool server per
        task). End it with ``release_task(task.id)`` in the task's last step;
        otherwise it goes when no process holding it renews it any more, or
        after ``max_lease_s``.
        """
        task_id, att = _task_key(task, attempt)
        owner = this_process_owner(task_id, att)
        grant = await self.backend.acquire(owner, wait_s, True)
        leased = LeasedSandbox(self.backend, grant, owner)
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
            self._heartbeat = asyncio.ensure_future(self._renew_forever())

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


class LocalPoolBackend:
    """The whole pool inside this process (no Ray): one host, one core, a reaper task."""

    def __init__(self, conf: SandboxConf) -> None:
        self.host = LocalHostRef(SandboxHost(conf))
        self.core = PoolCore(conf, [self.host])
        self._reaper: asyncio.Task[None] | None = None

    async def acquire(self, owner: LeaseOwner, wait_s: float | None, shared: bool = False) -> LeaseGrant:
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(run_reaper(self.core))
        lease = await self.core.acquire(owner, wait_s, shared)
        return LeaseGrant(lease.lease_id, lease.sandbox_id, self.host, lease.node_id)

    async def release(self, lease_id: str) -> bool:
        return await self.core.release(lease_id)

    async def renew(self, lease_ids: list[str]) -> list[str]:
        return self.core.renew(lease_ids)

    async def release_task(self, task_id: str) -> int:
        return await self.core.release_task(task_id)

    async def stats(self) -> PoolStats:
        return self.core.snapshot()

    async def call_host(self, grant: LeaseGrant, method: str, *args: Any, **kwargs: Any) -> Any:
        return await grant.host.call(method, *args, **kwargs)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await self.core.shutdown()


def make_sandbox_pool(conf: SandboxConf) -> SandboxPoolClient:
    """The per-process pool client (``ctx.sandboxes``) for ``conf.pool.mode``.

    ``local`` keeps every sandbox in this process; ``ray`` joins (or
    creates) the cluster-wide pool actor; ``auto`` picks ``ray`` when Ray is
    initialised. Picklable factories can simply call this in each worker.
    """
    mode = conf.pool.mode
    if mode == "auto":
        try:
            import ray

            mode = "ray" if ray.is_initialized() else "local"
        except ImportError:
            mode = "local"
    if mode == "local":
        return SandboxPoolClient(LocalPoolBackend(conf), conf)
    from matrix_hpc.services.sandbox.ray_pool import RayPoolBackend

    return SandboxPoolClient(RayPoolBackend(conf), conf)
