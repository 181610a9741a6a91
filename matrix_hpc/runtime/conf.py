"""The run's settings (``run.*``): admission, retries, placement, resume,
the watch over peers and the end-of-run check. Registered for Hydra by
:mod:`matrix_hpc.config.schema`; it lives here, next to the code it steers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from matrix_hpc.runtime.progress import ProgressMode


class Placement(Enum):
    colocated = "colocated"  # all roles in each worker process: a hop is an in-process call
    per_role = "per_role"  # each role on its own Ray actors: a hop is a batched Ray call


class ResumeMode(Enum):
    auto = "auto"  # resume when the output dir has rows; refuse a different workflow config
    force = "force"  # resume even if the workflow config changed


#: Values of ``run.retry``.
RETRY_CHOICES = ("none", "failed")


@dataclass
class RunConf:
    max_concurrent_tasks: int = 1000  # tasks running (then in flight until their rows are committed)
    # Admitted tasks that wait at their worker and start there the moment a running task ends (no round
    # trip to the driver between the two); they do not count as running. null: as many as
    # max_concurrent_tasks, at most 1,024; 0: none. Only when a task ends on the worker it starts on (one
    # placement group: colocated, or one role).
    standby_tasks: int | None = None
    max_attempts: int = 3  # executions of one step before its task fails
    backoff_base_s: float = 0.5  # first retry delay of a failed step (doubles each retry)
    backoff_max_s: float = 30.0  # longest retry delay
    seed: int = 0  # seeds every task's random generator (same rows in every placement)
    # Tasks per input row (rejection sampling): sample k of row <id> is task <id>#s<k> (k=0: <id>), with its
    # own seed; raising it on a resumed output adds the missing samples (docs/datasets.md).
    samples_per_input: int = 1
    resume: ResumeMode = ResumeMode.auto  # see ResumeMode
    placement: Placement = Placement.colocated  # where roles run
    num_workers: int = 1  # colocated: worker processes, each hosting every role
    role_workers: dict[str, int] = field(default_factory=dict)  # per_role: instances of a role (default 1)
    # Spread worker actors round robin over the cluster's alive nodes (a node lost
    # later falls back to another); false lets Ray pack CPU-less actors onto the driver's node.
    spread_workers: bool = True
    batch_size: int = 256  # messages per cross-process call
    batch_delay_ms: float = 2.0  # longest wait before a partial batch is sent
    progress_interval_s: float = 5.0  # live progress line period; 0 turns it off
    progress: ProgressMode = ProgressMode.auto  # auto: a live bar on a terminal, greppable lines in a log; bar | lines
    drain_timeout_s: float = 30.0  # on SIGTERM/SIGUSR1: wait this long for in-flight tasks, then stop
    task_timeout_s: float = 3600.0  # re-admit a task not committed after this long (0: never); a late copy is dropped
    num_cpus: int | None = None  # CPUs of the local Ray (default: all)
    summary: bool = True  # print the one-screen summary at the end
    retry: str = "none"  # none | failed: failed: ids whose row is `failed` run again (the new row supersedes it)
    verify_rounds: int = 2  # after the last commit: re-admit ids missing from the output at most this many times
    peer_check_interval_s: float = 2.0  # how often the driver checks workers and sinks for restarts and lost sends
    commit_stall_timeout_s: float = 600.0  # a sink whose every commit fails this long stops the run (exit 3); 0: never

    def __post_init__(self) -> None:
        if self.max_concurrent_tasks < 1:
            raise ValueError("run.max_concurrent_tasks must be >= 1")
        if self.standby_tasks is not None and self.standby_tasks < 0:
            raise ValueError(f"run.standby_tasks={self.standby_tasks} must be >= 0 (0: none; null: chosen "
                             "from run.max_concurrent_tasks)")
        if self.retry not in RETRY_CHOICES:
            raise ValueError(f"run.retry={self.retry!r}; valid choices: {', '.join(RETRY_CHOICES)} "
                             "(failed: re-run the ids whose row is `failed`)")
        if self.verify_rounds < 0:
            raise ValueError(f"run.verify_rounds={self.verify_rounds} must be >= 0 "
                             "(0: report missing ids, re-admit none)")
        if self.peer_check_interval_s <= 0:
            raise ValueError(f"run.peer_check_interval_s={self.peer_check_interval_s} must be > 0")
        if self.samples_per_input < 1:
            raise ValueError(f"run.samples_per_input={self.samples_per_input} must be >= 1 (tasks per input row)")
        if self.max_attempts < 1:
            raise ValueError("run.max_attempts must be >= 1")
        if self.num_workers < 1:
            raise ValueError("run.num_workers must be >= 1")


#: ``run.standby_tasks=null``: as many as ``run.max_concurrent_tasks``, at most this many.
STANDBY_AUTO_MAX = 1024


def standby_size(run: RunConf, groups: int) -> int:
    """Tasks that may wait at their workers (``run.standby_tasks``): none when a
    task's roles span placement groups, for it would end on another worker
    than the one holding its successor."""
    if groups > 1:
        return 0
    if run.standby_tasks is not None:
        return run.standby_tasks
    return min(run.max_concurrent_tasks, STANDBY_AUTO_MAX)
