"""Typed config schemas, registered in Hydra's ConfigStore.

Each component owns its dataclass (next to its code); this module assembles
the top-level ``MatrixConf`` and registers every group's schema so that
unknown keys and bad values are refused at composition time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matrix_hpc.cluster.monitoring import PrometheusConf
from matrix_hpc.runtime.conf import RETRY_CHOICES, Placement, ResumeMode, RunConf
from matrix_hpc.store.conf import OutputConf
from matrix_hpc.store.input import DatasetConf

__all__ = ["RETRY_CHOICES", "DatasetConf", "MatrixConf", "OutputConf", "Placement", "ResumeMode", "RunConf",
           "register_configs"]


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
    monitoring: bool = False  # start a Prometheus server for this run (docs/monitoring.md)
    prometheus: PrometheusConf = field(default_factory=PrometheusConf)  # its settings


def register_configs(workflow: str | None = None) -> None:
    """Register every schema in Hydra's ConfigStore (idempotent). With
    ``workflow`` (a built-in workflow's name), of the workflows only its schema."""
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
    for name, conf_cls in workflow_conf_classes(workflow).items():
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
