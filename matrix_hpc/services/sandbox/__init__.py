"""Sandboxes: isolated environments leased per task (bubblewrap, Apptainer; trusted_subprocess: no isolation).

Public API (everything else is internal)::

    from matrix_hpc.services.sandbox import SandboxConf, make_sandbox_pool, run_code_with_tests

    pool = make_sandbox_pool(SandboxConf(backend="bwrap"))   # ctx.sandboxes in a workflow
    async with pool.lease(task) as sb:
        result = await sb.exec(["python3", "-c", "print(1)"], timeout_s=5)

Names are imported lazily so that ``import matrix_hpc.services.sandbox``
does not pull in Ray or psutil.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SandboxConf": "contract", "ApptainerConf": "contract", "Sandbox": "contract", "SandboxError": "errors",
    "ServerProcess": "server", "create_sandbox": "registry", "register_backend": "registry",
    "register_pool_backend": "registry",
    "SandboxLimitsConf": "limits", "SandboxPoolConf": "pool_conf", "ExecResult": "process",
    "make_sandbox_pool": "client", "SandboxPoolClient": "client", "LeasedSandbox": "client", "PoolCore": "pool_core",
    "SandboxPoolExhausted": "lease", "LeaseLost": "lease", "LeaseOwner": "lease", "SandboxHost": "host",
    "shutdown_pool": "ray_pool", "get_or_create_pool": "ray_pool",
    "CodeExecResult": "code_exec", "run_code_with_tests": "code_exec", "code_exec_step": "code_exec",
    "extract_code": "code_exec",
    "start_service": "service", "SandboxService": "service", "SandboxPoolFactory": "service",
    "UnsafePathError": "safe_path",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
