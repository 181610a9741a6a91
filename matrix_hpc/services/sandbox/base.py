"""The sandbox contract: configuration, the ``Sandbox`` interface, errors.

A sandbox is an isolated environment with a private writable scratch dir
(``/scratch`` inside, a fresh host dir outside). Backends (siblings of this
module) decide how the isolation is made:

- ``bwrap``: bubblewrap, for machines without Apptainer (and CI);
- ``apptainer``: Apptainer instances, the cluster backend;
- ``subprocess``: a plain subprocess with the same limits, for trusted code
  only (``sandbox=none`` or ``sandbox=subprocess`` in the CLI; ``sandbox=disabled``, the default, means no sandbox service).

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
import fcntl
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matrix_hpc.services.sandbox.cgroups import SandboxCgroup, cgroup_parents, remove_cgroup
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf
from matrix_hpc.services.sandbox.process import ExecResult

BACKENDS = ("bwrap", "apptainer", "subprocess")
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

    backend: str = "bwrap"  # bwrap | apptainer | subprocess (subprocess = trusted code only: no isolation)
    image: str | None = None  # bwrap: a root dir mounted read-only at /; apptainer: .sif or dir; None = host /usr
    binds: list[str] = field(default_factory=list)  # extra "host[:inside[:ro|rw]]" mounts; read-only unless ":rw"
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables inside the sandbox
    bind_python: bool = True  # mount the host Python (and its venv) read-only so `python3` runs inside
    scratch_root: str = "/tmp/matrix_hpc_sandboxes"  # host dir holding every sandbox's scratch dir
    server_argv: list[str] = field(default_factory=list)  # optional long-lived process started with the sandbox
    gpus: int = 0  # GPUs visible inside (apptainer --nv); 0 = none
    limits: SandboxLimitsConf = field(default_factory=SandboxLimitsConf)  # memory / CPU / process / output limits
    apptainer: ApptainerConf = field(default_factory=ApptainerConf)  # apptainer-only settings
    pool: SandboxPoolConf = field(default_factory=SandboxPoolConf)  # leasing: size, waits, expiry

    def __post_init__(self) -> None:
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
        self.conf = conf
        self.id = sandbox_id
        self.dir = Path(conf.scratch_root) / sandbox_id  # host-side bookkeeping dir
        self.scratch = self.dir / "scratch"  # host path of /scratch inside
        self.servers: dict[str, ServerProcess] = {}
        self.started = False
        self._lock_fd = -1
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
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        self._lock_fd = hold_dir_lock(self.dir)
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
        """Write ``data`` to ``path`` relative to scratch (``/scratch/<path>`` inside)."""
        self._require_started()
        target = self._scratch_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        self._chown_scratch_file(target)

    async def get_file(self, path: str, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """Read ``path`` relative to scratch; refuses symlinks leading out of it."""
        self._require_started()
        target = self._scratch_path(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise SandboxError(f"sandbox {self.id}: cannot read /scratch/{path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)
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
            shutil.rmtree(self.dir, ignore_errors=True)
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

    def _scratch_path(self, path: str) -> Path:
        rel = path[len(SCRATCH_IN_SANDBOX) + 1:] if path.startswith(SCRATCH_IN_SANDBOX + "/") else path
        target = (self.scratch / rel).resolve()
        root = self.scratch.resolve()
        if target != root and root not in target.parents:
            raise SandboxError(f"sandbox {self.id}: path {path!r} leaves the scratch dir; use a relative path inside it")
        return target

    def _chown_scratch_file(self, target: Path) -> None:
        """Hook: backends running as another uid make written files theirs."""


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
        """Wait until the server has created its unix socket."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.socket_path.exists():
            if not self.running or asyncio.get_running_loop().time() > deadline:
                raise SandboxError(f"server {self.name!r} did not create {self.socket_path} within {timeout_s}s")
            await asyncio.sleep(0.02)
        return self.socket_path

    async def stop(self) -> None:
        from matrix_hpc.services.sandbox.process import kill_group

        kill_group(self.proc.pid)
        await self.proc.wait()


def hold_dir_lock(sandbox_dir: Path) -> int:
    """Lock ``<dir>/.lock`` (outside the scratch the sandbox sees) for the sandbox's life.

    The lock dies with the process, so a dir whose lock is free belongs to
    a crashed pool and :func:`sweep_stale_dirs` may delete it.
    """
    fd = os.open(sandbox_dir / ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sweep_stale_dirs(scratch_root: str) -> int:
    """Delete sandbox dirs left by crashed processes on this node; returns how many."""
    root = Path(scratch_root)
    if not root.is_dir():
        return 0
    swept = 0
    for entry in root.iterdir():
        lock = entry / ".lock"
        if entry.name.startswith(".") or not lock.exists():
            continue
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # alive
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)
        parents = cgroup_parents("auto", None)
        if parents is not None:
            remove_cgroup(parents, entry.name)
        swept += 1
    return swept


def create_sandbox(conf: SandboxConf, sandbox_id: str) -> Sandbox:
    """Build (not start) a sandbox of the configured backend."""
    if conf.backend == "bwrap":
        from matrix_hpc.services.sandbox.bwrap import BwrapSandbox

        return BwrapSandbox(conf, sandbox_id)
    if conf.backend == "apptainer":
        from matrix_hpc.services.sandbox.apptainer import ApptainerSandbox

        return ApptainerSandbox(conf, sandbox_id)
    from matrix_hpc.services.sandbox.subprocess_backend import SubprocessSandbox

    return SubprocessSandbox(conf, sandbox_id)
