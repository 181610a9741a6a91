"""The agent runtime: task messages, workflows and agents, placement, admission."""

from matrix_hpc.runtime.message import FAILED, FILTERED, OK, TaskState
from matrix_hpc.runtime.workflow import (
    AgentContext,
    Filtered,
    NonRetryableError,
    Workflow,
    WorkflowConf,
    build_workflow,
    register_workflow,
)

__all__ = ["AgentContext", "FAILED", "FILTERED", "Filtered", "NonRetryableError", "OK", "TaskState",
           "Workflow", "WorkflowConf", "build_workflow", "register_workflow"]
