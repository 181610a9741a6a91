"""How sandboxes are leased: the pool's settings (capacity, placement, waiting, expiry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from matrix_hpc.services.sandbox.registry import check_pool_mode


@dataclass
class SandboxPoolConf:
    """How sandboxes are leased: capacity, placement, waiting, expiry."""

    mode: str = "auto"  # ray = pool actor + host actors; local = in this process; auto = ray if Ray is initialised
    name: str = "default"  # pool name; the Ray actor is matrix_hpc/sandbox-pool-<name>-<config digest>
    size: int = 16  # most sandboxes alive at once in the whole pool
    max_per_node: int = 16  # most sandboxes alive at once on one node
    num_hosts: int = 1  # Ray actors that run sandboxes (spread over nodes)
    host_resources: dict[str, float] = field(default_factory=dict)  # Ray resources per host actor, e.g. {sandbox: 1}
    host_num_cpus: float = 0.0  # CPUs reserved per host actor (sandboxed work itself is limited by rlimits)
    lease_wait_s: float = 300.0  # how long a lease request waits for a free sandbox before failing
    lease_ttl_s: float = 60.0  # a lease whose owner stops renewing it for this long is reaped
    max_lease_s: float = 3600.0  # hard limit on one lease's lifetime, renewed or not
    reap_interval_s: float = 2.0  # how often expired leases and dead owners are looked for
    # Attach to the pool `matrix-hpc serve up sandbox=...` deployed under `name` (its settings apply, not
    # this config's; docs/serve.md); the run then leaves it running.
    deployed: bool = False

    def __post_init__(self) -> None:
        check_pool_mode(self.mode)
        for name in ("size", "max_per_node", "num_hosts"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox.pool.{name} must be >= 1, got {getattr(self, name)}")
        if self.lease_ttl_s <= 0 or self.max_lease_s <= 0 or self.lease_wait_s < 0:
            raise ValueError("sandbox.pool.lease_ttl_s and max_lease_s must be > 0, lease_wait_s >= 0")
        if self.lease_ttl_s < 2 * self.reap_interval_s:
            raise ValueError(
                f"sandbox.pool.lease_ttl_s={self.lease_ttl_s} must be at least twice "
                f"reap_interval_s={self.reap_interval_s}, or live owners may lose their leases"
            )
