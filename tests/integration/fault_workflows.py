"""Workflows for the fault suite, registered when imported; runs name them
with ``MATRIX_HPC_WORKFLOWS=tests.integration.fault_workflows``:

- ``workflow=mistyped``: a bug: its ``label`` result column is declared
  ``pa.string()`` but every third row puts an int there;
- ``workflow=evolving``: a config that gains a key in its "release 2"
  (``MATRIX_TEST_EVOLVING_RELEASE=2``), for the resume check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.workflow import AgentContext, Workflow, WorkflowConf, register_workflow

MODULE = "tests.integration.fault_workflows"


def is_mistyped(task_id: str) -> bool:
    """The rows whose label is an int (ids ending in a multiple of 3)."""
    return int(task_id[1:]) % 3 == 0


@dataclass
class MistypedConf(WorkflowConf):
    name: str = "mistyped"


@register_workflow("mistyped", MistypedConf)
class Mistyped(Workflow):
    roles = ("label",)

    async def label(self, task: TaskState, ctx: AgentContext) -> None:
        task.result["label"] = 42 if is_mistyped(task.id) else f"label of {task.id}"

    def result_columns(self) -> dict[str, Any]:
        return {"label": pa.string()}


#: Set to "2" to get release 2 of the ``evolving`` workflow, which adds a key.
EVOLVING_RELEASE_ENV = "MATRIX_TEST_EVOLVING_RELEASE"


@dataclass
class EvolvingConf(WorkflowConf):
    """Release 1 of a workflow's config."""

    name: str = "evolving"
    greeting: str = "hello"  # text of the one message


@dataclass
class EvolvingConf2(EvolvingConf):
    """Release 2: a new key, whose default keeps release 1's behaviour."""

    shout: bool = False  # upper-case the greeting


class Evolving(Workflow):
    roles = ("greet",)

    async def greet(self, task: TaskState, ctx: AgentContext) -> None:
        text = f"{self.conf.greeting} {task.id}"  # type: ignore[attr-defined]
        task.add_message("greet", text.upper() if getattr(self.conf, "shout", False) else text)


register_workflow("evolving", EvolvingConf2 if os.environ.get(EVOLVING_RELEASE_ENV) == "2" else EvolvingConf)(Evolving)
