"""Bubblewrap backend: every exec is a fresh ``bwrap`` over the sandbox's scratch dir.

Isolation per exec: all namespaces unshared (no network but a private
loopback, own PID namespace so whatever the command leaves behind dies with
it), read-only root (the host's ``/usr`` or an image dir), private ``/tmp``,
the scratch dir as the only writable host path, no capabilities, no nested
user namespaces, ``--die-with-parent`` so a dead pool kills its sandboxes.
As root each sandbox runs as its own unprivileged host uid (see
:mod:`limits`). Files in scratch persist between execs of one sandbox.

The environment inside (``sandbox.env`` may hold secrets) never appears in a
command line, where every user of the node can read it
(``/proc/<pid>/cmdline``): its ``--setenv`` options reach bwrap through an
inherited memfd (``bwrap --args FD``), and the host-side processes keep a
fixed minimal environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from matrix_hpc.services.sandbox.binds import Bind, parse_bind, python_binds, python_path_dirs
from matrix_hpc.services.sandbox.contract import SCRATCH_IN_SANDBOX, Sandbox, SandboxConf, SandboxError
from matrix_hpc.services.sandbox.limits import prlimit_argv
from matrix_hpc.services.sandbox.process import ExecResult, run_capped
from matrix_hpc.services.sandbox.server import spawn_server
from matrix_hpc.services.sandbox.uids import UidClaim, claim_uid, running_as_root

UID_INSIDE = 1000  # what sandboxed programs see as their uid/gid
_HOST_ENV = {"PATH": "/usr/bin:/bin"}  # only for finding prlimit and bwrap; the sandbox gets its own
_ROOT_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc entries programs need (dynamic linker, TLS roots, time zone); the rest of /etc stays hidden.
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl", "ca-certificates",
              "localtime", "nsswitch.conf", "mime.types")


def root_fs_args(image: str | None) -> list[str]:
    """Mounts forming the read-only root: an image dir, or the host's system dirs."""
    if image:
        return ["--ro-bind", image, "/"]
    args = ["--ro-bind", "/usr", "/usr"]
    for path in _ROOT_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in _ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return args


def bind_args(binds: list[Bind]) -> list[str]:
    args: list[str] = []
    for b in binds:
        args += ["--bind" if b.writable else "--ro-bind", b.host, b.inside]
    return args


def sandbox_env(conf: SandboxConf, extra: dict[str, str]) -> dict[str, str]:
    """The whole environment inside: nothing leaks in from the host unless configured."""
    path = (python_path_dirs() if conf.bind_python else []) + ["/usr/local/bin", "/usr/bin", "/bin"]
    env = {
        "PATH": ":".join(path), "HOME": SCRATCH_IN_SANDBOX, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
    }
    env.update(conf.env)
    env.update(extra)
    return env


def mount_parent_args(binds: list[Bind]) -> list[str]:
    """Create the parents of bind targets world-readable (bwrap would make them 0700)."""
    system = ("/usr", "/etc", "/proc", "/dev", "/tmp", SCRATCH_IN_SANDBOX, *_ROOT_DIRS)
    args: list[str] = []
    seen: set[str] = set()
    for b in binds:
        parent = Path(b.inside).parent
        for anc in reversed([parent, *parent.parents]):
            name = str(anc)
            if name == "/" or name in seen or any(name == s or name.startswith(s + "/") for s in system):
                continue
            seen.add(name)
            args += ["--perms", "0755", "--dir", name]
    return args


