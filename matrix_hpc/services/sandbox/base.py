"""The sandbox contract: configuration, the ``Sandbox`` interface, errors.

A sandbox is an isolated environment with a private writable scratch dir
(``/scratch`` inside, a fresh host dir outside). Backends (siblings of this
module) decide how the isolation is made:

- ``bwrap``: bubblewrap, for machines without Apptainer (and CI);
- ``apptainer``: Apptainer instances, the cluster backend;
- ``trusted_subprocess``: an unsandboxed subprocess with the same limits and a
  minimal environment, for trusted code only (``sandbox=trusted_subprocess``;
  ``sandbox=disabled``, the default, means no sandbox service).

Every sandbox dir lives under a scratch root that only the pool's user can
change (see :mod:`safe_path`), and the host reaches files in it through
directory fds that never follow a symlink.

Example::

    conf = SandboxConf(backend="bwrap")
    sb = create_sandbox(conf, "demo")
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
import contextlib
import errno
import fcntl
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matrix_hpc.services.sandbox.cgroups import SandboxCgroup, cgroup_parents, remove_cgroup
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.services.sandbox.process import ExecResult
from matrix_hpc.services.sandbox.safe_path import (
    default_scratch_root,
    ensure_private_dir,
    make_private_subdir,
    open_dir,
    open_dir_at,
    open_lock_file,
    read_file_at,
    relative_parts,
    write_file_at,
)

BACKENDS = ("bwrap", "apptainer", "trusted_subprocess")
#: Old backend names and what they are called now; selecting one is an error that says so.
RENAMED_BACKENDS = {"none": "trusted_subprocess", "subprocess": "trusted_subprocess"}
SCRATCH_IN_SANDBOX = "/scratch"


class SandboxError(RuntimeError):
    """A sandbox could not be started, used or stopped (not a failed command)."""


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
        if self.backend in RENAMED_BACKENDS:
            raise ValueError(
                f"sandbox.backend={self.backend!r} (sandbox=none, sandbox=subprocess) was renamed: the unsandboxed "
                f"subprocess (no isolation, trusted code only) is now sandbox={RENAMED_BACKENDS[self.backend]}; "
                "for untrusted code choose "
                "sandbox=bwrap or sandbox=apptainer, and for no sandbox service sandbox=disabled"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"sandbox.backend={self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        if self.backend == "apptainer" and not self.image:
            raise ValueError("sandbox.backend=apptainer needs sandbox.image=<path to a .sif image or sandbox dir>")
        for spec in self.binds:
            parse_bind(spec)
        if self.gpus < 0:
            raise ValueError(f"sandbox.gpus must be >= 0, got {self.gpus}")


@dataclass(frozen=True)
class Bind:
    host: str  # absolute host path
    inside: str  # absolute path inside the sandbox
    writable: bool  # False = read-only


def parse_bind(spec: str) -> Bind:
    """Parse ``host[:inside[:ro|rw]]``; read-only unless ``rw`` is given."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise ValueError(f"bind {spec!r} is malformed; write host[:inside[:ro|rw]], e.g. /data:/data:ro")
    host = parts[0]
    inside = parts[1] if len(parts) > 1 and parts[1] else host
    mode = parts[2] if len(parts) == 3 else "ro"
    if mode not in ("ro", "rw"):
        raise ValueError(f"bind {spec!r}: mode must be 'ro' or 'rw', not {mode!r}")
    if not (host.startswith("/") and inside.startswith("/")):
        raise ValueError(f"bind {spec!r}: both paths must be absolute")
    return Bind(host=host, inside=inside, writable=mode == "rw")


def python_binds() -> list[Bind]:
    """Read-only binds that make this interpreter (and its venv) usable inside."""
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    return [Bind(p, p, False) for p in sorted(prefixes) if not p.startswith("/usr")]


