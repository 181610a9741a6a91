"""The sandboxes of one process (in-process, or inside a Ray host actor on a worker node), named by id."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any, Protocol

from matrix_hpc.services.sandbox.contract import Command, Sandbox, SandboxConf, SandboxError
from matrix_hpc.services.sandbox.lease import LeaseLost
from matrix_hpc.services.sandbox.process import ExecResult
from matrix_hpc.services.sandbox.registry import create_sandbox
from matrix_hpc.services.sandbox.scratch import scratch_root_path, sweep_stale_dirs
from matrix_hpc.services.sandbox.server import ServerProcess

log = logging.getLogger(__name__)


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


class HostRef(Protocol):
    """How the pool reaches a host: a method call by name, local or remote."""

    node_id: str

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...  # Any: the host method's own types


class LocalHostRef:
    """A :class:`SandboxHost` in this process."""

    def __init__(self, host: SandboxHost) -> None:
        self.host = host
        self.node_id = host.node_id()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.host, method)(*args, **kwargs)
        return await result if asyncio.iscoroutine(result) else result
