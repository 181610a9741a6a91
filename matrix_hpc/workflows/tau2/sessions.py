"""Each task's tau2 environment, held by the process that runs the ``env`` role.

With a sandbox service, each task's environment is a process of its own,
started one of two ways (``workflow.env_server``):

- ``fork`` (``auto``'s choice unless the pool is deployed or placed by
  resources): this process starts one sandbox holding :mod:`forkserver`,
  which loads the domain once and forks a fresh process per task (about a
  millisecond, pages shared); the task's requests go straight to its process
  over a socketpair whose other end was handed over with ``SCM_RIGHTS``.
  Tasks of one worker share that sandbox's namespaces and limits, never each
  other's memory;
- ``per_task``: each task leases its own sandbox from the pool and starts
  :mod:`server` in it (its own namespaces; 0.3-0.4 s of CPU and 50-75 MB a task).

Either way the package's code and the domain's data files are written into
the sandbox's scratch dir (nothing of the host is writable inside, no binds
needed); with ``workflow.sandbox_data_dir`` the data is read where the
run's ``sandbox.binds`` mount it instead. Without a sandbox service
(``sandbox=disabled``) it is an in-process environment.

:class:`EnvSessions` sits in ``ctx.services`` so the worker's ``on_task_end``
hook releases a task's sandbox whatever the task's fate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import socket
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from matrix_hpc import metrics
from matrix_hpc.workflows.tau2.db import data_dir
from matrix_hpc.workflows.tau2.environment import Tau2Environment
from matrix_hpc.workflows.tau2.tools import ToolOutput

log = logging.getLogger(__name__)

SERVICE_NAME = "tau2_envs"  # key in ctx.services
SERVER_NAME = "tau2env"  # the server's name inside the sandbox
FORK_SERVER_NAME = "tau2fork"
SERVER_CPU_S = 86_400  # the warm server's CPU limit (forks cost it CPU; a later open starts another past it)
ENV_SERVERS = ("auto", "fork", "per_task")
_LINE_LIMIT = 64 * 1024 * 1024  # one reply line (a state dump of the largest DB fits)
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
        return checked_answer(reply, f"sandbox {self.lease.id}", self._next_id)

    async def step(self, calls: Sequence[Mapping[str, Any]]) -> list[ToolOutput]:
        answer = await self.request({"op": "step", "calls": list(calls)})
        return [ToolOutput(bool(o["ok"]), str(o["text"])) for o in answer["outputs"]]

    async def close(self) -> None:
        return None  # the sandbox's release stops the server


def checked_answer(reply: str | bytes, where: str, expected_id: int) -> dict[str, Any]:
    """One reply line of :mod:`server`, parsed and matched to its request."""
    try:
        answer: dict[str, Any] = json.loads(reply)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EnvServerError(f"tau2 env server in {where} answered a non-JSON line: {reply[:200]!r}") from None
    if not isinstance(answer, dict):
        raise EnvServerError(f"tau2 env server in {where} answered {type(answer).__name__}, not an object")
    if "protocol_error" in answer:
        raise EnvServerError(f"tau2 env server in {where}: {answer['protocol_error']}")
    if answer.get("id") != expected_id:
        raise EnvServerError(f"tau2 env server in {where} answered id {answer.get('id')}, expected {expected_id}")
    return answer


class ForkedEnv:
    """A task's own process, forked by this worker's warm server, reached over its socketpair."""

    backend = "fork"

    def __init__(self, warm: WarmServer, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout_s: float) -> None:
        self.warm = warm
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.timeout_s = timeout_s
        self._next_id = 0
        self._lock = asyncio.Lock()

    async def request(self, payload: Mapping[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return await self._request(payload, timeout_s)
        finally:
            metrics.SANDBOX_CALL_S.observe(time.perf_counter() - t0, self.warm.pool_label, "server_request")

    async def _request(self, payload: Mapping[str, Any], timeout_s: float | None) -> dict[str, Any]:
        async with self._lock:  # one request at a time keeps replies matched to requests
            self._next_id += 1
            self.writer.write(json.dumps({**payload, "id": self._next_id}).encode() + b"\n")
            try:
                await self.writer.drain()
                reply = await asyncio.wait_for(self.reader.readline(), timeout_s or self.timeout_s)
            except (TimeoutError, OSError, ValueError) as e:
                raise EnvServerError(f"tau2 env process {self.pid} in sandbox {self.warm.id}: "
                                     f"{type(e).__name__}: {e or 'no answer in time'}") from None
            if not reply:
                raise EnvServerError(f"tau2 env process {self.pid} in sandbox {self.warm.id} closed its socket")
            return checked_answer(reply, f"sandbox {self.warm.id} (process {self.pid})", self._next_id)

    async def step(self, calls: Sequence[Mapping[str, Any]]) -> list[ToolOutput]:
        answer = await self.request({"op": "step", "calls": list(calls)})
        return [ToolOutput(bool(o["ok"]), str(o["text"])) for o in answer["outputs"]]

    async def close(self) -> None:
        self.writer.close()  # the process exits at end of input; the kill covers one that does not
        await self.warm.kill(self.pid)


class WarmServer:
    """This process's sandbox running :mod:`forkserver`, and the control channel to it."""

    def __init__(self, conf: Any, argv: list[str], files: Mapping[str, bytes], start_timeout_s: float,
                 max_children: int, mem_mb: int) -> None:  # Any: SandboxConf (services layer, imported lazily)
        from matrix_hpc.services.sandbox.registry import create_sandbox

        # The server lives as long as the worker and pays for every fork: its own CPU limit is a day; each
        # task's process gets sandbox.limits.cpu_time_s back (--task-cpu-s).
        limits = dataclasses.replace(conf.limits, max_procs=conf.limits.max_procs + max_children,
                                     sandbox_mem_mb=max(conf.limits.sandbox_mem_mb, mem_mb),
                                     cpu_time_s=max(conf.limits.cpu_time_s, SERVER_CPU_S))
        self.conf = dataclasses.replace(conf, limits=limits, server_argv=[])
        argv = [*argv, "--task-cpu-s", str(conf.limits.cpu_time_s)]
        self.id = f"tau2fork-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pool_label = f"{conf.pool.name}:fork"  # the sandbox metrics' pool label of forked environments
        self.live = 0  # task processes forked and not yet released
        self.sandbox = create_sandbox(self.conf, self.id)
        self.argv = argv
        self.files = files
        self.start_timeout_s = start_timeout_s
        self.control: socket.socket | None = None
        self.broken = False
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._replies: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        server = self.sandbox.servers.get(FORK_SERVER_NAME)
        return not self.broken and self.control is not None and server is not None and server.running

    async def start(self) -> None:
        from matrix_hpc.services.sandbox.scratch import sweep_stale_dirs

        _raise_open_files_limit()
        # the pool's hosts sweep when they start; in fork mode none may start, so a crashed worker's dir goes here
        swept = await asyncio.to_thread(sweep_stale_dirs, self.sandbox.scratch_root)
        if swept:
            log.warning("removed %d sandbox dirs left by crashed processes under %s", swept, self.sandbox.scratch_root)
        await self.sandbox.start()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for path, data in self.files.items():
                await self.sandbox.put_file(path, data)
            await self.sandbox.start_server([*self.argv, "--control-fd", str(theirs.fileno())],
                                            name=FORK_SERVER_NAME, pass_fds=(theirs.fileno(),))
            theirs.close()
            ours.setblocking(False)
            self.control = ours
            await self._control({"op": "ping"}, timeout_s=self.start_timeout_s)
        except BaseException:
            ours.close()
            theirs.close()
            await self.stop()
            raise

    async def fork(self, timeout_s: float) -> ForkedEnv:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t0 = time.perf_counter()
        try:
            answer = await self._control({"op": "fork"}, fd=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            metrics.SANDBOX_CALL_S.observe(time.perf_counter() - t0, self.pool_label, "fork")
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=_LINE_LIMIT)
        self.live += 1
        metrics.SANDBOX_LEASES.inc(1, self.pool_label)
        metrics.SANDBOX_LEASED.set(self.live, self.pool_label)
        return ForkedEnv(self, int(answer["pid"]), reader, writer, timeout_s)

    async def kill(self, pid: int) -> None:
        self.live = max(0, self.live - 1)
        metrics.SANDBOX_LEASED.set(self.live, self.pool_label)
        if self.running:
            with contextlib.suppress(EnvServerError):
                await self._control({"op": "kill", "pid": pid})

    async def _control(self, payload: Mapping[str, Any], fd: int | None = None,
                       timeout_s: float = 60.0) -> dict[str, Any]:
        """One control exchange. Requests are pipelined: many forks wait on the channel at once and the
        server answers them back to back (one exchange at a time left each fork waiting for this process's
        busy event loop, about 22 forks/s with hundreds of dialogues running); replies are matched by id."""
        if self.control is None or self.broken:
            raise EnvServerError(f"the tau2 fork server in sandbox {self.id} is not running")
        self._next_id += 1
        rid = self._next_id
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = reply
        if self._replies is None:
            self._replies = asyncio.create_task(self._read_replies())
        packet = json.dumps({**payload, "id": rid}).encode()
        try:
            while True:  # SOCK_SEQPACKET: one packet per message; a small one waits briefly if at all
                try:
                    socket.send_fds(self.control, [packet], [fd] if fd is not None else [])
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            answer = await asyncio.wait_for(asyncio.shield(reply), timeout_s)
        except (TimeoutError, OSError) as e:
            self.broken = True  # a server that does not answer is replaced: the next open starts another
            raise EnvServerError(f"the tau2 fork server in sandbox {self.id} did not answer "
                                 f"{payload.get('op')!r}: {type(e).__name__}: {e} "
                                 f"(its log: {self.sandbox.dir / 'server.log'})") from None
        finally:
            self._pending.pop(rid, None)
        if "error" in answer:
            raise EnvServerError(f"the tau2 fork server in sandbox {self.id}: {answer['error']}")
        return answer

    async def _read_replies(self) -> None:
        loop = asyncio.get_running_loop()
        why = "exited"
        try:
            while self.control is not None:
                data = await loop.sock_recv(self.control, 65536)
                if not data:
                    break
                answer = json.loads(data)
                rid = answer.get("id") if isinstance(answer, dict) else None
                waiter = self._pending.get(rid) if isinstance(rid, int) else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
        except (OSError, ValueError) as e:
            why = f"broke its channel: {type(e).__name__}: {e}"
        self.broken = True
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(EnvServerError(f"the tau2 fork server in sandbox {self.id} {why} "
                                                    f"(its log: {self.sandbox.dir / 'server.log'})"))

    async def stop(self) -> None:
        """Close the control channel (the server kills its children and exits) and stop the sandbox."""
        self.broken = True
        if self._replies is not None:
            self._replies.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._replies
            self._replies = None
        if self.control is not None:
            self.control.close()
            self.control = None
        await self.sandbox.stop()


