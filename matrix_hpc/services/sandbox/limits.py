"""Resource limits of sandboxed processes: their settings and the ``prlimit`` prefix that applies them.

Limits are POSIX rlimits applied with util-linux ``prlimit`` in front of the
sandboxed command (no ``preexec_fn``: Ray workers are multi-threaded and
forking Python code there can deadlock). The per-sandbox host uid that makes
``RLIMIT_NPROC`` count one sandbox only is claimed in :mod:`uids`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SandboxLimitsConf:
    """Per-sandbox limits; defaults suit running model-written code snippets."""

    mem_mb: int = 1024  # address-space limit per process (RLIMIT_AS), MiB
    cpu_time_s: int = 60  # CPU seconds per process (RLIMIT_CPU); SIGKILL past it
    max_procs: int = 64  # processes + threads of one sandbox (RLIMIT_NPROC on its own uid)
    max_file_mb: int = 64  # largest file a sandboxed process may write (RLIMIT_FSIZE), MiB
    max_open_files: int = 256  # open file descriptors per process (RLIMIT_NOFILE)
    sandbox_mem_mb: int = 4096  # memory of all processes of one sandbox together (cgroup), MiB
    cgroup: str = "auto"  # auto: per-sandbox cgroup when possible | off | required: fail without one
    cgroup_parent: str | None = None  # a delegated cgroup v2 dir to create sandbox cgroups under
    tmp_mb: int = 256  # size of each of the private /tmp and /dev/shm (tmpfs: host memory), MiB
    exec_timeout_s: float = 30.0  # wall-clock limit of one exec unless the call says otherwise
    max_output_bytes: int = 1_000_000  # cap per stream (stdout, stderr) of one exec; the exec is killed past it
    uid_base: int = 200_000  # first host uid handed to sandboxes when running as root
    uid_count: int = 4096  # size of that uid range (max sandboxes alive on one node)
    uid_lock_dir: str = "/run/matrix_hpc/sandbox_uids"  # node-wide locks of claimed uids (root only; must be private)

    def __post_init__(self) -> None:
        for name in ("mem_mb", "cpu_time_s", "max_procs", "max_file_mb", "max_open_files", "tmp_mb",
                     "sandbox_mem_mb", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox.limits.{name} must be > 0, got {getattr(self, name)}")
        if self.cgroup not in ("auto", "off", "required"):
            raise ValueError(f"sandbox.limits.cgroup={self.cgroup!r} is unknown; choose one of auto, off, required")
        if self.exec_timeout_s <= 0:
            raise ValueError(f"sandbox.limits.exec_timeout_s must be > 0, got {self.exec_timeout_s}")
        if self.uid_base < 1000 or self.uid_count < 1:
            raise ValueError("sandbox.limits.uid_base must be >= 1000 and uid_count >= 1 (unprivileged uids)")


def prlimit_argv(limits: SandboxLimitsConf, *, nproc: bool = True) -> list[str]:
    """``prlimit`` prefix applying the limits to the command after it."""
    mib = 1024 * 1024
    argv = [
        "prlimit",
        f"--as={limits.mem_mb * mib}",
        f"--cpu={limits.cpu_time_s}",
        f"--fsize={limits.max_file_mb * mib}",
        f"--nofile={limits.max_open_files}",
        "--core=0",
    ]
    if nproc:
        argv.append(f"--nproc={limits.max_procs}")
    return argv + ["--"]
