"""The workflow contract: roles, the agents that do each role's step, and the
rule that picks the next role.

A workflow is a class registered under a name; Hydra's ``workflow=<name>``
selects it and its config dataclass. Example::

    from dataclasses import dataclass
    from matrix_hpc.runtime import Workflow, WorkflowConf, register_workflow

    @dataclass
    class EchoConf(WorkflowConf):
        name: str = "echo"

    @register_workflow("echo", EchoConf)
    class Echo(Workflow):
        roles = ("speaker",)

        async def speaker(self, task, ctx):
            task.add_message("speaker", task.input["text"])

        def next_role(self, task, finished_role):
            return None  # done after one step
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from matrix_hpc.runtime.message import FILTERED, TaskState

AgentFn = Callable[[TaskState, "AgentContext"], Awaitable[None]]


@dataclass
class WorkflowConf:
    """Base of every workflow's config; subclasses add their own fields."""

    name: str = "???"  # registered workflow name


class Filtered(Exception):
    """Raise from a step to end the task as ``filtered`` with a reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NonRetryableError(Exception):
    """A step error that retrying cannot fix (the row fails at once)."""

    retryable = False


class AgentContext:
    """Per-process resources handed to every agent step.

    ``services`` holds lazily built clients (LLM client, sandbox pool), one
    per process, created by the worker from plain picklable factories.
    """

    def __init__(self, seed: int, services: dict[str, Any] | None = None) -> None:
        self.seed = seed
        self.services: dict[str, Any] = services or {}

    def rng(self, task: TaskState) -> random.Random:
        """A generator seeded by (run seed, task id, step number): the same in
        every placement, so placements produce identical rows."""
        key = f"{self.seed}:{task.id}:{task.hops}".encode()
        return random.Random(zlib.crc32(key) | (len(key) << 32))

    @property
    def llm(self) -> Any:  # Any: LLMClient, built lazily by the worker's service factory
        return self._service("llm")

    @property
    def sandboxes(self) -> Any:  # Any: sandbox pool client
        return self._service("sandbox")

    def _service(self, name: str) -> Any:
        try:
            return self.services[name]
        except KeyError:
            raise RuntimeError(
                f"this workflow needs the '{name}' service but the run has none; "
                f"set {name}=... on the command line"
            ) from None


class Workflow:
    """Base class. Subclasses set ``roles`` and define one async method per role."""

    roles: ClassVar[tuple[str, ...]] = ()
    uses_llm: ClassVar[bool] = False
    uses_sandbox: ClassVar[bool] = False

    def __init__(self, conf: WorkflowConf) -> None:
        self.conf = conf

    @property
    def first_role(self) -> str:
        return self.roles[0]

    def agent(self, role: str) -> AgentFn:
        fn = getattr(self, role, None)
        if fn is None:
            raise TypeError(f"workflow {type(self).__name__} declares role {role!r} but has no method for it")
        return fn  # type: ignore[no-any-return]

    def next_role(self, task: TaskState, finished_role: str) -> str | None:
        """The role to run after ``finished_role``; None ends the task as ok."""
        i = self.roles.index(finished_role)
        return self.roles[i + 1] if i + 1 < len(self.roles) else None

    def validate_input(self, row: dict[str, Any]) -> None:
        """Raise ValueError naming what is wrong with an input row."""

    def result_columns(self) -> dict[str, Any]:
        """Typed output columns (name -> pyarrow type) taken from ``task.result``."""
        return {}


_REGISTRY: dict[str, tuple[type[Workflow], type[WorkflowConf]]] = {}


def register_workflow(name: str, conf_cls: type[WorkflowConf]) -> Callable[[type[Workflow]], type[Workflow]]:
    def wrap(cls: type[Workflow]) -> type[Workflow]:
        _REGISTRY[name] = (cls, conf_cls)
        return cls

    return wrap


def workflow_names() -> list[str]:
    _import_builtin_workflows()
    return sorted(_REGISTRY)


def build_workflow(conf: WorkflowConf) -> Workflow:
    if conf.name not in _REGISTRY:  # its conf's module registers it (a worker process imports that one only)
        import importlib

        importlib.import_module(type(conf).__module__)
    if conf.name not in _REGISTRY:  # registered elsewhere: every module that may (MATRIX_HPC_WORKFLOWS included)
        _import_builtin_workflows()
    if conf.name not in _REGISTRY:
        raise ValueError(f"unknown workflow {conf.name!r}; valid choices: {', '.join(sorted(_REGISTRY))}")
    cls, _ = _REGISTRY[conf.name]
    return cls(conf)


def workflow_conf_classes(only: str | None = None) -> dict[str, type[WorkflowConf]]:
    """Every registered workflow's Conf; with ``only`` (a built-in workflow's name)
    just that one, importing no other built-in workflow (a run's config check:
    the five built-ins take 0.15 s to import and register, tau2's the most)."""
    if only in BUILTIN_WORKFLOWS:
        _import_builtin_workflows([BUILTIN_WORKFLOWS[only]])
        if only in _REGISTRY:
            return {only: _REGISTRY[only][1]}
    _import_builtin_workflows()
    return {name: conf for name, (_, conf) in _REGISTRY.items()}


def _import_builtin_workflows(modules: list[str] | None = None) -> None:
    """The built-in workflows (or just ``modules`` of them), plus the user's
    modules named in ``MATRIX_HPC_WORKFLOWS`` (comma-separated, importable)."""
    import importlib
    import os

    user = [m.strip() for m in os.environ.get("MATRIX_HPC_WORKFLOWS", "").split(",") if m.strip()]
    for module in user:
        importlib.import_module(module)
    for module in BUILTIN_WORKFLOWS.values() if modules is None else modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a workflow whose optional deps are missing
            if e.name == module or not (e.name or "").startswith("matrix_hpc"):
                continue
            raise


#: The built-in workflows: name -> the module that registers it (a unit test checks each pair).
BUILTIN_WORKFLOWS = {
    "overhead": "matrix_hpc.workflows.overhead",
    "generate": "matrix_hpc.workflows.generate",
    "coral": "matrix_hpc.workflows.coral",
    "natural_reasoning": "matrix_hpc.workflows.natural_reasoning",
    "tau2": "matrix_hpc.workflows.tau2.workflow",
}

__all__ = ["AgentContext", "Filtered", "FILTERED", "NonRetryableError", "Workflow", "WorkflowConf",
           "register_workflow", "build_workflow", "workflow_names"]
