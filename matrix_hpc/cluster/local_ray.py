"""The one way a process starts a Ray of its own on this machine (a run, `curate
decontaminate`, the tests' shared Ray): private token, loopback address, this
checkout on the workers' path, and only the Ray processes a run uses.

Multi-node clusters are started by ``ray start`` (cluster/ray_node.py) and do
not pass here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from matrix_hpc.cluster.auth import private_local_token
from matrix_hpc.cluster.monitoring import loopback_local_ray

log = logging.getLogger(__name__)

#: Ray settings for every Ray matrix_hpc starts (this module's local one, and the
#: head of `cluster up`, whose GCS hands them to every node and driver).
#: ``max_direct_call_object_size``: an actor call's arguments above this size go
#: through the node's shared-memory object store (the raylet serves it) instead of
#: the call itself. Ray's default is 100 KiB; the runtime's batches of tasks with
#: their histories are often larger (per role: ~10 tasks of ~10 KB a hop). At 4 MiB
#: they travel in the call: the overhead workload per role, 2,000 tasks at 1,000 in
#: flight, 1,048-1,314 against 860-926 tasks/s, 1.39-1.74 against 2.01-2.04 ms of
#: CPU a task (docs/performance.md). Ray keeps a call's total inlined arguments
#: under ``task_rpc_inlined_bytes_limit`` (10 MiB) whatever this says.
RUNTIME_SYSTEM_CONFIG: dict[str, int] = {"max_direct_call_object_size": 4 * 2**20}


#: Ray settings for a local Ray only. ``num_workers_soft_limit``: Ray keeps up to one idle
#: worker process per CPU in its pool (it prestarts them for the first driver); each costs
#: about 1% of a core while idle (Ray wakes every worker's main thread every 10 ms). A
#: run's actors take their processes at start-up; with a limit of 0 the ones left idle
#: exit after a second (``idle_worker_killing_time_threshold_ms``) and a later actor starts
#: a fresh one. Measured idle, one actor on 2 CPUs: 51 against 37 ms of CPU a second for
#: the whole Ray (docs/performance.md, "One process fewer").
#: ``raylet_client_connect_timeout_milliseconds``: a connection to a local socket of Ray's
#: (the raylet's to its object store, a worker's to its raylet) that finds the socket not
#: yet listening sleeps this long before its next try; by default 1 s, 10 tries. The
#: raylet starts its object store in a thread and connects to it at once, so about one
#: start in three waited a whole second there. 50 ms and 200 tries give up at the same 10 s.
LOCAL_SYSTEM_CONFIG: dict[str, int] = {"num_workers_soft_limit": 0, "raylet_client_connect_timeout_milliseconds": 50,
                                       "raylet_client_num_connect_attempts": 200}

#: Ray's log monitor (which forwards the workers' output to the driver) lists the log
#: directory every 0.1 s while it has under ``RAY_LOG_MONITOR_MANY_FILES_THRESHOLD``
#: files, about 1% of a core here. With a threshold of 0 it lists it every
#: ``LOG_NAME_UPDATE_INTERVAL_S``: a new worker's first lines reach the driver up to a
#: second later; lines of files it already follows still come within 0.1 s.
LOG_MONITOR_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "1.0"}


def start_local_ray(num_cpus: int | None, *, namespace: str | None = None, log_to_driver: bool = True,
                    metrics_interval_s: float | None = None) -> None:
    """``ray.init`` of a fresh local Ray. ``metrics_interval_s``: this Ray is scraped
    (``monitoring=true``), its processes report metrics at that interval; None:
    nothing scrapes it, so Ray collects no metrics and starts lean (see ``lean_ray_start``)."""
    import ray

    private_local_token()  # Ray would write its default token file world-readable
    system_config: dict[str, Any] = dict(RUNTIME_SYSTEM_CONFIG)
    if metrics_interval_s is not None:  # Ray sends its processes' metrics to its agent every 10 s by default
        system_config["metrics_report_interval_ms"] = int(metrics_interval_s * 1000)
    else:  # nothing scrapes this Ray: no unauthenticated exporter, no metrics reports from every process
        system_config["enable_metrics_collection"] = False
    system_config.update(LOCAL_SYSTEM_CONFIG)
    lean = lean_ray_start() if metrics_interval_s is None else contextlib.nullcontext()
    # loopback_local_ray: the metrics endpoint on 127.0.0.1, not on every interface
    with loopback_local_ray(), inherited_pythonpath(), quiet_log_monitor(), lean:
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=namespace,
                 logging_level=logging.WARNING, log_to_driver=log_to_driver, _system_config=system_config)


@contextlib.contextmanager
def quiet_log_monitor() -> Iterator[None]:
    """``LOG_MONITOR_ENV`` while ``ray.init`` starts the log monitor (it reads them at
    its start); variables the user set are left as they are."""
    added = {k: v for k, v in LOG_MONITOR_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def inherited_pythonpath() -> Iterator[None]:
    """The driver's ``sys.path`` as ``PYTHONPATH`` while ``ray.init`` starts the local Ray: its
    raylet, and the workers it starts, inherit it (they import matrix_hpc, and a test's
    workflows, from where the driver does). A ``runtime_env`` with the same variable costs
    start-up: Ray's prestarted workers do not match it, so every actor waited for a fresh
    worker process (measured: docs/performance.md, "Start-up"). Restored afterwards: the
    driver's own children (vLLM under its own interpreter) must not get it."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


