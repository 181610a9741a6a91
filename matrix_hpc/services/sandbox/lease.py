"""What a lease is: its owner, its record in the pool, what a client is granted, the pool's counts, its errors."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from matrix_hpc.services.sandbox.errors import SandboxError


class SandboxPoolExhausted(SandboxError):
    """No sandbox became free within ``lease_wait_s``."""


class LeaseLost(SandboxError):
    """The pool reaped this lease (expired, or its owner was judged dead)."""


@dataclass(frozen=True)
class LeaseOwner:
    task_id: str  # the task the sandbox serves
    attempt: int  # the task's attempt; a later attempt releases earlier ones
    process: str  # "pid<N>@<host>" of the leasing process
    actor_id: str | None = None  # Ray actor id of the leasing process, when it is an actor
    pid: int | None = None  # OS pid of the leasing process


@dataclass
class Lease:
    """The pool's record of one lease.

    Its times are ``time.monotonic()`` of the pool's process: the record never leaves it.
    """

    lease_id: str
    sandbox_id: str
    owner: LeaseOwner
    host_index: int  # which host runs the sandbox
    node_id: str  # node of that host
    granted_at: float  # monotonic time when granted
    renewed_at: float  # monotonic time of the last heartbeat
    expires_at: float  # reaped after this unless renewed (never beyond granted_at + max_lease_s)
    shared: bool = False  # the task's sandbox, shared by all its steps in any process (task_sandbox)


@dataclass(frozen=True)
class LeaseGrant:
    """What a client gets back: enough to address the sandbox directly."""

    lease_id: str
    sandbox_id: str
    host: Any  # Any: a HostRef in-process, a Ray actor handle for the Ray pool
    node_id: str


@dataclass
class PoolStats:
    live: int = 0  # sandboxes alive (leased or starting)
    waiting: int = 0  # lease requests waiting for capacity
    granted: int = 0  # leases granted since start
    released: int = 0  # leases released by their owner
    reaped: int = 0  # leases reaped (expired, owner dead, superseded attempt)
    per_node: dict[str, int] = field(default_factory=dict)  # live sandboxes per node


def this_process_owner(task_id: str, attempt: int) -> LeaseOwner:
    """Owner record for a lease taken by the calling process."""
    actor_id = None
    try:
        import ray

        if ray.is_initialized():
            actor_id = ray.get_runtime_context().get_actor_id()
    except ImportError:
        pass
    return LeaseOwner(task_id=task_id, attempt=attempt, process=f"pid{os.getpid()}@{socket.gethostname()}",
                      actor_id=actor_id, pid=os.getpid())
