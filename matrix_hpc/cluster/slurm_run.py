"""A run as a Slurm job: submit the driver, drain and requeue on preemption.

``matrix-hpc run cluster=slurm ...`` outside an allocation submits itself
(the same command line) as a Slurm job through submitit and, by default,
waits for it. Inside the job the run proceeds as usual: it joins the
cluster's Ray if `cluster up` started one, else starts its own.

Preemption and time limits: the job is submitted with ``--signal=USR1@N``.
Slurm sends USR1 to every process of the job; the driver stops admitting
tasks, drains the in-flight ones (``run.drain_timeout_s``), commits and
exits; then ``DriverJob.checkpoint`` hands submitit a fresh copy of itself
and submitit requeues the job, which resumes from the output directory.

    >>> from matrix_hpc.cluster import SlurmClusterConf, submit_run
    >>> job = submit_run(["workflow=overhead", "dataset.path=in.jsonl", "output.dir=out"],
    ...                  SlurmClusterConf(name="demo"))
    >>> wait_run(job, SlurmClusterConf(name="demo"))   # 0 when every row is written
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matrix_hpc.cluster.config import as_cluster_conf
from matrix_hpc.cluster.errors import ClusterError, JobFailedError
from matrix_hpc.cluster.ray_node import (
    NodeSpec,
    RayNode,
    ignore_preempt_signals,
    job_identity,
    port_available,
)
from matrix_hpc.cluster.slurm import ACTIVE_STATES, SlurmBackend
from matrix_hpc.cluster.state import ClusterState, JobRecord
from matrix_hpc.procs import EXIT_INTERRUPTED, kill_tree, tail_text

log = logging.getLogger(__name__)

#: Preemption signal of run jobs; the driver drains on it (submitit's default, USR2, would kill Ray).
PREEMPT_SIGNAL = "USR1"


def in_slurm_job() -> bool:
    """True inside a Slurm allocation (then a run executes here, never resubmits)."""
    return "SLURM_JOB_ID" in os.environ


@dataclass
class DriverJob:
    """submitit callable: runs ``matrix-hpc run <overrides>`` in a child process.

    ``checkpoint()`` (called by submitit on USR1) asks the child to drain,
    waits for it, and returns a fresh copy of this job to requeue.
    """

    overrides: list[str]  # the Hydra overrides of `matrix-hpc run`
    cwd: str  # directory the run starts in (relative paths in overrides)
    cluster_dir: str  # join this cluster's Ray when its head is up
    grace_s: float = 100.0  # longest wait for the drain before the child is killed
    node_spec: NodeSpec | None = None  # Ray node this job adds when it joins a cluster from a new host
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _node: RayNode | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None, "_node": None}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "matrix_hpc.cli.main", "run", *self.overrides]

    def __call__(self) -> int:
        self._node = self._join_cluster()
        try:
            self._proc = subprocess.Popen(self.command(), cwd=self.cwd, preexec_fn=ignore_preempt_signals)
            while self._proc.poll() is None:  # poll, not wait(): the USR1 handler must be able to run
                time.sleep(0.5)
            code = self._proc.returncode
        finally:
            self._stop_node()
        if code == EXIT_INTERRUPTED:
            raise ClusterError("the run stopped early (drained) without a preemption signal; "
                               "resubmit the same command to resume")
        if code != 0:
            raise ClusterError(f"`matrix-hpc run` exited with code {code}; see this job's stderr log")
        return 0

    def checkpoint(self) -> Any:
        """Drain the run, then requeue a fresh copy (Any: submitit's DelayedSubmission)."""
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("preemption: asking the run (pid %d) to drain within %.0f s", proc.pid, self.grace_s)
            proc.send_signal(signal.SIGUSR1)
            deadline = time.time() + self.grace_s
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            if proc.poll() is None:
                log.warning("the run did not drain in %.0f s: stopping it (unfinished tasks rerun on resume)",
                            self.grace_s)
                kill_tree(proc.pid, grace_s=5.0)
        self._stop_node()
        fresh = DriverJob(self.overrides, self.cwd, self.cluster_dir, self.grace_s, self.node_spec)
        return submitit.helpers.DelayedSubmission(fresh)

    def _join_cluster(self) -> RayNode | None:
        """Add this host to the cluster if its head runs and no node of it is here:
        a Ray driver needs a Ray node on its own host."""
        state = ClusterState(Path(self.cluster_dir))
        head = state.head()
        if head is None or self.node_spec is None or not port_available(head.node_ip, head.gcs_port):
            return None
        import socket

        if any(n["hostname"] == socket.gethostname() for n in state.nodes()):
            return None
        job_id, rank = job_identity()
        node = RayNode(self.node_spec, state, job_id, rank)
        node.start(head.address)
        return node

    def _stop_node(self) -> None:
        if self._node is not None:
            self._node.stop()
            self._node = None


def submit_run(overrides: list[str], conf: Any, cwd: str | None = None) -> Any:
    """Submit ``matrix-hpc run <overrides>`` as a Slurm job (Any: a submitit Job).

    The job is named ``matrix-run-<cluster name>``; its logs are under
    ``<cluster dir>/logs/<job id>/``, and `cluster down` cancels it.
    """
    from matrix_hpc.cluster.lifecycle import make_executor

    conf = as_cluster_conf(conf)
    if conf.backend != "slurm":
        raise ClusterError(f"submit_run needs cluster=slurm, not cluster={conf.backend}")
    executor = make_executor(conf, conf.driver, f"matrix-run-{conf.name}")
    extra = {**conf.slurm.additional_parameters, "signal": f"{PREEMPT_SIGNAL}@{conf.slurm.signal_delay_s}"}
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *conf.slurm.setup]
    executor.update_parameters(slurm_additional_parameters=extra, slurm_setup=setup, nodes=1)
    grace_s = max(10.0, conf.slurm.signal_delay_s - 15.0)
    spec = NodeSpec(role="driver", num_cpus=conf.driver.cpus_per_task, num_gpus=conf.driver.gpus_per_node,
                    tmp_root=conf.node_tmp_dir)
    job = executor.submit(DriverJob(list(overrides), cwd or os.getcwd(), str(conf.cluster_dir), grace_s, spec))
    ClusterState(conf.cluster_dir).add_jobs([JobRecord(job_id=str(job.job_id), role="driver", backend="slurm",
                                                       log_dir=str(job.paths.folder))])
    log.info("submitted run job %s (%s); logs %s", job.job_id, f"matrix-run-{conf.name}", job.paths.folder)
    return job


