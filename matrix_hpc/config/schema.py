"""Typed config schemas, registered in Hydra's ConfigStore.

Each component owns its dataclass (next to its code); this module assembles
the top-level ``MatrixConf`` and registers every group's schema so that
unknown keys and bad values are refused at composition time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from matrix_hpc.store.input import DatasetConf


class Placement(Enum):
    colocated = "colocated"  # all roles in each worker process: a hop is an in-process call
    per_role = "per_role"  # each role on its own Ray actors: a hop is a batched Ray call


class ResumeMode(Enum):
    auto = "auto"  # resume when the output dir has rows; refuse a different workflow config
    force = "force"  # resume even if the workflow config changed


#: Values of ``run.retry``.
RETRY_CHOICES = ("none", "failed")


@dataclass
class RunConf:
    max_concurrent_tasks: int = 1000  # tasks in flight; a credit returns when the row is committed
    max_attempts: int = 3  # executions of one step before its task fails
    backoff_base_s: float = 0.5  # first retry delay of a failed step (doubles each retry)
    backoff_max_s: float = 30.0  # longest retry delay
    seed: int = 0  # seeds every task's random generator (same rows in every placement)
    resume: ResumeMode = ResumeMode.auto  # see ResumeMode
    placement: Placement = Placement.colocated  # where roles run
    num_workers: int = 1  # colocated: worker processes, each hosting every role
    role_workers: dict[str, int] = field(default_factory=dict)  # per_role: instances of a role (default 1)
    # Spread worker actors over the cluster's nodes (Ray's SPREAD, best effort);
    # false leaves it to Ray, which packs CPU-less actors onto the driver's node.
    spread_workers: bool = True
    batch_size: int = 256  # messages per cross-process call
    batch_delay_ms: float = 2.0  # longest wait before a partial batch is sent
    progress_interval_s: float = 5.0  # live progress line period; 0 turns it off
    drain_timeout_s: float = 30.0  # on SIGTERM/SIGUSR1: wait this long for in-flight tasks, then stop
    task_timeout_s: float = 3600.0  # re-admit a task not committed after this long (0: never); a late copy is dropped
    num_cpus: int | None = None  # CPUs of the local Ray (default: all)
    summary: bool = True  # print the one-screen summary at the end
    retry: str = "none"  # none | failed: failed: ids whose row is `failed` run again (the new row supersedes it)
    verify_rounds: int = 2  # after the last commit: re-admit ids missing from the output at most this many times
    peer_check_interval_s: float = 2.0  # how often the driver checks workers and sinks for restarts and lost sends
    commit_stall_timeout_s: float = 600.0  # a sink whose every commit fails this long stops the run (exit 3); 0: never

    def __post_init__(self) -> None:
        if self.max_concurrent_tasks < 1:
            raise ValueError("run.max_concurrent_tasks must be >= 1")
        if self.retry not in RETRY_CHOICES:
            raise ValueError(f"run.retry={self.retry!r}; valid choices: {', '.join(RETRY_CHOICES)} "
                             "(failed: re-run the ids whose row is `failed`)")
        if self.verify_rounds < 0:
            raise ValueError(f"run.verify_rounds={self.verify_rounds} must be >= 0 "
                             "(0: report missing ids, re-admit none)")
        if self.peer_check_interval_s <= 0:
            raise ValueError(f"run.peer_check_interval_s={self.peer_check_interval_s} must be > 0")
        if self.max_attempts < 1:
            raise ValueError("run.max_attempts must be >= 1")
        if self.num_workers < 1:
            raise ValueError("run.num_workers must be >= 1")


@dataclass
class OutputConf:
    dir: str = "???"  # output directory (created; rerun the same command to resume)
    num_shards: int = 4  # shards by hash of task id (shard=NNNNN directories)
    num_sinks: int = 2  # sink actors writing the shards (each owns num_shards / num_sinks)
    flush_interval_s: float = 0.2  # how often buffered rows are committed (credits wait for it)
    max_buffered_rows: int = 20000  # commit early at this many rows (or half the concurrency per sink)
    compact_min_files: int = 64  # merge a shard's small files once it has this many
    compression: str = "zstd"  # Parquet compression codec
    keep: str = "all"  # all | ok: with ok, filtered/failed rows go to _rejected/ (still counted)
    commit_retry_max_s: float = 30.0  # a failed commit is retried after flush_interval_s, doubling up to this

    def __post_init__(self) -> None:
        if self.num_sinks > self.num_shards:
            raise ValueError(f"output.num_sinks={self.num_sinks} > output.num_shards={self.num_shards}: "
                             "a sink owns whole shards; lower num_sinks or raise num_shards")
        if self.keep not in ("all", "ok"):
            raise ValueError(f"output.keep={self.keep!r}; valid choices: all, ok")
        if self.commit_retry_max_s <= 0:
            raise ValueError(f"output.commit_retry_max_s={self.commit_retry_max_s}: must be > 0 (seconds)")


@dataclass
class NoneConf:
    backend: str = "none"  # no service of this kind


@dataclass
class DisabledConf:
    backend: str = "disabled"  # no service of this kind


@dataclass
class LocalClusterConf:
    backend: str = "local"  # Ray starts in-process on this machine


@dataclass
class MatrixConf:
    cluster: Any = None  # Any: the selected cluster backend's Conf (group 'cluster')
    llm: Any = None  # Any: the selected LLM backend's Conf (group 'llm')
    sandbox: Any = None  # Any: the selected sandbox backend's Conf (group 'sandbox')
    workflow: Any = None  # Any: the selected workflow's Conf (group 'workflow')
    dataset: DatasetConf = field(default_factory=DatasetConf)
    output: OutputConf = field(default_factory=OutputConf)
    run: RunConf = field(default_factory=RunConf)


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from matrix_hpc.runtime.workflow import workflow_conf_classes

    cs = ConfigStore.instance()
    cs.store(name="matrix_schema", node=MatrixConf)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConf)
    cs.store(group="output", name="output_schema", node=OutputConf)
    cs.store(group="run", name="run_schema", node=RunConf)
    cs.store(group="llm", name="none_schema", node=NoneConf)
    cs.store(group="sandbox", name="disabled_schema", node=DisabledConf)
    cs.store(group="cluster", name="local_schema", node=LocalClusterConf)
    for name, conf_cls in workflow_conf_classes().items():
        cs.store(group="workflow", name=f"{name}_schema", node=conf_cls)
    for group, name, node in _component_schemas():
        cs.store(group=group, name=name, node=node)


def _component_schemas() -> list[tuple[str, str, Any]]:
    """Schemas of optional components (LLM, sandbox, cluster backends), when present."""
    import importlib

    found: list[tuple[str, str, Any]] = []
    for group, name, module, attr in COMPONENT_SCHEMAS:
        try:
            node = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        found.append((group, name, node))
    return found


#: (group, schema name, module, dataclass) of components that live beside their code.
COMPONENT_SCHEMAS: list[tuple[str, str, str, str]] = [
    ("llm", "llm_schema", "matrix_hpc.services.llm.config", "LLMConf"),
    ("sandbox", "sandbox_schema", "matrix_hpc.services.sandbox", "SandboxConf"),
    ("cluster", "slurm_schema", "matrix_hpc.cluster.config", "SlurmClusterConf"),
    ("cluster", "local_schema", "matrix_hpc.cluster.config", "LocalClusterConf"),  # replaces the minimal one
]
