"""`matrix-hpc cluster up|status|down`: the Python API behind the command.

    >>> from matrix_hpc.cluster import SlurmClusterConf, cluster_up, cluster_status, cluster_down
    >>> conf = SlurmClusterConf(name="demo", workers=2)
    >>> cluster_up(conf)              # head job + 2 worker jobs; returns once they joined
    >>> print(cluster_status(conf))   # jobs, Ray nodes and resources, services
    >>> cluster_down(conf)            # scancel everything `up` started

``up`` again adds ``workers`` more worker jobs to the running head.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from matrix_hpc.cluster.auth import create_token, ensure_private_dir, use_cluster_token
from matrix_hpc.cluster.cluster_monitor import server_url
from matrix_hpc.cluster.config import ClusterConf, JobShapeConf, as_cluster_conf
from matrix_hpc.cluster.errors import ClusterError, JobFailedError
from matrix_hpc.cluster.local import LocalBackend
from matrix_hpc.cluster.ray_node import NodeSpec, RayHead, RayWorker, port_available
from matrix_hpc.cluster.slurm import ACTIVE_STATES, SlurmBackend
from matrix_hpc.cluster.state import ClusterState, HeadInfo, JobRecord
from matrix_hpc.procs import find_by_marker, kill_by_marker, tail_text

log = logging.getLogger(__name__)

Backend = LocalBackend | SlurmBackend


def backend_of(conf: ClusterConf) -> Backend:
    return SlurmBackend() if conf.backend == "slurm" else LocalBackend()


def make_executor(conf: ClusterConf, shape: JobShapeConf, job_name: str, tasks_per_node: int = 1) -> Any:
    """A submitit executor for one kind of job (Any: submitit's Executor, imported lazily)."""
    import submitit

    state = ClusterState(conf.cluster_dir)
    slurm = getattr(conf, "slurm", None)
    ctor = {"slurm_max_num_timeout": slurm.max_num_timeout} if slurm is not None else {}
    executor = submitit.AutoExecutor(folder=str(state.log_folder()), cluster=backend_of(conf).executor_cluster(),
                                     **ctor)
    params: dict[str, Any] = dict(name=job_name, timeout_min=shape.time_min, nodes=shape.nodes,
                                  tasks_per_node=tasks_per_node, cpus_per_task=shape.cpus_per_task,
                                  mem_gb=shape.mem_gb)
    if shape.gpus_per_node:
        params["gpus_per_node"] = shape.gpus_per_node
    if slurm is not None:
        params.update(slurm_partition=slurm.partition, slurm_account=slurm.account, slurm_qos=slurm.qos,
                      slurm_constraint=slurm.constraint, slurm_signal_delay_s=slurm.signal_delay_s,
                      slurm_setup=list(slurm.setup), slurm_additional_parameters=dict(slurm.additional_parameters))
        if slurm.exclusive:
            params["slurm_exclusive"] = True
        params = {k: v for k, v in params.items() if v is not None}
    executor.update_parameters(**params)
    return executor


def _spec(conf: ClusterConf, role: str, shape: JobShapeConf) -> NodeSpec:
    resources: dict[str, float] = {}
    if role == "worker":
        partition = getattr(getattr(conf, "slurm", None), "partition", None) or conf.backend
        resources = {f"partition:{partition}": 1.0, **conf.worker_resources}
    return NodeSpec(role=role, num_cpus=shape.cpus_per_task, num_gpus=shape.gpus_per_node, resources=resources,
                    include_dashboard=conf.include_dashboard and role == "head", dashboard_host=conf.dashboard_host,
                    tmp_root=conf.node_tmp_dir, export_metrics=conf.export_metrics or conf.monitoring,
                    monitoring=conf.monitoring and role == "head",
                    monitoring_scrape_interval_s=conf.monitoring_scrape_interval_s)


def _record(job: Any, role: str, conf: ClusterConf) -> JobRecord:
    return JobRecord(job_id=str(job.job_id), role=role, backend=conf.backend, log_dir=str(job.paths.folder))


@dataclass
class JobStatus:
    job_id: str  # Slurm job id or local pid
    role: str  # head | worker | driver
    state: str  # Slurm state (RUNNING, PENDING, ...) or FINISHED
    stdout: str  # log paths
    stderr: str


@dataclass
class ClusterStatus:
    name: str  # the cluster's name
    backend: str  # local | slurm
    cluster_dir: str  # where its files live
    head: HeadInfo | None  # None: no head running
    jobs: list[JobStatus] = field(default_factory=list)  # what `up` started
    nodes: list[dict[str, Any]] = field(default_factory=list)  # Ray nodes (host, alive, resources)
    total: dict[str, float] = field(default_factory=dict)  # Ray cluster resources
    available: dict[str, float] = field(default_factory=dict)  # not in use right now
    services: list[str] = field(default_factory=list)  # named Ray actors, namespace/name
    ray_error: str = ""  # why Ray could not be asked, if it could not
    prometheus: str = ""  # the cluster's Prometheus (cluster.monitoring=true), on the head's loopback

    @property
    def active_jobs(self) -> list[JobStatus]:
        return [j for j in self.jobs if j.state in ACTIVE_STATES]

    def __str__(self) -> str:
        lines = [f"cluster {self.name!r} ({self.backend}) at {self.cluster_dir}",
                 f"head: {self.head.address + ' on ' + self.head.hostname if self.head else 'not running'}",
                 "jobs:" if self.jobs else "jobs: none"]
        lines += [f"  {j.job_id:<14} {j.role:<7} {j.state:<11} {j.stdout}" for j in self.jobs]
        if self.nodes:
            lines.append(f"ray nodes: {sum(n['alive'] for n in self.nodes)} alive")
            for n in self.nodes:
                res = {k: v for k, v in n["resources"].items() if not k.startswith(("node:", "memory", "object"))}
                lines.append(f"  {n['host']:<16} {'alive' if n['alive'] else 'dead ':<6} {res}")
            lines.append(f"resources: total {_short(self.total)}; available {_short(self.available)}")
            lines.append(f"services: {', '.join(self.services) or 'none'}")
        if self.prometheus:
            lines.append(f"prometheus: {self.prometheus} (on the head node; docs/monitoring.md)")
        elif self.ray_error:
            lines.append(f"ray: {self.ray_error}")
        return "\n".join(lines)


def _short(res: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in res.items() if not k.startswith(("node:", "memory", "object"))}


def cluster_up(conf: Any) -> ClusterStatus:
    """Start the head (unless one runs) and ``conf.workers`` worker jobs;
    return once the head answers and the new workers have joined."""
    conf = as_cluster_conf(conf)
    state, backend = ClusterState(conf.cluster_dir), backend_of(conf)
    with state.locked():
        head_job = _live_head(conf, state, backend)
        if head_job is None:
            head_job = _submit_head(conf, state)
        head = _wait_head(conf, state, backend, head_job)
        workers = _submit_workers(conf, state)
        _wait_workers(conf, state, backend, workers)
    log.info("cluster %s up: head %s, %d worker job(s) added", conf.name, head.address, len(workers))
    return cluster_status(conf, ask_ray=False)


def _live_head(conf: ClusterConf, state: ClusterState, backend: Backend) -> JobRecord | None:
    heads = [j for j in state.jobs() if j.role == "head"]
    if not heads:
        return None
    last = heads[-1]
    if backend.states([last.job_id])[last.job_id] in ACTIVE_STATES:
        return last
    state.head_file.unlink(missing_ok=True)  # a stale address from a head that is gone
    return None


def _submit_head(conf: ClusterConf, state: ClusterState) -> JobRecord:
    state.head_file.unlink(missing_ok=True)
    create_token(state.token_file)  # before any node starts: each reads it through RAY_AUTH_TOKEN_PATH
    executor = make_executor(conf, conf.head, f"matrix-head-{conf.name}")
    executor.update_parameters(nodes=1)
    with backend_of(conf).submitting(state.root / "logs" / "submit.log"):
        job = executor.submit(RayHead(str(conf.cluster_dir), _spec(conf, "head", conf.head)))
    record = _record(job, "head", conf)
    state.add_jobs([record])
    log.info("submitted head job %s (logs %s)", record.job_id, record.log_dir)
    return record


def _submit_workers(conf: ClusterConf, state: ClusterState) -> list[JobRecord]:
    if conf.workers == 0:
        return []
    shape = conf.worker if conf.backend == "slurm" else JobShapeConf(**{**conf.worker.__dict__, "nodes": 1})
    executor = make_executor(conf, shape, f"matrix-worker-{conf.name}")
    worker = RayWorker(str(conf.cluster_dir), _spec(conf, "worker", shape), conf.head_wait_timeout_s)
    with backend_of(conf).submitting(state.root / "logs" / "submit.log"), executor.batch():  # a job array on Slurm
        jobs = [executor.submit(worker) for _ in range(conf.workers)]
    records = [_record(j, "worker", conf) for j in jobs]
    state.add_jobs(records)
    log.info("submitted worker job(s) %s", ", ".join(r.job_id for r in records))
    return records


def _wait_head(conf: ClusterConf, state: ClusterState, backend: Backend, job: JobRecord) -> HeadInfo:
    deadline = time.time() + conf.head_wait_timeout_s
    while True:
        head = state.head()
        if head is not None and head.job_id == job.job_id and port_available(head.node_ip, head.gcs_port):
            return head
        job_state = backend.states([job.job_id])[job.job_id]
        if job_state not in ACTIVE_STATES:
            raise _job_error("the Ray head job ended before it came up", job, job_state)
        if time.time() > deadline:
            raise _job_error(f"the Ray head did not come up within cluster.head_wait_timeout_s="
                             f"{conf.head_wait_timeout_s:.0f}", job, job_state,
                             hint="a PENDING job waits for resources (see `squeue`, `sinfo`); "
                                  "raise cluster.head_wait_timeout_s or cancel with `matrix-hpc cluster down`")
        time.sleep(1.0)


def _wait_workers(conf: ClusterConf, state: ClusterState, backend: Backend, jobs: list[JobRecord]) -> None:
    expected = {j.job_id: (conf.worker.nodes if conf.backend == "slurm" else 1) for j in jobs}
    deadline = time.time() + conf.head_wait_timeout_s
    while expected:
        joined = {n["job_id"] for n in state.nodes() if n["role"] == "worker"}
        counts = {j: sum(1 for n in state.nodes() if n["role"] == "worker" and n["job_id"] == j) for j in joined}
        pending = [j for j in jobs if counts.get(j.job_id, 0) < expected[j.job_id]]
        if not pending:
            return
        states = backend.states([j.job_id for j in pending])
        for job in pending:
            if states[job.job_id] not in ACTIVE_STATES:
                raise _job_error("a Ray worker job ended before it joined", job, states[job.job_id])
        if time.time() > deadline:
            job = pending[0]
            raise _job_error(f"worker job(s) {[j.job_id for j in pending]} did not join within "
                             f"cluster.head_wait_timeout_s={conf.head_wait_timeout_s:.0f}", job, states[job.job_id])
        time.sleep(1.0)


def _job_error(what: str, job: JobRecord, job_state: str, hint: str = "") -> JobFailedError:
    stderr = "\n".join(t for t in (tail_text(job.stderr()), tail_text(job.ray_log(), max_lines=10)) if t)
    return JobFailedError(what, job.job_id, job_state, job.log_paths(), stderr, hint)


def cluster_status(conf: Any, ask_ray: bool = True) -> ClusterStatus:
    """Jobs (with states), the head, and, if ``ask_ray``, Ray's nodes,
    resources and named actors (services)."""
    conf = as_cluster_conf(conf)
    state, backend = ClusterState(conf.cluster_dir), backend_of(conf)
    records = state.jobs()
    states = backend.states([r.job_id for r in records])
    status = ClusterStatus(name=conf.name, backend=conf.backend, cluster_dir=str(conf.cluster_dir), head=None,
                           jobs=[JobStatus(r.job_id, r.role, states[r.job_id], str(r.stdout()), str(r.stderr()))
                                 for r in records])
    head = state.head()
    if head is not None and port_available(head.node_ip, head.gcs_port):
        status.head = head
        status.prometheus = server_url(state.root) or ""
        if ask_ray:
            _fill_from_ray(status, state)
    return status


def _fill_from_ray(status: ClusterStatus, state: ClusterState) -> None:
    """Ask Ray in a short-lived process, so this one never joins the cluster."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "matrix_hpc.cluster.ray_node", "probe", "--cluster-dir", str(state.root)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        status.ray_error = "Ray did not answer within 120 s"
        return
    if proc.returncode != 0:
        status.ray_error = f"could not query Ray: {proc.stderr.strip().splitlines()[-1:]}"
        return
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    status.nodes, status.total = data["nodes"], data["total"]
    status.available, status.services = data["available"], data["services"]


def cluster_down(conf: Any, timeout_s: float = 120.0) -> list[str]:
    """Cancel every job `up` started, wait until they are gone, kill any Ray
    process they left on this host, and forget the head. Returns the job ids."""
    conf = as_cluster_conf(conf)
    state, backend = ClusterState(conf.cluster_dir), backend_of(conf)
    with state.locked():
        records = state.jobs()
        ids = [r.job_id for r in records]
        backend.cancel(ids)
        _wait_gone(backend, ids, timeout_s)
        strays = sum(kill_by_marker(n["tmp_dir"]) for n in state.nodes() if n["hostname"] == socket.gethostname())
        if strays:
            log.warning("killed %d Ray process(es) left behind by cancelled jobs", strays)
        state.clear_runtime_files()
        state.save_jobs([])
    return ids


def _wait_gone(backend: Backend, ids: list[str], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while ids:
        states = backend.states(ids)
        left = [j for j, s in states.items() if s in ACTIVE_STATES]
        if not left:
            return
        if time.time() > deadline:
            raise ClusterError(f"jobs {left} still {[states[j] for j in left]} {timeout_s:.0f} s after cancel; "
                               "check `squeue` and cancel them with `scancel`")
        time.sleep(1.0)


def stray_processes(conf: Any) -> list[int]:
    """Pids of Ray processes of this cluster still alive on this host (for checks)."""
    conf = as_cluster_conf(conf)
    return [p.pid for n in ClusterState(conf.cluster_dir).nodes() for p in find_by_marker(n["tmp_dir"])]


def ray_address_for(conf: Any) -> str | None:
    """The Ray address of the cluster's running head, or None when none is
    up (the run then starts its own Ray inside its allocation). With a head,
    this process's Ray is set to the cluster's token (call before `import ray`)."""
    conf = as_cluster_conf(conf)
    state = ClusterState(conf.cluster_dir)
    head = state.head()
    if head is None:
        if conf.backend == "slurm":  # with cluster=local an in-process Ray is the normal case
            log.warning("no matrix cluster running at %s: the run starts its own Ray on this node "
                        "(start one with `matrix-hpc cluster up cluster=slurm`)", conf.cluster_dir)
        return None
    if not port_available(head.node_ip, head.gcs_port, timeout_s=5.0):
        raise ClusterError(f"the Ray head in {ClusterState(conf.cluster_dir).head_file} ({head.address}, job "
                           f"{head.job_id}) does not answer; run `matrix-hpc cluster status` and "
                           "`matrix-hpc cluster down`, then `up` again")
    ensure_private_dir(state.root)  # a head.json others could write might point us (and our token) elsewhere
    use_cluster_token(state.token_file)
    return head.address


def cluster_main(action: str, conf: Any) -> int:
    """`matrix-hpc cluster up|status|down`: print the outcome, return an exit code.
    Errors print their message (id, state, logs, stderr tail) and return 2."""
    import sys

    actions: dict[str, Callable[[Any], object]] = {
        "up": cluster_up, "status": cluster_status,
        "down": lambda c: f"cancelled jobs: {', '.join(cluster_down(c)) or 'none'}"}
    if action not in actions:
        print(f"matrix-hpc cluster: unknown action {action!r}; valid actions: up, status, down", file=sys.stderr)
        return 2
    try:
        print(actions[action](conf))
    except (ClusterError, ValueError) as e:
        print(f"matrix-hpc cluster {action}: error: {e}", file=sys.stderr)
        return 2
    return 0
