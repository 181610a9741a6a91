"""Bubblewrap backend: every exec is a fresh ``bwrap`` over the sandbox's scratch dir.

Isolation per exec: all namespaces unshared (no network but a private
loopback, own PID namespace so whatever the command leaves behind dies with
it), read-only root (the host's ``/usr`` or an image dir), private ``/tmp``,
the scratch dir as the only writable host path, no capabilities, no nested
user namespaces, ``--die-with-parent`` so a dead pool kills its sandboxes.
As root each sandbox runs as its own unprivileged host uid (see
:mod:`limits`). Files in scratch persist between execs of one sandbox.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
from pathlib import Path

from matrix_hpc.services.sandbox.base import (
    SCRATCH_IN_SANDBOX,
    Bind,
    Sandbox,
    SandboxConf,
    SandboxError,
    parse_bind,
    python_binds,
    python_path_dirs,
)
from matrix_hpc.services.sandbox.limits import UidClaim, claim_uid, prlimit_argv, running_as_root
from matrix_hpc.services.sandbox.process import ExecResult, run_capped

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


def bwrap_argv(conf: SandboxConf, scratch: Path, env: dict[str, str], cwd: str, *, host_uid: int | None) -> list[str]:
    """The full ``bwrap`` invocation (without the outer limits prefix and the command)."""
    binds = (python_binds() if conf.bind_python else []) + [parse_bind(s) for s in conf.binds]
    flags, prefix = isolation_args(host_uid, conf.limits.max_procs)
    tmp_bytes = str(conf.limits.tmp_mb * 1024 * 1024)
    argv = ["bwrap", *root_fs_args(conf.image), "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/tmp",
            "--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm",  # multiprocessing needs it
            "--bind", str(scratch), SCRATCH_IN_SANDBOX, *mount_parent_args(binds), *bind_args(binds),
            *flags, "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
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


class BwrapSandbox(Sandbox):
    def __init__(self, conf: SandboxConf, sandbox_id: str) -> None:
        super().__init__(conf, sandbox_id)
        self.root = running_as_root()
        self.uid_claim: UidClaim | None = None

    @property
    def host_uid(self) -> int | None:
        return self.uid_claim.uid if self.uid_claim else None

    async def _start(self) -> None:
        if check_bwrap.cache_info().currsize == 0:  # the probe runs once per process
            await asyncio.to_thread(check_bwrap)
        if self.conf.image and not os.path.isdir(self.conf.image):
            raise SandboxError(f"sandbox.image={self.conf.image!r} is not a directory (bwrap needs an unpacked root)")
        for spec in self.conf.binds:
            if not os.path.exists(parse_bind(spec).host):
                raise SandboxError(f"sandbox bind {spec!r}: host path does not exist")
        if self.root:
            self.uid_claim = claim_uid(self.conf.limits, Path(self.conf.scratch_root) / ".uids")
            os.chown(self.scratch, self.uid_claim.uid, self.uid_claim.uid)
        os.chmod(self.scratch, 0o700)

    def _command(self, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        limits = prlimit_argv(self.conf.limits, nproc=self.root)
        inner = bwrap_argv(self.conf, self.scratch, sandbox_env(self.conf, env), cwd, host_uid=self.host_uid)
        return self.cgroup_prefix() + limits + inner + argv

    async def _exec(self, argv: list[str], stdin: bytes | None, timeout_s: float, max_output_bytes: int,
                    env: dict[str, str], cwd: str) -> ExecResult:
        return await run_capped(self._command(argv, env, cwd), stdin=stdin, timeout_s=timeout_s,
                                max_output_bytes=max_output_bytes, env=_HOST_ENV)

    async def _spawn_server(self, argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            return await asyncio.create_subprocess_exec(
                *self._command(argv, env, SCRATCH_IN_SANDBOX), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, env=_HOST_ENV, start_new_session=True,
            )
        finally:
            log.close()

    async def _stop(self) -> None:
        if self.uid_claim is not None:
            await asyncio.to_thread(self.uid_claim.release)  # kills whatever still runs as this uid
            self.uid_claim = None

    def _chown_scratch_file(self, target: Path) -> None:
        if self.uid_claim is None:
            return
        path, stop = target, self.scratch.resolve()
        while path != stop and stop in path.parents:
            os.chown(path, self.uid_claim.uid, self.uid_claim.uid)
            path = path.parent
