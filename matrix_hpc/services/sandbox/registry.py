"""Backends by name: the sandbox backend ``sandbox.backend`` selects and the pool backend ``sandbox.pool.mode`` selects.

Each entry is a ``module:Class`` target (as Hydra's ``_target_``) imported on
first use, so the contract imports no backend and a backend's dependencies
load only when it is chosen. A new backend is a sibling module plus one
:func:`register_backend` (or :func:`register_pool_backend`) call.

Example::

    register_backend("firejail", "my_pkg.firejail:FirejailSandbox")
    sandbox = create_sandbox(SandboxConf(backend="firejail"), "t1")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from matrix_hpc.services.sandbox.client import PoolBackend
    from matrix_hpc.services.sandbox.contract import Sandbox, SandboxConf

_SANDBOX_BACKENDS: dict[str, str] = {}  # sandbox.backend -> "module:Class" of a Sandbox subclass
_POOL_BACKENDS: dict[str, str] = {}  # sandbox.pool.mode -> "module:Class" of a PoolBackend, in `auto` order
#: Old backend names and what they are called now; selecting one is an error that says so.
RENAMED_BACKENDS = {"none": "trusted_subprocess", "subprocess": "trusted_subprocess"}
AUTO_POOL_MODE = "auto"  # the first registered pool backend that is available here


def register_backend(name: str, target: str) -> None:
    """Make ``sandbox.backend=<name>`` build the ``module:Class`` named by ``target``."""
    _SANDBOX_BACKENDS[name] = target


def register_pool_backend(name: str, target: str) -> None:
    """Make ``sandbox.pool.mode=<name>`` use the ``module:Class`` named by ``target`` (auto tries them in order)."""
    _POOL_BACKENDS[name] = target


register_backend("bwrap", f"{__package__}.bwrap:BwrapSandbox")
register_backend("apptainer", f"{__package__}.apptainer:ApptainerSandbox")
register_backend("trusted_subprocess", f"{__package__}.trusted_subprocess:TrustedSubprocessSandbox")
register_pool_backend("ray", f"{__package__}.ray_pool:RayPoolBackend")
register_pool_backend("local", f"{__package__}.local_pool:LocalPoolBackend")


def backend_class(name: str) -> type[Sandbox]:
    """The sandbox class of ``sandbox.backend=<name>``; an unknown name is refused with the valid ones."""
    if name in RENAMED_BACKENDS:
        raise ValueError(
            f"sandbox.backend={name!r} (sandbox=none, sandbox=subprocess) was renamed: the unsandboxed "
            f"subprocess (no isolation, trusted code only) is now sandbox={RENAMED_BACKENDS[name]}; "
            "for untrusted code choose "
            "sandbox=bwrap or sandbox=apptainer, and for no sandbox service sandbox=disabled"
        )
    return cast("type[Sandbox]", _load(_SANDBOX_BACKENDS, "sandbox.backend", name, ()))


def create_sandbox(conf: SandboxConf, sandbox_id: str) -> Sandbox:
    """Build (not start) a sandbox of the configured backend."""
    return backend_class(conf.backend)(conf, sandbox_id)


def check_pool_mode(mode: str) -> None:
    """Refuse an unknown ``sandbox.pool.mode`` without importing any pool backend."""
    if mode != AUTO_POOL_MODE and mode not in _POOL_BACKENDS:
        raise _unknown("sandbox.pool.mode", mode, (AUTO_POOL_MODE, *_POOL_BACKENDS))


def pool_backend_class(mode: str) -> type[PoolBackend]:
    """The pool backend of ``sandbox.pool.mode``; ``auto`` is the first registered one available here."""
    if mode == AUTO_POOL_MODE:
        return next(cls for cls in map(pool_backend_class, _POOL_BACKENDS) if cls.available())
    return cast("type[PoolBackend]", _load(_POOL_BACKENDS, "sandbox.pool.mode", mode, (AUTO_POOL_MODE,)))


def _load(table: dict[str, str], setting: str, name: str, also_valid: tuple[str, ...]) -> Any:  # Any: the class
    target = table.get(name)
    if target is None:
        raise _unknown(setting, name, (*also_valid, *table))
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _unknown(setting: str, name: str, valid: tuple[str, ...]) -> ValueError:
    return ValueError(f"{setting}={name!r} is unknown; choose one of {', '.join(valid)}")