#: ``ray.init`` waits for its raylet to register with the GCS through a call that, when
#: the raylet is not there yet, sleeps a whole second before asking again (Ray 2.60's
#: ``GlobalStateAccessor::GetNode``). The raylet registers once its agents are up,
#: about a second after it starts, so ``ray.init`` took either ~2.3 or ~3.3 s here, at
#: random. Asked every ``NODE_REGISTER_POLL_S`` first, Ray's call finds it at once.
NODE_REGISTER_POLL_S = 0.02
NODE_REGISTER_WAIT_S = 30.0


@contextlib.contextmanager
def lean_ray_start() -> Iterator[None]:
    """Around the ``ray.init`` of a local Ray that nothing monitors: three of the
    processes Ray 2.60 starts are skipped or slimmed, because ``ray.init`` waits for
    them or they compete with it for CPU, and a run uses none of them.

    - The dashboard head. With ``include_dashboard=False`` Ray still starts one, with
      only its usage-stats module, and ``ray.init`` polls until it has published a
      URL (about 1.4 s on two quiet cores). Without it Ray reports no usage stats.
    - The raylet's dashboard agent runs in its minimal mode, the mode Ray itself
      uses when installed without ``[default]``: the raylet waits for the agent to
      register, and the full agent first imports every dashboard module (metrics
      export, which this Ray has switched off; the job and log APIs, which nothing
      here calls). Even the minimal agent imports them all to pick its own, and
      the raylet waits for that too: the agent runs through ``cluster/ray_agent.py``,
      Ray's agent with no modules (``ray.init`` 3.46 to 3.07 s, median of 8).
    - The autoscaler's monitor (``monitor.py``, what ``ray start --no-monitor``
      leaves out): a one-node Ray started for one process has nothing to scale,
      and the monitor's start took 0.7 s of CPU on the two cores Ray's own start
      competes for, then 5 ms of CPU every second. ``ray status`` has no report
      for such a Ray.

    Measured (docs/performance.md, "Start-up"): ``ray.init`` 4.1-5.5 s before, 2.9-3.1 s
    after, at load 1.0-1.7. ``ray.init`` has no option for any of the three
    (``include_dashboard=False`` and ``enable_metrics_collection=False`` leave the first
    two; ``no_monitor`` is only ``ray start``'s), so three of its private functions (the
    third builds the agent's command) and one method are replaced for the call only. A
    fourth function, ``services.get_node``, first polls the node table (see
    ``NODE_REGISTER_POLL_S``): ``ray.init`` no longer waits a whole second for its raylet.
    Ray is pinned below 2.61 in pyproject.toml; if any is not where this expects it,
    nothing is replaced and Ray starts as it would (logged)."""
    import ray._private.node as node  # private: see above
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    import ray._private.state as state
    import ray._private.utils as utils

    api_server = getattr(services, "start_api_server", None)
    dependency_error = getattr(utils, "get_dashboard_dependency_error", None)
    start_monitor = getattr(node.Node, "start_monitor", None)
    python_command = getattr(services, "_build_python_executable_command_memory_profileable", None)
    agent_type = getattr(ray_constants, "PROCESS_TYPE_DASHBOARD_AGENT", None)
    get_node = getattr(services, "get_node", None)
    gcs_options = getattr(services, "_get_gcs_client_options", None)
    if api_server is None or dependency_error is None or start_monitor is None or python_command is None \
            or agent_type is None or get_node is None or gcs_options is None:
        log.info("Ray's start is not slimmed: this Ray has no start_api_server, get_dashboard_dependency_error, "
                 "Node.start_monitor, _build_python_executable_command_memory_profileable, get_node or "
                 "_get_gcs_client_options")
        yield
        return

    def no_api_server(*args: Any, **kwargs: Any) -> tuple[str, None]:
        return "", None  # (dashboard URL, process): the URL Ray reports when its dashboard is off, no process

    def minimal_agent() -> ImportError:
        return ImportError("matrix_hpc: the dashboard agent's minimal mode (a local Ray nothing monitors)")

    def no_monitor(self: Any) -> None:
        return None  # as RayParams(no_monitor=True), which ray.init does not pass through

    def agent_without_modules(process_type: str, session_dir: str, *args: Any, **kwargs: Any) -> list[str]:
        command: list[str] = python_command(process_type, session_dir, *args, **kwargs)
        if process_type == agent_type:  # the agent's script path follows: ray_agent runs it
            command = [*command, "-m", "matrix_hpc.cluster.ray_agent"]
        return command

    def get_node_once_registered(gcs_address: str, node_id: str) -> Any:
        global_state = state.GlobalState()
        global_state._initialize_global_state(gcs_options(gcs_address))
        deadline = time.monotonic() + NODE_REGISTER_WAIT_S
        while time.monotonic() < deadline:  # then Ray's own wait, and its error, as before
            if any(n.get("NodeID") == node_id and n.get("Alive") for n in global_state.node_table()):
                break
            time.sleep(NODE_REGISTER_POLL_S)
        return get_node(gcs_address, node_id)

    services.start_api_server = no_api_server
    services.get_node = get_node_once_registered
    utils.get_dashboard_dependency_error = minimal_agent
    node.Node.start_monitor = no_monitor  # type: ignore[method-assign]
    services._build_python_executable_command_memory_profileable = agent_without_modules  # type: ignore[assignment]
    try:
        yield
    finally:
        services.start_api_server = api_server
        services.get_node = get_node
        utils.get_dashboard_dependency_error = dependency_error
        node.Node.start_monitor = start_monitor  # type: ignore[method-assign]
        services._build_python_executable_command_memory_profileable = python_command
