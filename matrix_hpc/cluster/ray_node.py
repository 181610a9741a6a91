"""One Ray node inside a cluster job: start ``ray start --block``, publish
where it is, stop it (and everything it spawned) when the job ends.

``RayHead`` and ``RayWorker`` are the submitit callables of `cluster up`;
the same code runs from the sbatch scripts in ``launch/``::

    python -m matrix_hpc.cluster.ray_node head   --cluster-dir DIR [--num-cpus 4]
    python -m matrix_hpc.cluster.ray_node worker --cluster-dir DIR [--num-cpus 8 --num-gpus 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matrix_hpc.cluster.auth import check_token, create_token, node_env, use_cluster_token
from matrix_hpc.cluster.errors import ClusterError
from matrix_hpc.cluster.local_ray import RUNTIME_SYSTEM_CONFIG
from matrix_hpc.cluster.state import ClusterState, HeadInfo, write_json_atomic
from matrix_hpc.procs import die_with_parent_hook, free_port, kill_by_marker, kill_tree, tail_text, terminate

#: ray start prints this once its node has registered with the head.
READY_LINE = "Ray runtime started"


def ignore_preempt_signals() -> None:
    """Popen preexec_fn: ignore USR1/USR2 in the child and all it spawns.

    Slurm sends its pre-timeout signal to every process of a job, and it
    kills Ray's processes outright; an ignored signal stays ignored across
    exec. (A driver still installs its own USR1 handler to drain.)
    """
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def node_ip() -> str:
    """The IP other nodes reach this one at (Ray's own choice)."""
    from ray._private.services import get_node_ip_address  # private: Ray's own IP choice, kept identical

    return str(get_node_ip_address())


def port_available(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections there (the head's GCS)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def job_identity() -> tuple[str, int]:
    """(job id, rank) of this process in a Slurm or submitit-local job."""
    with contextlib.suppress(Exception):
        import submitit

        env = submitit.JobEnvironment()
        return str(env.job_id), int(env.global_rank)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job:
        return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}", int(os.environ.get("SLURM_PROCID", 0))
    return os.environ.get("SLURM_JOB_ID", str(os.getpid())), int(os.environ.get("SLURM_PROCID", 0))


def _agent_ports(export_metrics: bool) -> list[str]:
    """Per-node ports picked free, so several nodes can share a host."""
    ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port())]
    return ports + (["--metrics-export-port", str(free_port())] if export_metrics else [])


def _metrics_env(export_metrics: bool) -> dict[str, str]:
    """Ray's metrics exporter serves plain, unauthenticated HTTP on every interface of a node with a
    routable address: without monitoring it is not started at all (the agent gets
    ``--disable-metrics-collection`` from the raylet).

    The head's autoscaler monitor and dashboard also start Prometheus endpoints of their own on every
    interface (ports 44217 and 44227), with no setting for the address and nothing of ours scraping
    them: an impossible port (-1) makes their start fail, which Ray logs and goes on without."""
    closed = {"AUTOSCALER_METRIC_PORT": "-1", "DASHBOARD_METRIC_PORT": "-1"}
    return closed if export_metrics else {**closed, "RAY_enable_metrics_collection": "0"}


def _client_server_port() -> list[str]:
    """A free Ray Client port: its default (10001) is one per host, and a second head there fails."""
    from ray._private.utils import get_ray_client_dependency_error  # private: `ray start` refuses the flag without it

    return [] if get_ray_client_dependency_error() is not None else ["--ray-client-server-port", str(free_port())]


@dataclass
class NodeSpec:
    role: str  # head | worker
    num_cpus: int  # CPUs offered to Ray
    num_gpus: int = 0  # GPUs offered to Ray
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    object_store_gb: float | None = None  # None: Ray's default share of memory
    include_dashboard: bool = False  # head only
    dashboard_host: str = "127.0.0.1"  # head only: the dashboard's bind address (token-authenticated)
    tmp_root: str = "/tmp"  # node-local root of Ray's temp dir
    export_metrics: bool = False  # Ray's Prometheus exporter (unauthenticated HTTP on the node's address)
    monitoring: bool = False  # head only: the cluster's Prometheus next to the node (cluster_monitor.py)
    monitoring_scrape_interval_s: float = 5.0