def wait_run(job: Any, conf: Any, poll_s: float = 2.0) -> int:
    """Wait for a submitted run (through requeues); 0 on success, else raise
    ``JobFailedError`` with the job's id, state, logs and stderr tail."""
    backend = SlurmBackend()
    job_id = str(job.job_id)
    while backend.states([job_id])[job_id] in ACTIVE_STATES:
        time.sleep(poll_s)
    final = backend.states([job_id])[job_id]
    paths = [Path(job.paths.stdout), Path(job.paths.stderr)]
    if Path(job.paths.result_pickle).exists():
        try:
            value = job.result()
        except Exception as e:  # submitit's FailedJobError
            # The run's own error is in the job's stderr log, above submitit's
            # traceback (which only says that `matrix-hpc run` failed).
            stderr = tail_text(paths[1], max_lines=60, max_bytes=16384) or str(e)[-4000:]
            raise JobFailedError("the run job failed", job_id, final, paths, stderr) from None
        log.info("run job %s finished (%s)", job_id, final)
        return int(value or 0)
    raise JobFailedError("the run job ended without a result", job_id, final, paths, tail_text(paths[1]))


def maybe_submit_run(cfg: Any) -> int | None:
    """For the CLI: submit this run to Slurm if ``cluster=slurm``, we are not
    inside an allocation and ``cluster.submit_run`` is on; returns the exit
    code to use (None: run here). ``cfg`` is Hydra's composed config."""
    node = cfg.get("cluster") if hasattr(cfg, "get") else None
    if node is None or node.get("backend", "local") != "slurm" or in_slurm_job():
        return None
    conf = as_cluster_conf(node)
    if not conf.submit_run:
        return None
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task]
    job = submit_run(overrides, conf)
    print(f"matrix-hpc: submitted run as Slurm job {job.job_id}; logs {job.paths.stdout} and {job.paths.stderr}",
          file=sys.stderr)
    if not conf.wait_run:
        return 0
    return wait_run(job, conf)
