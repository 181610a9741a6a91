"""The sandbox contract: what a sandbox is configured with, what it can do, and what a backend implements.

A sandbox is an isolated environment with a private writable scratch dir
(``/scratch`` inside, a fresh host dir outside). Backends are sibling
modules found through :mod:`registry` by ``sandbox.backend`` (this module
imports none of them):

- ``bwrap``: bubblewrap, for machines without Apptainer (and CI);
- ``apptainer``: Apptainer instances, the cluster backend;
- ``trusted_subprocess``: an unsandboxed subprocess with the same limits and a
  minimal environment, for trusted code only (``sandbox=trusted_subprocess``;
  ``sandbox=disabled``, the default, means no sandbox service).

A backend subclasses :class:`Sandbox` and implements its four ``_`` hooks;
everything else (the scratch dir, file transfers, servers, the cgroup) is
done here, the same for all. Every sandbox dir lives under a scratch root
that only the pool's user can change (see :mod:`safe_path`), and the host
reaches files in it through directory fds that never follow a symlink.

Example::

    conf = SandboxConf(backend="bwrap")
    sb = create_sandbox(conf, "demo")          # matrix_hpc.services.sandbox.registry
    await sb.start()
    try:
        r = await sb.exec("echo hi; python3 -c 'print(1+1)'")
        assert r.exit_code == 0 and r.stdout == "hi\\n2\\n"
    finally:
        await sb.stop()
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from matrix_hpc.services.sandbox.binds import parse_bind
from matrix_hpc.services.sandbox.cgroups import SandboxCgroup, cgroup_parents
from matrix_hpc.services.sandbox.errors import SandboxError
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.services.sandbox.process import ExecResult
from matrix_hpc.services.sandbox.registry import backend_class
from matrix_hpc.services.sandbox.safe_path import read_file_at, relative_parts, write_file_at
from matrix_hpc.services.sandbox.scratch import make_sandbox_dir, remove_sandbox_dir, scratch_root_path
from matrix_hpc.services.sandbox.server import ServerProcess

__all__ = ["SCRATCH_IN_SANDBOX", "ApptainerConf", "Command", "Sandbox", "SandboxConf", "SandboxError",
           "command_argv"]

SCRATCH_IN_SANDBOX = "/scratch"


@dataclass
class ApptainerConf:
    """Apptainer-only settings."""

    binary: str = "apptainer"  # apptainer (or singularity) executable
    fakeroot: bool = False  # --fakeroot: root inside the container via user namespace
    writable_tmpfs: bool = False  # --writable-tmpfs: a throwaway writable overlay on the image
    cgroup_limits: bool = False  # also pass --memory/--pids-limit (needs cgroups delegated to the user)


@dataclass
class SandboxConf:
    """One sandbox environment (its limits) and the pool that leases them."""

    backend: str = "bwrap"  # bwrap | apptainer | trusted_subprocess (no isolation: trusted code only)
    image: str | None = None  # bwrap: a root dir mounted read-only at /; apptainer: .sif or dir; None = host /usr
    binds: list[str] = field(default_factory=list)  # extra "host[:inside[:ro|rw]]" mounts; read-only unless ":rw"
    # Environment variables inside the sandbox. Every value is treated as a secret: never put in a
    # command line, a log or a repr, and stored as *** in the run's config.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    bind_python: bool = True  # mount the host Python (and its venv) read-only so `python3` runs inside
    scratch_root: str | None = None  # host dir holding the scratch dirs; None = $TMPDIR/matrix_hpc-<uid>/sandboxes
    server_argv: list[str] = field(default_factory=list)  # optional long-lived process started with the sandbox
    gpus: int = 0  # GPUs visible inside (apptainer --nv); 0 = none
    limits: SandboxLimitsConf = field(default_factory=SandboxLimitsConf)  # memory / CPU / process / output limits
    apptainer: ApptainerConf = field(default_factory=ApptainerConf)  # apptainer-only settings
    pool: SandboxPoolConf = field(default_factory=SandboxPoolConf)  # leasing: size, waits, expiry

    def __post_init__(self) -> None:
        backend_class(self.backend).check_conf(self)  # an unknown or renamed name fails here, listing the valid ones
        for spec in self.binds:
            parse_bind(spec)
        if self.gpus < 0:
            raise ValueError(f"sandbox.gpus must be >= 0, got {self.gpus}")


Command = str | Sequence[str]


def command_argv(cmd: Command) -> list[str]:
    """A shell string runs under ``/bin/sh -c``; a sequence is an argv."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = list(cmd)
    if not argv:
        raise ValueError("exec needs a non-empty command")
    return argv