def python_path_dirs() -> list[str]:
    """``PATH`` entries putting this interpreter first (venv before base)."""
    dirs = [os.path.join(sys.prefix, "bin"), os.path.join(os.path.realpath(sys.base_prefix), "bin")]
    return list(dict.fromkeys(dirs))


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
    """One isolated environment; all methods are coroutines."""

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

    uses_cgroup = True  # backends with their own resource control (apptainer) turn this off

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _stop(self) -> None: ...

    @abc.abstractmethod
    async def _exec(self, argv: list[str], stdin: bytes | None, timeout_s: float, max_output_bytes: int,
                    env: dict[str, str], cwd: str) -> ExecResult: ...

    @abc.abstractmethod
    async def _spawn_server(self, argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process: ...

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

    async def start_server(self, argv: Sequence[str], name: str = "server") -> ServerProcess:
        """Start a long-lived process inside; talk to it over stdio or ``/scratch/<name>.sock``."""
        self._require_started()
        if name in self.servers:
            raise SandboxError(f"sandbox {self.id} already runs a server named {name!r}")
        env = {"MATRIX_SANDBOX_SOCKET": f"{SCRATCH_IN_SANDBOX}/{name}.sock"}
        proc = await self._spawn_server(command_argv(argv), env)
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

    def _make_cgroup(self) -> SandboxCgroup | None:
        limits = self.conf.limits
        parents = cgroup_parents(limits.cgroup, limits.cgroup_parent) if self.uses_cgroup else None
        if parents is None:
            return None
        return SandboxCgroup(parents, self.id, limits.sandbox_mem_mb * 1024 * 1024, limits.max_procs)

    def cgroup_prefix(self) -> list[str]:
        """Prefix for every command of this sandbox: join its cgroup first (nothing without one)."""
        return self.cgroup.join_prefix() if self.cgroup is not None else []

    def _require_started(self) -> None:
        if not self.started:
            raise SandboxError(f"sandbox {self.id} is not running (stopped or never started); lease a new one")

    def scratch_owner(self) -> tuple[int, int] | None:
        """(uid, gid) that files written into scratch are given; None = keep ours.

        Hook for backends whose sandboxed code runs as another host uid.
        """
        return None


def _transfer_error(sandbox_id: str, verb: str, path: str, exc: OSError) -> SandboxError:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        why = "a symlink or a non-directory is on the path (links are never followed)"
    return SandboxError(f"sandbox {sandbox_id}: cannot {verb} /scratch/{path.removeprefix('/scratch/')}: {why}")


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
        from matrix_hpc.services.sandbox.process import kill_group

        kill_group(self.proc.pid)
        await self.proc.wait()


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def scratch_root_path(conf: SandboxConf) -> Path:
    """The configured scratch root, or this user's private default (not checked here)."""
    return Path(os.path.abspath(conf.scratch_root)) if conf.scratch_root else default_scratch_root()


def make_sandbox_dir(root: Path, sandbox_id: str) -> tuple[int, int]:
    """Create ``<root>/<id>/scratch`` (0700) under a checked private root; returns (lock fd, scratch fd).

    ``<root>/<id>/.lock`` (outside the scratch the sandbox sees) stays locked
    for the sandbox's life: the lock dies with the process, so a dir whose
    lock is free belongs to a crashed pool and :func:`sweep_stale_dirs` may
    delete it.
    """
    root_fd = open_dir(ensure_private_dir(root))
    try:
        shutil.rmtree(sandbox_id, dir_fd=root_fd, ignore_errors=True)  # a leftover of a reused id
        dir_fd = make_private_subdir(root_fd, sandbox_id)
    finally:
        os.close(root_fd)
    try:
        lock_fd = open_lock_file(dir_fd, ".lock")
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return lock_fd, make_private_subdir(dir_fd, "scratch")
    finally:
        os.close(dir_fd)


def remove_sandbox_dir(root: Path, sandbox_id: str) -> None:
    """Delete ``<root>/<id>``; rmtree with a dir fd never follows the links that code inside left."""
    with contextlib.suppress(OSError):
        root_fd = open_dir(root)
        try:
            shutil.rmtree(sandbox_id, dir_fd=root_fd, ignore_errors=True)
        finally:
            os.close(root_fd)


def sweep_stale_dirs(root: str | os.PathLike[str]) -> int:
    """Delete sandbox dirs left by crashed processes under ``root`` (a checked private dir); returns how many."""
    root_fd = open_dir(ensure_private_dir(root))
    try:
        stale = [name for name in os.listdir(root_fd) if not name.startswith(".") and _is_stale(root_fd, name)]
        for name in stale:
            shutil.rmtree(name, dir_fd=root_fd, ignore_errors=True)
    finally:
        os.close(root_fd)
    parents = cgroup_parents("auto", None) if stale else None
    for name in stale:
        if parents is not None:
            remove_cgroup(parents, name)
    return len(stale)


def _is_stale(root_fd: int, name: str) -> bool:
    """A sandbox dir whose ``.lock`` no live process holds."""
    try:
        dir_fd = open_dir_at(root_fd, name)
    except OSError:
        return False  # not a dir of ours (or gone): leave it alone
    try:
        lock_fd = os.open(".lock", os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # alive
    finally:
        os.close(lock_fd)


def create_sandbox(conf: SandboxConf, sandbox_id: str) -> Sandbox:
    """Build (not start) a sandbox of the configured backend."""
    if conf.backend == "bwrap":
        from matrix_hpc.services.sandbox.bwrap import BwrapSandbox

        return BwrapSandbox(conf, sandbox_id)
    if conf.backend == "apptainer":
        from matrix_hpc.services.sandbox.apptainer import ApptainerSandbox

        return ApptainerSandbox(conf, sandbox_id)
    from matrix_hpc.services.sandbox.trusted_subprocess import TrustedSubprocessSandbox

    return TrustedSubprocessSandbox(conf, sandbox_id)
