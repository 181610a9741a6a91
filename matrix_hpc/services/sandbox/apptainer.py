"""Apptainer backend (the cluster backend): one ``apptainer instance`` per sandbox.

``start`` runs ``apptainer instance start`` with ``--containall`` (own PID,
IPC and mount namespaces, clean environment, empty home and /tmp), no
network (``--net --network none``: loopback only), the scratch dir bound
read-write at ``/scratch`` and the configured binds (read-only unless
``:rw``), ``--nv`` when GPUs are requested, and optional ``--fakeroot`` /
``--writable-tmpfs``. Each exec is ``apptainer exec instance://<name>``
under ``prlimit`` (util-linux must exist in the image) in its own process
group; ``stop`` is ``apptainer instance stop``, which kills everything left
in the instance.

The environment inside (``sandbox.env`` may hold secrets) is handed over as
``APPTAINERENV_<NAME>`` variables of the apptainer process (honoured even
with ``--cleanenv``), never as ``--env NAME=VALUE`` in a command line that
every user of the node can read.

Apptainer cannot be installed on the development machine, so this module
keeps every command it forms in pure functions that the unit tests compare
with golden strings.
"""

from __future__ import annotations

import asyncio
import os
import shutil

from matrix_hpc.services.sandbox.binds import parse_bind
from matrix_hpc.services.sandbox.contract import SCRATCH_IN_SANDBOX, Sandbox, SandboxConf, SandboxError
from matrix_hpc.services.sandbox.limits import prlimit_argv
from matrix_hpc.services.sandbox.process import ExecResult, run_capped
from matrix_hpc.services.sandbox.server import spawn_server

_START_TIMEOUT_S = 120.0  # pulling a SIF onto node-local disk can take a while
_STOP_TIMEOUT_S = 30.0


def instance_name(sandbox_id: str) -> str:
    """Apptainer instance names allow letters, digits, '-', '_' and '.'."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sandbox_id)
    return f"mhpc_{safe}"


def env_prefix(binary: str) -> str:
    """``APPTAINERENV_``, or ``SINGULARITYENV_`` for a singularity binary."""
    return "SINGULARITYENV_" if "singularity" in os.path.basename(binary) else "APPTAINERENV_"


def process_env(binary: str, inside: dict[str, str], host: dict[str, str] | None = None) -> dict[str, str]:
    """The apptainer process's own environment: the host's (minus stray container variables) plus ``inside``."""
    host = dict(os.environ if host is None else host)
    env = {k: v for k, v in host.items() if not k.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}
    prefix = env_prefix(binary)
    env.update({prefix + key: value for key, value in inside.items()})
    return env


def start_argv(conf: SandboxConf, scratch: str, name: str) -> list[str]:
    """``apptainer instance start ...`` for one sandbox."""
    app = conf.apptainer
    argv = [app.binary, "instance", "start", "--containall", "--net", "--network", "none",
            "--bind", f"{scratch}:{SCRATCH_IN_SANDBOX}:rw"]
    for spec in conf.binds:
        b = parse_bind(spec)
        argv += ["--bind", f"{b.host}:{b.inside}:{'rw' if b.writable else 'ro'}"]
    if conf.gpus > 0:
        argv.append("--nv")
    if app.fakeroot:
        argv.append("--fakeroot")
    if app.writable_tmpfs:
        argv.append("--writable-tmpfs")
    if app.cgroup_limits:
        argv += ["--memory", f"{conf.limits.mem_mb}M", "--pids-limit", str(conf.limits.max_procs)]
    assert conf.image is not None  # checked by ApptainerSandbox.check_conf
    return argv + [conf.image, name]


def exec_argv(conf: SandboxConf, name: str, command: list[str], cwd: str) -> list[str]:
    """``apptainer exec instance://...`` running ``command`` under the limits (environment: :func:`process_env`)."""
    return [conf.apptainer.binary, "exec", "--cleanenv", "--pwd", cwd, f"instance://{name}",
            *prlimit_argv(conf.limits), *command]


def stop_argv(conf: SandboxConf, name: str) -> list[str]:
    return [conf.apptainer.binary, "instance", "stop", "--force", name]


class ApptainerSandbox(Sandbox):
    uses_cgroup = False  # apptainer manages its own (apptainer.cgroup_limits)

    def __init__(self, conf: SandboxConf, sandbox_id: str) -> None:
        super().__init__(conf, sandbox_id)
        self.instance = instance_name(sandbox_id)
        self.instance_running = False

    @classmethod
    def check_conf(cls, conf: SandboxConf) -> None:
        if not conf.image:
            raise ValueError("sandbox.backend=apptainer needs sandbox.image=<path to a .sif image or sandbox dir>")

    async def _start(self) -> None:
        if shutil.which(self.conf.apptainer.binary) is None:
            raise SandboxError(
                f"{self.conf.apptainer.binary!r} is not on PATH; load the cluster's apptainer module "
                "(e.g. `module load apptainer`) or choose sandbox=bwrap"
            )
        argv = start_argv(self.conf, str(self.scratch), self.instance)
        r = await run_capped(argv, stdin=None, timeout_s=_START_TIMEOUT_S, max_output_bytes=65536,
                             env=process_env(self.conf.apptainer.binary, self.conf.env))
        self.instance_running = r.exit_code == 0
        if r.exit_code != 0:
            raise SandboxError(f"apptainer instance start failed for sandbox {self.id} "
                               f"(exit {r.exit_code}): {r.stderr.strip()[-2000:]}")

    async def _exec(self, argv: list[str], stdin: bytes | None, timeout_s: float, max_output_bytes: int,
                    env: dict[str, str], cwd: str) -> ExecResult:
        return await run_capped(exec_argv(self.conf, self.instance, argv, cwd), stdin=stdin,
                                timeout_s=timeout_s, max_output_bytes=max_output_bytes, env=self._env(env))

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return process_env(self.conf.apptainer.binary, {**self.conf.env, **extra})

    async def _spawn_server(self, argv: list[str], env: dict[str, str],
                            pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
        return await spawn_server(exec_argv(self.conf, self.instance, argv, SCRATCH_IN_SANDBOX),
                                  log_path=self.dir / "server.log", env=self._env(env), pass_fds=pass_fds)

    async def _stop(self) -> None:
        if not self.instance_running:
            return
        self.instance_running = False
        r = await run_capped(stop_argv(self.conf, self.instance), stdin=None, timeout_s=_STOP_TIMEOUT_S,
                             max_output_bytes=65536)
        if r.exit_code != 0 and "no instance found" not in r.stderr.lower():
            raise SandboxError(f"apptainer instance stop {self.instance} failed (exit {r.exit_code}): "
                               f"{r.stderr.strip()[-2000:]}")
