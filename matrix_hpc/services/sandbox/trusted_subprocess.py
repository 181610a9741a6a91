"""The ``trusted_subprocess`` backend: an unsandboxed subprocess with the same limits. TRUSTED CODE ONLY.

There is no isolation at all: the command sees the host filesystem and
network as the pool's own user. It starts with a minimal environment
(``PATH``, ``HOME`` = its scratch dir, ``LANG``, plus ``sandbox.env``), so
the host's API keys and tokens are not handed to it by accident. Limits (memory, CPU time, file size, wall
time, output cap, and the per-sandbox cgroup where one can be made) still
apply, and the exec's process group is killed when it returns; a process
that starts its own session escapes that kill (the cgroup, when there is
one, still ends it at release). Without a cgroup the process-count limit is
not enforced when running as root (Linux exempts root from RLIMIT_NPROC).
Use it for code you wrote yourself, on machines without bubblewrap or
Apptainer.
"""

from __future__ import annotations

import asyncio
import os

from matrix_hpc.services.sandbox.binds import python_path_dirs
from matrix_hpc.services.sandbox.contract import SCRATCH_IN_SANDBOX, Sandbox
from matrix_hpc.services.sandbox.limits import prlimit_argv
from matrix_hpc.services.sandbox.process import ExecResult, run_capped
from matrix_hpc.services.sandbox.server import spawn_server


def minimal_env(scratch: str) -> dict[str, str]:
    """What a trusted subprocess gets from us before ``sandbox.env``: nothing of the host's own environment."""
    path = python_path_dirs() + ["/usr/local/bin", "/usr/bin", "/bin"]
    return {"PATH": ":".join(dict.fromkeys(path)), "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
            "SANDBOX_SCRATCH": scratch, "PYTHONUNBUFFERED": "1"}


class TrustedSubprocessSandbox(Sandbox):
    async def _start(self) -> None:
        pass

    async def _stop(self) -> None:
        pass

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = minimal_env(str(self.scratch))
        env.update(self.conf.env)
        env.update(extra)
        return env

    def _host_cwd(self, cwd: str) -> str:
        """``/scratch`` inside means the scratch dir here (there is no inside)."""
        if cwd == SCRATCH_IN_SANDBOX or cwd.startswith(SCRATCH_IN_SANDBOX + "/"):
            return str(self.scratch) + cwd[len(SCRATCH_IN_SANDBOX):]
        return cwd

    async def _exec(self, argv: list[str], stdin: bytes | None, timeout_s: float, max_output_bytes: int,
                    env: dict[str, str], cwd: str) -> ExecResult:
        return await run_capped(self.cgroup_prefix() + prlimit_argv(self.conf.limits) + argv, stdin=stdin,
                                timeout_s=timeout_s, max_output_bytes=max_output_bytes, env=self._env(env),
                                cwd=self._host_cwd(cwd))

    async def _spawn_server(self, argv: list[str], env: dict[str, str],
                            pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
        env = {**env, "MATRIX_SANDBOX_SOCKET": str(self.scratch / os.path.basename(env["MATRIX_SANDBOX_SOCKET"]))}
        return await spawn_server([*self.cgroup_prefix(), *prlimit_argv(self.conf.limits), *argv],
                                  log_path=self.dir / "server.log", env=self._env(env), cwd=str(self.scratch),
                                  pass_fds=pass_fds)
