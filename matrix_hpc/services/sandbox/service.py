"""The sandbox service of one run (driver side), as the runtime starts services.

``start_service(conf, plan)`` runs in the driver: it creates the pool (under
Ray: the named pool actor and its host actors) and returns a
:class:`SandboxService` whose :meth:`client_factory` is a picklable recipe
each worker calls once to build its ``ctx.sandboxes``.
"""

from __future__ import annotations

import logging
from typing import Any

from matrix_hpc.services.sandbox.base import SandboxConf
from matrix_hpc.services.sandbox.pool import SandboxPoolClient, make_sandbox_pool

log = logging.getLogger(__name__)


class SandboxPoolFactory:
    """Picklable recipe of a worker's pool client; call it once per process."""

    def __init__(self, conf: SandboxConf) -> None:
        self.conf = conf

    def __call__(self) -> SandboxPoolClient:
        return make_sandbox_pool(self.conf)

    def __repr__(self) -> str:
        return f"SandboxPoolFactory(backend={self.conf.backend!r}, pool={self.conf.pool.name!r})"


class SandboxService:
    def __init__(self, conf: SandboxConf, uses_ray: bool) -> None:
        self.conf = conf
        self.uses_ray = uses_ray

    def client_factory(self) -> SandboxPoolFactory:
        return SandboxPoolFactory(self.conf)

    def stop(self) -> None:
        """Stop every sandbox of the pool and its actors (idempotent)."""
        if self.uses_ray:
            from matrix_hpc.services.sandbox.ray_pool import shutdown_pool

            shutdown_pool(self.conf)


def start_service(conf: SandboxConf, plan: Any = None) -> SandboxService:  # Any: runtime RunPlan (unused)
    """Create the pool up front so that configuration errors surface before any task runs."""
    if conf.pool.mode == "local":
        return SandboxService(conf, uses_ray=False)
    import ray

    if not ray.is_initialized():
        if conf.pool.mode == "ray":
            raise RuntimeError("sandbox.pool.mode=ray but Ray is not initialised; start the cluster first")
        return SandboxService(conf, uses_ray=False)
    from matrix_hpc.services.sandbox.ray_pool import checked_pool

    actor = checked_pool(conf)
    stats = ray.get(actor.stats.remote(), timeout=120)  # waits until the host actors are placed
    log.info("sandbox pool %r ready: %s", conf.pool.name, stats)
    return SandboxService(conf, uses_ray=True)
