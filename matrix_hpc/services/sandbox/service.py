"""The sandbox service of one run (driver side), as the runtime starts services.

``start_service(conf, plan)`` runs in the driver: it creates the pool where
``sandbox.pool.mode`` says (under Ray: the named pool actor and its host
actors) and returns a :class:`SandboxService` whose :meth:`client_factory`
is a picklable recipe each worker calls once to build its ``ctx.sandboxes``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from matrix_hpc.services.sandbox.client import PoolBackend, SandboxPoolClient, make_sandbox_pool
from matrix_hpc.services.sandbox.contract import SandboxConf
from matrix_hpc.services.sandbox.registry import pool_backend_class


class SandboxPoolFactory:
    """Picklable recipe of a worker's pool client; call it once per process."""

    def __init__(self, conf: SandboxConf) -> None:
        self.conf = conf

    def __call__(self) -> SandboxPoolClient:
        return make_sandbox_pool(self.conf)

    def __repr__(self) -> str:
        return f"SandboxPoolFactory(backend={self.conf.backend!r}, pool={self.conf.pool.name!r})"


class SandboxService:
    def __init__(self, conf: SandboxConf, pool_backend: type[PoolBackend], owned: bool = True) -> None:
        self.conf = conf
        self.pool_backend = pool_backend  # where the pool runs (local, ray)
        self.owned = owned  # False: a deployed pool, left running when the run ends

    def client_factory(self) -> SandboxPoolFactory:
        return SandboxPoolFactory(self.conf)

    def stop(self) -> None:
        """Stop every sandbox of the pool and its actors (idempotent); a deployed pool stays."""
        if self.owned:
            self.pool_backend.stop_pool(self.conf)


def start_service(conf: SandboxConf, plan: Any = None) -> SandboxService:  # Any: runtime RunPlan (unused)
    """Create the pool up front so that configuration errors surface before any task runs; with
    ``sandbox.pool.deployed``, attach to the pool deployed under its name (docs/serve.md)."""
    if conf.pool.deployed:
        from matrix_hpc.services.sandbox.ray_pool import RayPoolBackend, deployed_pool_conf

        deployed = deployed_pool_conf(conf.pool.name)  # its own settings; marked attached (not in its identity)
        deployed = dataclasses.replace(deployed, pool=dataclasses.replace(deployed.pool, deployed=True))
        return SandboxService(deployed, RayPoolBackend, owned=False)
    pool_backend = pool_backend_class(conf.pool.mode)
    pool_backend.start_pool(conf)
    return SandboxService(conf, pool_backend)