class RayNode:
    """A running ``ray start --block`` process and its bookkeeping."""

    def __init__(self, spec: NodeSpec, state: ClusterState, job_id: str, rank: int) -> None:
        self.spec, self.state, self.job_id, self.rank = spec, state, job_id, rank
        self.tmp_dir = Path(spec.tmp_root) / f"mxr-{job_id}-{rank}"
        self.log_path = state.root / "logs" / job_id / f"ray-{rank}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, head_address: str | None, gcs_port: int | None, dashboard_port: int | None) -> list[str]:
        ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        cmd = [ray, "start", "--block", "--disable-usage-stats", "--temp-dir", str(self.tmp_dir),
               "--num-cpus", str(self.spec.num_cpus), "--num-gpus", str(self.spec.num_gpus),
               *_agent_ports(self.spec.export_metrics)]
        if self.spec.resources:
            cmd += ["--resources", json.dumps(self.spec.resources)]
        if self.spec.object_store_gb:
            cmd += ["--object-store-memory", str(int(self.spec.object_store_gb * 2**30))]
        if head_address is None:
            cmd += ["--head", "--port", str(gcs_port), "--node-ip-address", node_ip()]
            cmd += ["--system-config", json.dumps(RUNTIME_SYSTEM_CONFIG)]  # the GCS hands it to every node and driver
            cmd += _client_server_port()
            cmd += ["--include-dashboard", "true" if self.spec.include_dashboard else "false"]
            if dashboard_port:
                cmd += ["--dashboard-port", str(dashboard_port), "--dashboard-host", self.spec.dashboard_host]
        else:
            cmd += ["--address", head_address]
        return cmd

    def start(self, head_address: str | None = None, timeout_s: float = 120.0, attempts: int = 3) -> None:
        """Start the node and return once it has registered (or raise with the log tail).

        Ray gives a raylet 30 s to register, which an overloaded machine can
        miss; a node that fails that way is started again (``attempts`` times).
        """
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(head_address, timeout_s)
                return
            except ClusterError:
                self._kill_processes()
                if attempt == attempts:
                    raise
                print(f"[matrix] ray start ({self.spec.role}) failed, attempt {attempt}/{attempts}; retrying",
                      flush=True)

    def _start_once(self, head_address: str | None, timeout_s: float) -> None:
        check_token(self.state.token_file)  # a clear error here rather than Ray's own further down
        gcs_port = free_port() if head_address is None else None
        dash_port = free_port() if head_address is None and self.spec.include_dashboard else None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # earlier attempts' output
        env = node_env(self.state.token_file) | _metrics_env(self.spec.export_metrics)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(head_address, gcs_port, dash_port), stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=ignore_preempt_signals)
        self._wait_ready(timeout_s, offset)
        self._write_node_file()
        if head_address is None:
            assert gcs_port is not None
            ip = node_ip()
            self.state.write_head(HeadInfo(address=f"{ip}:{gcs_port}", node_ip=ip, gcs_port=gcs_port,
                                           dashboard_port=dash_port, hostname=socket.gethostname(),
                                           job_id=self.job_id, pid=os.getpid(), started_at=time.time()))

    def _wait_ready(self, timeout_s: float, offset: int) -> None:
        assert self.proc is not None
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"ray start ({self.spec.role}) exited with code {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{tail_text(self.log_path)}")
            if READY_LINE in _read_from(self.log_path, offset):
                return
            time.sleep(0.5)
        raise ClusterError(f"ray start ({self.spec.role}) not ready after {timeout_s:.0f} s; "
                           f"log {self.log_path}:\n{tail_text(self.log_path)}")

    def _write_node_file(self) -> None:
        assert self.proc is not None
        write_json_atomic(self.state.node_file(self.spec.role, self.job_id, self.rank), {
            "role": self.spec.role, "job_id": self.job_id, "rank": self.rank, "hostname": socket.gethostname(),
            "pid": os.getpid(), "ray_pid": self.proc.pid, "tmp_dir": str(self.tmp_dir),
            "num_cpus": self.spec.num_cpus, "num_gpus": self.spec.num_gpus, "resources": self.spec.resources,
            "started_at": time.time()})

    def wait(self) -> int:
        """Block until the node stops; poll so signal handlers can run meanwhile."""
        assert self.proc is not None
        while self.proc.poll() is None:
            time.sleep(1.0)
        return int(self.proc.returncode)

    def _kill_processes(self, grace_s: float = 5.0) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid, grace_s)
        kill_by_marker(str(self.tmp_dir), grace_s)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the node's whole process tree, then SIGKILL what is left."""
        self._kill_processes(grace_s)
        self.state.node_file(self.spec.role, self.job_id, self.rank).unlink(missing_ok=True)
        if self.spec.role == "head":
            head = self.state.head()
            if head is not None and head.job_id == self.job_id:
                self.state.head_file.unlink(missing_ok=True)
        if os.environ.get("MATRIX_KEEP_RAY_TMP"):  # debugging: keep Ray's session logs (gcs_server.out, raylet.out)
            print(f"[matrix] MATRIX_KEEP_RAY_TMP is set: keeping {self.tmp_dir}", flush=True)
        else:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