def _raise_open_files_limit() -> None:
    """Each forked task holds a socket in this process: allow as many as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


@dataclass
class _Held:
    env: TaskEnv
    lease: Any = None  # Any: LeasedSandbox, None in-process


class EnvSessions:
    """This process's task environments by task id."""

    def __init__(self, domain: str, sandboxes: Any, start_timeout_s: float, request_timeout_s: float,
                 data_dir_inside: str | None = None, env_server: str = "auto", max_children: int = 4096,
                 fork_mem_mb: int = 16384) -> None:
        if env_server not in ENV_SERVERS:
            raise ValueError(f"workflow.env_server={env_server!r}; choose one of {', '.join(ENV_SERVERS)}")
        self.domain = domain
        self.env_server = env_server
        self.max_children = max_children
        self.fork_mem_mb = fork_mem_mb
        self._warm: WarmServer | None = None
        self._warm_lock = asyncio.Lock()
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
        elif self.forks():
            held = await self._open_forked(task_id, task)
        else:
            held = await self._open_sandbox(task_id, attempt, task)
        self.held[task_id] = held
        return held.env

    def forks(self) -> bool:
        """Whether tasks' environments are forked by a warm server (see the module's doc)."""
        if self.sandboxes is None or self.env_server == "per_task":
            return False
        if self.env_server == "fork":
            return True
        pool = self.sandboxes.conf.pool  # auto: a deployed or resource-placed pool leases per task
        return not (pool.deployed or pool.host_resources)

    async def _warm_server(self) -> WarmServer:
        async with self._warm_lock:  # the first opens of a process wait for one start
            if self._warm is None or not self._warm.running:
                if self._warm is not None:
                    log.warning("the tau2 fork server in sandbox %s is gone; starting another", self._warm.id)
                    with contextlib.suppress(Exception):
                        await self._warm.stop()
                    self._warm = None
                argv = [sys.executable, "-m", "matrix_hpc.workflows.tau2.forkserver", *self.server_args()]
                warm = WarmServer(self.sandboxes.conf, argv, self.server_files(), self.start_timeout_s,
                                  self.max_children, self.fork_mem_mb)
                try:
                    await warm.start()
                except Exception as e:
                    raise EnvServerError(f"the tau2 {self.domain} fork server did not start in sandbox "
                                         f"{warm.id}: {e}") from e
                self._warm = warm
            return self._warm

    async def _open_forked(self, task_id: str, task: Mapping[str, Any]) -> _Held:
        warm = await self._warm_server()
        t0 = time.perf_counter()
        env = await warm.fork(self.request_timeout_s)
        try:
            await env.request({"op": "open", "task": dict(task)}, timeout_s=self.start_timeout_s)
            metrics.SANDBOX_START_S.observe(time.perf_counter() - t0, warm.pool_label)  # fork to environment ready
        except BaseException as e:
            with contextlib.suppress(Exception):
                await asyncio.shield(env.close())
            if isinstance(e, Exception):
                raise EnvServerError(f"task {task_id}: the tau2 {self.domain} environment did not open in "
                                     f"sandbox {warm.id}: {e}") from e
            raise
        return _Held(env)

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
        return [sys.executable, "-m", "matrix_hpc.workflows.tau2.server", *self.server_args()]

    def server_args(self) -> list[str]:
        """What the server and the fork server are told: the domain, and where its data is inside."""
        return ["--domain", self.domain,
                "--data-dir", self.data_dir_inside or "data"]  # relative: the server starts in scratch (every backend)

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
        elif self.sandboxes is not None and not self.forks():
            await self.sandboxes.release_task(task_id)  # the task ended in another role's process

    async def close(self) -> None:
        for task_id in list(self.held):
            with contextlib.suppress(Exception):
                await self.release(task_id)
        if self._warm is not None:
            with contextlib.suppress(Exception):
                await self._warm.stop()
            self._warm = None


def transport_failed(error: Exception) -> bool:
    """Errors of the environment's transport, not of a tool: a retry could repeat a write."""
    return isinstance(error, (EnvServerError, OSError)) or type(error).__name__ in ("SandboxError", "LeaseLost")