class Sandbox(abc.ABC):
    """One isolated environment; all methods are coroutines. Backends implement the ``_`` hooks."""

    uses_cgroup = True  # backends with their own resource control (apptainer) turn this off

    def __init__(self, conf: SandboxConf, sandbox_id: str) -> None:
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            raise ValueError(f"sandbox id {sandbox_id!r} must be one path component, not starting with '.'")
        self.conf = conf
        self.id = sandbox_id
        self.scratch_root = scratch_root_path(conf)  # private to this user; checked (and made) at start
        self.dir = self.scratch_root / sandbox_id  # host-side bookkeeping dir
        self.scratch = self.dir / "scratch"  # host path of /scratch inside
        self.servers: dict[str, ServerProcess] = {}
        self.started = False
        self._lock_fd = -1
        self._scratch_fd = -1  # every file transfer walks from this fd, never from a path
        self.cgroup: SandboxCgroup | None = None

    # -- what a backend implements

    @classmethod
    def check_conf(cls, conf: SandboxConf) -> None:
        """Refuse settings this backend cannot run with (at config time); most backends check nothing."""
        return None

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _stop(self) -> None: ...

    @abc.abstractmethod
    async def _exec(self, argv: list[str], stdin: bytes | None, timeout_s: float, max_output_bytes: int,
                    env: dict[str, str], cwd: str) -> ExecResult: ...

    @abc.abstractmethod
    async def _spawn_server(self, argv: list[str], env: dict[str, str],
                            pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process: ...

    def scratch_owner(self) -> tuple[int, int] | None:
        """(uid, gid) that files written into scratch are given; None = keep ours.

        Hook for backends whose sandboxed code runs as another host uid.
        """
        return None

    # -- what every sandbox does

    async def start(self) -> None:
        """Create the scratch dir and, if configured, the long-lived server."""
        if self.started:
            return
        self._lock_fd, self._scratch_fd = make_sandbox_dir(self.scratch_root, self.id)
        self.started = True
        try:
            self.cgroup = self._make_cgroup()
            await self._start()
            if self.conf.server_argv:
                await self.start_server(self.conf.server_argv)
        except BaseException:
            await self.stop()
            raise

    async def exec(
        self,
        cmd: Command,
        *,
        stdin: bytes | str | None = None,
        timeout_s: float | None = None,
        max_output_bytes: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str = SCRATCH_IN_SANDBOX,
    ) -> ExecResult:
        """Run ``cmd`` (shell string or argv) inside; everything it started is killed when it returns."""
        self._require_started()
        limits = self.conf.limits
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return await self._exec(
            command_argv(cmd), data, timeout_s or limits.exec_timeout_s,
            max_output_bytes or limits.max_output_bytes, dict(env or {}), cwd,
        )

    async def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` relative to scratch (``/scratch/<path>`` inside).

        Code inside may swap any dir on the path for a symlink at any moment:
        the path is walked from the scratch dir's fd, refusing every symlink.
        """
        self._require_started()
        payload = data.encode() if isinstance(data, str) else data
        try:
            parts = relative_parts(path, SCRATCH_IN_SANDBOX)
            write_file_at(self._scratch_fd, parts, payload, mode=mode, owner=self.scratch_owner())
        except OSError as exc:
            raise _transfer_error(self.id, "write", path, exc) from None

    async def get_file(self, path: str, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """Read ``path`` relative to scratch; refuses symlinks anywhere on the path."""
        self._require_started()
        try:
            data = read_file_at(self._scratch_fd, relative_parts(path, SCRATCH_IN_SANDBOX), max_bytes=max_bytes)
        except OSError as exc:
            raise _transfer_error(self.id, "read", path, exc) from None
        if len(data) > max_bytes:
            raise SandboxError(f"sandbox {self.id}: /scratch/{path} is larger than max_bytes={max_bytes}")
        return data

    async def start_server(self, argv: Sequence[str], name: str = "server",
                           pass_fds: tuple[int, ...] = ()) -> ServerProcess:
        """Start a long-lived process inside; talk to it over stdio or ``/scratch/<name>.sock``.

        ``pass_fds``: host fds the process inherits under the same numbers (e.g. one end of a
        ``socketpair``: a channel no other process can connect to, which can carry fds).
        """
        self._require_started()
        if name in self.servers:
            raise SandboxError(f"sandbox {self.id} already runs a server named {name!r}")
        env = {"MATRIX_SANDBOX_SOCKET": f"{SCRATCH_IN_SANDBOX}/{name}.sock"}
        proc = await self._spawn_server(command_argv(argv), env, tuple(pass_fds))
        server = ServerProcess(name, proc, self.scratch / f"{name}.sock")
        self.servers[name] = server
        return server

    async def stop(self) -> None:
        """Kill everything running inside and delete the scratch dir. Idempotent."""
        if not self.started:
            return
        self.started = False
        for server in list(self.servers.values()):
            await server.stop()
        self.servers.clear()
        try:
            await self._stop()
        finally:
            if self.cgroup is not None:
                await asyncio.to_thread(self.cgroup.remove)
                self.cgroup = None
            os.close(self._scratch_fd)
            self._scratch_fd = -1
            remove_sandbox_dir(self.scratch_root, self.id)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def cgroup_prefix(self) -> list[str]:
        """Prefix for every command of this sandbox: join its cgroup first (nothing without one)."""
        return self.cgroup.join_prefix() if self.cgroup is not None else []

    def _make_cgroup(self) -> SandboxCgroup | None:
        limits = self.conf.limits
        parents = cgroup_parents(limits.cgroup, limits.cgroup_parent) if self.uses_cgroup else None
        if parents is None:
            return None
        return SandboxCgroup(parents, self.id, limits.sandbox_mem_mb * 1024 * 1024, limits.max_procs)

    def _require_started(self) -> None:
        if not self.started:
            raise SandboxError(f"sandbox {self.id} is not running (stopped or never started); lease a new one")


def _transfer_error(sandbox_id: str, verb: str, path: str, exc: OSError) -> SandboxError:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        why = "a symlink or a non-directory is on the path (links are never followed)"
    return SandboxError(f"sandbox {sandbox_id}: cannot {verb} /scratch/{path.removeprefix('/scratch/')}: {why}")