def wait_for_head(state: ClusterState, timeout_s: float, head_job_id: str | None = None) -> HeadInfo:
    """The head's address once head.json exists and its GCS answers."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        head = state.head()
        if head is not None and (head_job_id is None or head.job_id == head_job_id):
            if port_available(head.node_ip, head.gcs_port):
                return head
        time.sleep(1.0)
    raise ClusterError(f"no Ray head at {state.head_file} after {timeout_s:.0f} s; check the head job "
                       f"with `matrix-hpc cluster status` and its logs under {state.root / 'logs'}")


@dataclass
class RayHead:
    """submitit callable: the Ray head of a cluster; runs until cancelled."""

    cluster_dir: str  # the cluster dir (shared filesystem)
    spec: NodeSpec  # what the node offers to Ray

    def __call__(self) -> int:
        job_id, rank = job_identity()
        state = ClusterState(Path(self.cluster_dir))
        create_token(state.token_file)  # `cluster up` made it already; an sbatch script's head makes it here
        return _run_node(RayNode(self.spec, state, job_id, rank), head_address=None)


@dataclass
class RayWorker:
    """submitit callable: one Ray worker node per task of the job; runs until cancelled."""

    cluster_dir: str  # the cluster dir (shared filesystem)
    spec: NodeSpec  # what each node offers to Ray
    head_wait_timeout_s: float = 300.0  # fail if no head shows up in this time

    def __call__(self) -> int:
        job_id, rank = job_identity()
        state = ClusterState(Path(self.cluster_dir))
        head = wait_for_head(state, self.head_wait_timeout_s)
        return _run_node(RayNode(self.spec, state, job_id, rank), head_address=head.address)


def _run_node(node: RayNode, head_address: str | None) -> int:
    """Start, block until the node stops or the job is cancelled, clean up."""
    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    # submitit ignores SIGTERM (it waits for its own preemption signal); a
    # cancelled or timed-out cluster job must stop its Ray node instead.
    import psutil

    signal.signal(signal.SIGTERM, stop_on_signal)
    monitor: subprocess.Popen[bytes] | None = None
    try:
        node.start(head_address)
        print(f"[matrix] {node.spec.role} node up: job {node.job_id} rank {node.rank}, log {node.log_path}",
              flush=True)
        if node.spec.monitoring:
            monitor = _start_monitor(node)
        code = node.wait()
    finally:
        if monitor is not None:
            with contextlib.suppress(psutil.Error):
                terminate([psutil.Process(monitor.pid)], grace_s=15)
        node.stop()
    if code != 0:
        raise ClusterError(f"ray {node.spec.role} exited with code {code}; log {node.log_path}:\n"
                           f"{tail_text(node.log_path)}")
    return code


def _start_monitor(node: RayNode) -> subprocess.Popen[bytes]:
    """The cluster's Prometheus (cluster_monitor.py), a child that dies with this job."""
    log_path = node.log_path.with_name("monitor.log")
    cmd = [sys.executable, "-m", "matrix_hpc.cluster.cluster_monitor", "--cluster-dir", str(node.state.root),
           "--scrape-interval-s", str(node.spec.monitoring_scrape_interval_s)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=node_env(node.state.token_file), preexec_fn=die_with_parent_hook())
    print(f"[matrix] cluster monitor started (pid {proc.pid}, log {log_path})", flush=True)
    return proc


def probe(address: str, token_file: Path) -> dict[str, Any]:
    """Nodes, resources and named actors (services) of a running cluster."""
    use_cluster_token(token_file)
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        nodes = [{"host": n["NodeManagerHostname"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
                  "resources": n["Resources"]} for n in ray.nodes()]
        actors = ray.util.list_named_actors(all_namespaces=True)
        return {"nodes": nodes, "total": ray.cluster_resources(), "available": ray.available_resources(),
                "services": sorted(f"{a['namespace']}/{a['name']}" for a in actors)}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.cluster.ray_node")
    parser.add_argument("role", choices=["head", "worker", "probe"])
    parser.add_argument("--cluster-dir", required=True, help="shared dir for head.json, node files and logs")
    parser.add_argument("--num-cpus", type=int, default=int(os.environ.get("SLURM_CPUS_PER_TASK", 1)))
    parser.add_argument("--num-gpus", type=int, default=0)
    parser.add_argument("--resources", default="{}", help='custom Ray resources as JSON, e.g. {"partition:gpu": 1}')
    parser.add_argument("--head-wait-timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.role == "probe":
        head = ClusterState(Path(args.cluster_dir)).head()
        if head is None:
            raise ClusterError(f"no head.json in {args.cluster_dir}")
        print(json.dumps(probe(head.address, ClusterState(Path(args.cluster_dir)).token_file)))
        return 0
    spec = NodeSpec(role=args.role, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                    resources=json.loads(args.resources))
    if args.role == "head":
        return RayHead(args.cluster_dir, spec)()
    return RayWorker(args.cluster_dir, spec, args.head_wait_timeout_s)()


if __name__ == "__main__":
    sys.exit(main())
