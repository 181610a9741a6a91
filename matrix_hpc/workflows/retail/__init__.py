"""tau2-bench retail environment: tools, database, tasks, reward and tool server.

The dialogue workflow (``workflow=retail_tool_use``) builds on these pieces::

    from matrix_hpc.workflows.retail import RetailEnv, RetailSnapshot, load_tasks, GoldHashCache, compute_reward

``tool_server`` (the sandboxed process and its async client) is imported on demand.
"""

from matrix_hpc.workflows.retail.db import RetailDB, RetailSnapshot, db_hash, default_data_dir
from matrix_hpc.workflows.retail.env import RetailEnv, ToolOutcome, is_write_tool, tool_schemas
from matrix_hpc.workflows.retail.reward import (
    CommunicateCheck,
    GoldHashCache,
    GoldState,
    RewardInfo,
    communicate_checks,
    compute_reward,
    evaluate_env,
    replay_gold,
)
from matrix_hpc.workflows.retail.tasks import (
    GoldAction,
    RetailTask,
    RetailTasksConf,
    UserInstructions,
    iter_task_rows,
    load_policy,
    load_tasks,
    task_to_row,
)
from matrix_hpc.workflows.retail.tools import TOOL_SPECS, ToolError

__all__ = [
    "TOOL_SPECS", "CommunicateCheck", "GoldAction", "GoldHashCache", "GoldState", "RetailDB", "RetailEnv",
    "RetailSnapshot", "RetailTask", "RetailTasksConf", "RewardInfo", "ToolError", "ToolOutcome",
    "UserInstructions", "communicate_checks", "compute_reward", "db_hash", "default_data_dir", "evaluate_env",
    "is_write_tool", "iter_task_rows", "load_policy", "load_tasks", "replay_gold", "task_to_row", "tool_schemas",
]
