"""Cluster config: the contract between the CLI, the runtime and the backends.

One ``...ClusterConf`` per backend (``local``, ``slurm``), both built on
``ClusterConf``. Job shapes (CPUs, memory, time) are shared; Slurm-only
settings (partition, account, ...) live in ``SlurmConf``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("local", "slurm")


@dataclass
class JobShapeConf:
    nodes: int = 1  # nodes per job (a multi-node worker job runs one Ray node per node)
    cpus_per_task: int = 2  # CPUs per node, also offered to Ray as num_cpus
    gpus_per_node: int = 0  # GPUs per node (Slurm --gpus-per-node), also offered to Ray
    mem_gb: float = 4.0  # memory per node
    time_min: int = 60  # wall-clock limit of the job

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class SlurmConf:
    partition: str | None = None  # -p; None: the cluster's default partition
    account: str | None = None  # -A; None: your default account
    qos: str | None = None  # --qos
    constraint: str | None = None  # -C node features, e.g. "a100"
    exclusive: bool = False  # --exclusive: whole nodes for each job
    signal_delay_s: int = 120  # USR1 arrives this long before the time limit (drain, commit, requeue)
    max_num_timeout: int = 3  # times a run may be requeued after hitting its time limit
    setup: list[str] = field(default_factory=list)  # shell lines run first in each job (module load ...)
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {reservation: x}


def _head_shape() -> JobShapeConf:
    return JobShapeConf(cpus_per_task=1, mem_gb=4.0, time_min=24 * 60)


def _worker_shape() -> JobShapeConf:
    return JobShapeConf(cpus_per_task=2, mem_gb=8.0, time_min=24 * 60)


def _driver_shape() -> JobShapeConf:
    return JobShapeConf(cpus_per_task=2, mem_gb=8.0, time_min=4 * 60)


@dataclass
class ClusterConf:
    backend: str = "local"  # local | slurm
    name: str = "matrix"  # names the jobs (matrix-head-<name>) and the default cluster dir
    dir: str = ""  # cluster dir on a filesystem every node sees; "" = ~/.matrix_hpc/clusters/<name>
    workers: int = 1  # worker jobs that `cluster up` adds (each adds this again)
    head: JobShapeConf = field(default_factory=_head_shape)  # the Ray head job
    worker: JobShapeConf = field(default_factory=_worker_shape)  # each worker job
    driver: JobShapeConf = field(default_factory=_driver_shape)  # `matrix-hpc run` submitted as a job
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra custom Ray resources per worker node
    head_wait_timeout_s: float = 300.0  # give up waiting for the head (or workers) after this long
    include_dashboard: bool = False  # start Ray's dashboard on the head (costs a CPU-hungry process)
    dashboard_host: str = "127.0.0.1"  # its bind address; 0.0.0.0 serves other hosts (it asks for the Ray token)
    export_metrics: bool = False  # Ray's Prometheus exporter on every node (plain HTTP, no auth; for monitoring=true)
    monitoring: bool = False  # a Prometheus on the head for the cluster's life (implies export_metrics)
    monitoring_scrape_interval_s: float = 5.0  # its scrape interval
    node_tmp_dir: str = "/tmp"  # node-local dir for Ray's sockets and logs (keep the path short)
    submit_run: bool = True  # slurm: `matrix-hpc run` outside an allocation submits the driver as a job
    wait_run: bool = True  # wait for a submitted run to end and return its exit code

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"cluster.backend={self.backend!r}; valid choices: {', '.join(BACKENDS)}")
        if self.workers < 0:
            raise ValueError(f"cluster.workers={self.workers} must be >= 0")
        if self.head_wait_timeout_s <= 0:
            raise ValueError("cluster.head_wait_timeout_s must be > 0")

    @property
    def cluster_dir(self) -> Path:
        """Where head.json, jobs.json and logs live."""
        if self.dir:
            return Path(self.dir).expanduser().resolve()
        return Path(os.path.expanduser("~/.matrix_hpc/clusters")) / self.name


@dataclass
class LocalClusterConf(ClusterConf):
    backend: str = "local"  # head and workers are processes on this machine (submitit's local executor)


@dataclass
class SlurmClusterConf(ClusterConf):
    backend: str = "slurm"  # head and workers are Slurm jobs (submitit)
    slurm: SlurmConf = field(default_factory=SlurmConf)  # partition, account, qos, ...


def as_cluster_conf(obj: Any) -> ClusterConf:
    """A ``ClusterConf`` from a dataclass, a dict or an OmegaConf node.

    Unknown keys are refused with the list of valid ones, so a typo in a
    yaml file or an override is caught here rather than ignored.
    """
    if isinstance(obj, ClusterConf):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        from omegaconf import OmegaConf

        obj = OmegaConf.to_container(obj, resolve=True)
    data = dict(obj or {})
    cls = SlurmClusterConf if data.get("backend", "local") == "slurm" else LocalClusterConf
    conf: ClusterConf = _build(cls, data, "cluster")
    return conf


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = ", ".join(f"{n}={_default(f)!r}" for n, f in fields.items())
        raise ValueError(f"unknown {where} setting(s) {unknown}; valid settings and defaults: {valid}")
    kwargs = {}
    for name, value in data.items():
        nested = {"head": JobShapeConf, "worker": JobShapeConf, "driver": JobShapeConf, "slurm": SlurmConf}
        if name in nested and isinstance(value, dict):
            value = _build(nested[name], value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value
    return None
