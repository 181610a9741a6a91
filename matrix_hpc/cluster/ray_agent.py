"""The raylet's dashboard agent for a local Ray that nothing monitors: Ray's own
agent (``ray/dashboard/agent.py``, in its minimal mode), with no dashboard modules.

Started by the raylet in place of ``python -u ray/dashboard/agent.py ARGS`` as
``python -u -m matrix_hpc.cluster.ray_agent ray/dashboard/agent.py ARGS`` (see
``local_ray.lean_ray_start``). The raylet reports itself ready only once its agent
has written its listen port, which Ray's agent does after importing every
dashboard module to find its own (0.7 s of the agent's 1.6 s on two cores, on
``ray.init``'s critical path). A local Ray that nothing monitors uses none of them:
metrics export is off, there is no dashboard for the event and log modules to
report to, and nothing submits Ray jobs. Everything else is Ray's agent as is.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    import ray.dashboard.utils as dashboard_utils  # private to Ray: pinned below 2.61 (pyproject.toml)

    dashboard_utils.get_all_modules = lambda module_type: []
    agent_path, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(agent_path, run_name="__main__")


if __name__ == "__main__":
    main()
