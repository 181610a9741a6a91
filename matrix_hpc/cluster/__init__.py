"""The cluster: bring Ray up and down, on this machine or under Slurm, and
run the driver as a Slurm job. See docs/slurm.md.

    from matrix_hpc.cluster import SlurmClusterConf, cluster_up, cluster_down
    conf = SlurmClusterConf(name="demo", workers=2)
    cluster_up(conf); ...; cluster_down(conf)

Imports are lazy: ``import matrix_hpc.cluster`` loads neither Ray nor submitit.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusterConf": "config", "LocalClusterConf": "config", "SlurmClusterConf": "config", "SlurmConf": "config",
    "JobShapeConf": "config", "as_cluster_conf": "config",
    "ClusterError": "errors", "JobFailedError": "errors",
    "cluster_up": "lifecycle", "cluster_status": "lifecycle", "cluster_down": "lifecycle",
    "ClusterStatus": "lifecycle", "ray_address_for": "lifecycle", "cluster_main": "lifecycle",
    "submit_run": "slurm_run", "maybe_submit_run": "slurm_run",
    "slurm_available": "slurm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'matrix_hpc.cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(f"matrix_hpc.cluster.{_EXPORTS[name]}"), name)