def isolation_args(host_uid: int | None, limits_nproc: int) -> tuple[list[str], list[str]]:
    """(bwrap flags, command prefix) for the two ways bwrap can run.

    As root, bwrap runs privileged without a user namespace and the command
    drops to the sandbox's own host uid with setpriv (no capabilities, no
    new privileges), so RLIMIT_NPROC counts that uid only. Unprivileged,
    bwrap makes a user namespace and the process limit is set inside it.
    """
    if host_uid is not None:
        flags = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        prefix = ["setpriv", f"--reuid={host_uid}", f"--regid={host_uid}", "--clear-groups",
                  "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return flags, prefix
    flags = ["--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(UID_INSIDE),
             "--gid", str(UID_INSIDE), "--cap-drop", "ALL"]
    return flags, ["prlimit", f"--nproc={limits_nproc}", "--"]


@contextlib.contextmanager
def env_args_fd(env: dict[str, str]) -> Iterator[int]:
    """An fd holding ``--setenv K V ...`` (NUL-separated) for ``bwrap --args FD``; closed on exit.

    Pass it to the child (``pass_fds``); the values never enter an argv.
    """
    fd = os.memfd_create("matrix-hpc-sandbox-env", os.MFD_CLOEXEC)
    try:
        payload = memoryview(b"".join(_nul_args(env)))
        while payload:
            payload = payload[os.write(fd, payload):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _nul_args(env: dict[str, str]) -> Iterator[bytes]:
    for key, value in env.items():
        if "\0" in key or "\0" in value or "=" in key or not key:
            raise SandboxError(f"sandbox env variable {key!r}: names must be non-empty without '=' or NUL, "
                               "values without NUL")
        for part in ("--setenv", key, value):
            yield part.encode() + b"\0"


def bwrap_argv(conf: SandboxConf, scratch: Path, env_fd: int, cwd: str, *, host_uid: int | None) -> list[str]:
    """The full ``bwrap`` invocation (without the outer limits prefix and the command).

    ``env_fd``: from :func:`env_args_fd`, holding the environment inside.
    """
    binds = (python_binds() if conf.bind_python else []) + [parse_bind(s) for s in conf.binds]
    flags, prefix = isolation_args(host_uid, conf.limits.max_procs)
    tmp_bytes = str(conf.limits.tmp_mb * 1024 * 1024)
    argv = ["bwrap", *root_fs_args(conf.image), "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/tmp",
            "--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm",  # multiprocessing needs it
            "--bind", str(scratch), SCRATCH_IN_SANDBOX, *mount_parent_args(binds), *bind_args(binds),
            *flags, "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
            "--args", str(env_fd)]
    return argv + ["--chdir", cwd, "--", *prefix]


@functools.lru_cache(maxsize=1)
def check_bwrap() -> None:
    """Fail early, once per process, with advice when bubblewrap cannot run here."""
    if shutil.which("bwrap") is None:
        raise SandboxError(
            "bubblewrap (bwrap) is not installed; run `apt-get install bubblewrap` "
            "(or .ci/setup_sandbox.sh), or choose sandbox=apptainer on a cluster"
        )
    flags, prefix = isolation_args(65534 if running_as_root() else None, 64)
    probe = ["bwrap", "--ro-bind", "/", "/", "--proc", "/proc", *flags, "--die-with-parent", "--", *prefix, "true"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SandboxError(
            f"bubblewrap cannot create namespaces here: {done.stderr.strip()}; enable unprivileged user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0, or the "
            "AppArmor userns restriction), or use sandbox=apptainer"
        )


def check_host_paths(conf: SandboxConf) -> None:
    """The image dir and every bind's host path exist (bwrap would fail with a less useful message)."""
    if conf.image and not os.path.isdir(conf.image):
        raise SandboxError(f"sandbox.image={conf.image!r} is not a directory (bwrap needs an unpacked root)")
    for spec in conf.binds:
        if not os.path.exists(parse_bind(spec).host):
            raise SandboxError(f"sandbox bind {spec!r}: host path does not exist")


class BwrapSandbox(Sandbox):
    def __init__(self, conf: SandboxConf, sandbox_id: str) -> None:
        super().__init__(conf, sandbox_id)
        self.as_root = running_as_root()
        self.uid_claim: UidClaim | None = None

    @property
    def host_uid(self) -> int | None:
        return self.uid_claim.uid if self.uid_claim else None

    async def _start(self) -> None:
        if check_bwrap.cache_info().currsize == 0:  # the probe runs once per process
            await asyncio.to_thread(check_bwrap)
        await asyncio.to_thread(check_host_paths, self.conf)
        if self.as_root:
            self.uid_claim = await asyncio.to_thread(claim_uid, self.conf.limits)
            os.fchown(self._scratch_fd, self.uid_claim.uid, self.uid_claim.uid)
        os.fchmod(self._scratch_fd, 0o700)

    def scratch_owner(self) -> tuple[int, int] | None:
        return (self.uid_claim.uid, self.uid_claim.uid) if self.uid_claim is not None else None

    def _command(self, argv: list[str], env_fd: int, cwd: str) -> list[str]:
        limits = prlimit_argv(self.conf.limits, nproc=self.as_root)
        inner = bwrap_argv(self.conf, self.scratch, env_fd, cwd, host_uid=self.host_uid)
        return self.cgroup_prefix() + limits + inner + argv

    async def _exec(self, argv: list[str], stdin: bytes | None, timeout_s: float, max_output_bytes: int,
                    env: dict[str, str], cwd: str) -> ExecResult:
        with env_args_fd(sandbox_env(self.conf, env)) as env_fd:
            return await run_capped(self._command(argv, env_fd, cwd), stdin=stdin, timeout_s=timeout_s,
                                    max_output_bytes=max_output_bytes, env=_HOST_ENV, pass_fds=(env_fd,))

    async def _spawn_server(self, argv: list[str], env: dict[str, str],
                            pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
        with env_args_fd(sandbox_env(self.conf, env)) as env_fd:  # bwrap hands inherited fds on
            return await spawn_server(self._command(argv, env_fd, SCRATCH_IN_SANDBOX),
                                      log_path=self.dir / "server.log", env=_HOST_ENV, pass_fds=(env_fd, *pass_fds))

    async def _stop(self) -> None:
        if self.uid_claim is not None:
            await asyncio.to_thread(self.uid_claim.release)  # kills whatever still runs as this uid
            self.uid_claim = None
