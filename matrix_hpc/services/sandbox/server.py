"""A long-lived process inside a sandbox, reached over stdio lines or a unix socket in its scratch dir."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from matrix_hpc.procs import kill_group
from matrix_hpc.services.sandbox.errors import SandboxError


class ServerProcess:
    """A long-lived process inside a sandbox.

    Line protocol over stdio via :meth:`request`, or a unix socket at
    ``socket_path`` (host side) that the process binds at
    ``$MATRIX_SANDBOX_SOCKET`` (inside). Pathname unix sockets cross the
    network namespace, so no host network port is ever opened.
    """

    def __init__(self, name: str, proc: asyncio.subprocess.Process, socket_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.socket_path = socket_path
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def request(self, line: str, timeout_s: float = 30.0) -> str:
        """Write one line to the server's stdin and return its next stdout line."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:  # one request at a time keeps replies matched to requests
            if not self.running:
                raise SandboxError(f"server {self.name!r} exited with code {self.proc.returncode}")
            self.proc.stdin.write(line.rstrip("\n").encode() + b"\n")
            await self.proc.stdin.drain()
            reply = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not reply:
            raise SandboxError(f"server {self.name!r} closed its stdout (exit code {self.proc.returncode})")
        return reply.decode("utf-8", errors="replace").rstrip("\n")

    async def wait_socket(self, timeout_s: float = 10.0) -> Path:
        """Wait until the server has created its unix socket (a socket itself, not a symlink to one).

        Code inside owns the scratch dir: a host process that connects to
        this path later follows whatever link it may plant meanwhile, so
        talk to untrusted servers with :meth:`request` (stdio) instead.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not _is_socket(self.socket_path):
            if not self.running or asyncio.get_running_loop().time() > deadline:
                raise SandboxError(f"server {self.name!r} did not create the socket {self.socket_path} "
                                   f"within {timeout_s}s")
            await asyncio.sleep(0.02)
        return self.socket_path

    async def stop(self) -> None:
        kill_group(self.proc.pid)
        await self.proc.wait()


async def spawn_server(argv: list[str], *, log_path: Path, env: dict[str, str], cwd: str | None = None,
                       pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
    """Start a server's host-side process in its own session: stdio piped, stderr appended to ``log_path``."""
    log = await asyncio.to_thread(open, log_path, "ab")  # handed to the child, closed here after the spawn
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, env=env, cwd=cwd,
            start_new_session=True, pass_fds=pass_fds,
        )
    finally:
        log.close()


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
