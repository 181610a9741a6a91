"""How a run gets its Ray: joins the cluster that ``cluster up`` started (or
``MATRIX_RAY_ADDRESS`` names), or starts a local one (cluster/local_ray.py). Light to
import: ``matrix-hpc run`` begins the local Ray from here before it imports the run."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from matrix_hpc.cluster.local_ray import claim_early_start, start_local_ray, start_local_ray_early

log = logging.getLogger(__name__)


def init_ray(cfg: DictConfig) -> bool:
    """Connect to the cluster's Ray, or start a local one. True if we started it."""
    args = _local_ray_args(cfg)
    if claim_early_start(**args):  # `matrix-hpc run` began it while the config was checked
        return True
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    # Before `import ray`: joining a matrix cluster sets Ray's auth mode in the
    # environment, and Ray reads it once, at import.
    address = _cluster_address(cfg)
    import ray

    if address:
        ray.init(address=address, namespace="matrix_hpc", log_to_driver=True)
        return True
    start_local_ray(**args)
    return True


def start_ray_early(cfg: DictConfig) -> None:
    """Begin the local Ray ``init_ray`` would start, in a thread, when ``cfg`` is a run on
    a local Ray of its own (not one joining a cluster, not a Slurm submission); a no-op
    otherwise. ``matrix-hpc run`` calls it once the config is checked, so that Ray's start
    overlaps Hydra's compose and the run's checks; it calls ``abandon_early_start`` when
    the run stops before needing Ray (a locked output). The checks a run makes before
    Ray starts (input path, Prometheus) are made first: a run they refuse starts none."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    if (cfg.get("cluster") or {}).get("backend", "local") != "local" or not _ready_for_ray(cfg):
        return
    if _cluster_address(cfg):
        return
    start_local_ray_early(**_local_ray_args(cfg))


def _ready_for_ray(cfg: DictConfig) -> bool:
    """What a run checks before Ray starts passes: a run refused for its input or for a
    missing Prometheus starts no Ray (app/run.py ``execute`` reports the error)."""
    from matrix_hpc.app.monitoring import check_monitoring
    from matrix_hpc.cluster.monitoring import MonitoringError
    from matrix_hpc.store.input import InputPathError, check_input

    try:
        check_input(OmegaConf.to_object(cfg.dataset))  # type: ignore[arg-type]
        check_monitoring(cfg)
    except (InputPathError, MonitoringError, ValueError):
        return False
    return True


def _local_ray_args(cfg: DictConfig) -> dict[str, Any]:
    monitored = bool(cfg.get("monitoring", False))
    return {"num_cpus": cfg.run.num_cpus, "namespace": "matrix_hpc", "log_to_driver": True,
            "metrics_interval_s": cfg.prometheus.ray_export_interval_s if monitored else None}


def _cluster_address(cfg: DictConfig) -> str | None:
    """The Ray address of a running matrix cluster, if the cluster config names one."""
    if os.environ.get("MATRIX_RAY_ADDRESS"):
        return os.environ["MATRIX_RAY_ADDRESS"]
    from matrix_hpc.cluster import ClusterError, ray_address_for  # None unless `cluster up` started a head

    conf = OmegaConf.to_object(cfg.cluster)
    try:
        return ray_address_for(conf)  # type: ignore[no-any-return]
    except ClusterError as e:
        if getattr(conf, "backend", "local") != "local":
            raise
        log.warning("%s; starting a local Ray instead", e)  # a stale local cluster must not stop a run
        return None
