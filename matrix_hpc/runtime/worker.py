"""A worker process hosting one or more roles.

Tasks arrive in batches (``deliver``). Each task runs as one coroutine that
keeps stepping while the next role is hosted here (an in-process hop), and
otherwise hands the message to the outbox of the peer that hosts it. A
finished task goes to the sink that owns its shard.

Standby tasks (``run.standby_tasks``) arrive the same way but wait here: when
a task ends here, the oldest of them starts in its place at once, and the
driver learns of the swap in the next :meth:`Worker.finished` report. A
task's slot is thus never idle for the report's round trip to the driver
(at 1,000 calls in flight, about 2% of every call's time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from matrix_hpc import metrics
from matrix_hpc.runtime.message import FAILED, FILTERED, OK, TaskState, pack_tasks, unpack_tasks
from matrix_hpc.runtime.outbox import Outbox
from matrix_hpc.runtime.workflow import AgentContext, Filtered, Workflow, WorkflowConf, build_workflow
from matrix_hpc.store.layout import shard_of, sink_of

if TYPE_CHECKING:
    from matrix_hpc.store.sink import ShardSink

log = logging.getLogger(__name__)


@dataclass
class StepPolicy:
    max_attempts: int = 3  # executions of one step before the task fails
    backoff_base_s: float = 0.5  # first retry delay; doubles each time
    backoff_max_s: float = 30.0  # cap on one retry delay


@dataclass
class WorkerSpec:
    group: str  # placement group name (e.g. "all" or a role name)
    index: int  # instance number within the group
    roles: tuple[str, ...]  # roles hosted here
    workflow: WorkflowConf
    seed: int
    policy: StepPolicy
    batch_size: int
    batch_delay_s: float
    num_shards: int
    services: dict[str, Callable[[], Any]] = field(default_factory=dict)  # name -> factory, called once here
    run_id: str = ""  # the metrics' run label (matrix_hpc.metrics)
    sink: tuple[Any, Any, int] | None = None  # (SinkSettings, schema, index): the sink hosted here (output.sink_host)


def _tune_gc() -> None:
    """Thousands of live task coroutines make Python's default young-generation
    collections frequent and costly; everything alive at start-up is frozen
    out of collection and the threshold raised (about 20% less CPU per LLM
    call at 10,000 tasks in flight)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


#: Methods of per-process services called with the task id when a task ends:
#: the sandbox pool releases the task's leases, the LLM client its replica pin.
TASK_END_HOOKS = ("on_task_end", "release_task", "forget_sticky")

#: Shortest gap between two answers of :meth:`Worker.finished`: finished ids
#: gathered this long go to the driver in one call (its admission credits).
FINISH_REPORT_GAP_S = 0.1
#: How long a worker remembers a standby task it started (a late ``promote``
#: of it from the driver is then ignored) or a promotion that came before its
#: task (which then starts on arrival): far longer than a report's round trip,
#: and short enough that the ids it keeps stay few (at 2,000 starts a second,
#: 120,000 ids).
STANDBY_MEMORY_S = 60.0
#: Longest wait before a partial batch of finished tasks goes to a sink. Rows
#: wait for the sink's next commit anyway (``output.flush_interval_s``), and
#: admission does not wait for them (:meth:`Worker.finished`), so batching
#: them longer than peer hops saves most of the sinks' actor calls at low rates
#: (a call costs a sink about 1-2 ms of CPU).
SINK_BATCH_DELAY_S = 0.25


class NotConnected(RuntimeError):
    """A restarted worker got tasks before the driver reconnected it."""


class Router:
    """Maps (role, task id) to the peer that runs it. Stable per task id, so a
    task keeps meeting the same instance of each role."""

    def __init__(self, role_groups: dict[str, str], group_sizes: dict[str, int]) -> None:
        self.role_groups = role_groups
        self.group_sizes = group_sizes

    def route(self, role: str, task_id: str) -> tuple[str, int]:
        group = self.role_groups[role]
        return group, shard_of(task_id, self.group_sizes[group])


async def run_step(workflow: Workflow, agent: Callable[[TaskState, AgentContext], Awaitable[None]], role: str,
                   task: TaskState, ctx: AgentContext, policy: StepPolicy,
                   on_error: Callable[[Exception], None] = lambda e: None) -> str | None:
    """One role's step with the worker's semantics; the next role, or None when
    the task ended. A failed attempt leaves no trace (history, data and result
    restored) and is retried with exponential backoff up to
    ``policy.max_attempts``; ``Filtered`` ends the task as filtered; an error
    whose ``retryable`` is false, or the last attempt's, fails it naming the role."""
    for attempt in range(1, policy.max_attempts + 1):
        n_history, data, result = task.history_len, dict(task.data), dict(task.result)
        try:
            await agent(task, ctx)
            task.hops += 1
            if task.status is not None:
                return None
            return workflow.next_role(task, role)
        except Filtered as f:
            task.finish(FILTERED, reason=f.reason)
            return None
        except Exception as e:
            on_error(e)
            task.truncate_history(n_history)  # a failed step leaves no trace but the error
            task.data, task.result = data, result
            if attempt >= policy.max_attempts or not getattr(e, "retryable", True):
                task.finish(FAILED, error_type=type(e).__name__, error=f"{role}: {e}"[:4000])
                return None
            task.attempts += 1
            await asyncio.sleep(min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (attempt - 1)))
    return None


class Worker:
    """Plain class; run as an async Ray actor by the driver (see placement)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        metrics.set_run(spec.run_id, spec.workflow.name)
        self.workflow = build_workflow(spec.workflow)
        self.agents = {role: self.workflow.agent(role) for role in spec.roles}
        self.ctx = AgentContext(spec.seed)
        self.incarnation = f"{os.getpid()}-{time.time()}"
        self.router: Router | None = None
        self._peers: dict[tuple[str, int], Outbox] = {}
        self._sinks: list[Outbox] = []
        self._running: set[asyncio.Task[None]] = set()
        self._lost: list[str] = []  # ids of tasks whose batch to a peer or sink failed, not yet reported
        self._finished: list[str] = []  # ids of tasks that ended here (handed to their sink), not yet reported
        self._finished_ready: asyncio.Event | None = None  # created in the actor's event loop
        self._finished_reported_at = 0.0
        self._finished_reports = 0  # answers of finished() that carried ids (Ray calls back to the driver)
        self._standby: dict[str, TaskState] = {}  # standby tasks waiting here, oldest first
        self._standby_started: list[str] = []  # ids started from standby since the last report
        self._standby_closed = False  # the run is stopping: standby tasks no longer start
        self._started_recently: deque[tuple[float, str]] = deque()  # (when, id) of standby tasks started here
        self._started_ids: set[str] = set()  # the ids of _started_recently
        self._early: dict[str, float] = {}  # ids the driver promoted before they arrived here -> when
        self.standby_starts = 0
        self.steps = 0
        self.local_hops = 0
        self.remote_hops = 0
        self.sink: ShardSink | None = None
        if spec.sink is not None:
            from matrix_hpc.store.sink import ShardSink  # only a hosting worker needs it (pyarrow.compute)

            self.sink = ShardSink(*spec.sink)

    async def connect(self, router: Router, peers: dict[str, list[Any]], sinks: list[Any]) -> str:
        """Learn the peers' handles (Ray actors) and build per-process services.
        Called again after a restart of this worker (Ray handles of restarted
        peers stay valid, so a peer's restart needs no reconnection here)."""
        self.router = router
        me = (self.spec.group, self.spec.index)
        for group, handles in peers.items():
            for i, h in enumerate(handles):
                if (group, i) != me:
                    self._peers[(group, i)] = self._outbox(h.deliver.remote, f"worker {group}/{i}")
        self._sinks = [self._sink_outbox(n, s) for n, s in enumerate(sinks)]
        for name, factory in self.spec.services.items():
            if name not in self.ctx.services:
                self.ctx.services[name] = factory()
        _tune_gc()
        return self.incarnation

    def _outbox(self, send: Callable[[list[Any]], Any], name: str, delay_s: float | None = None,
                encode: Callable[[list[Any]], Any] | None = pack_tasks) -> Outbox:
        delay_s = self.spec.batch_delay_s if delay_s is None else delay_s
        return Outbox(send, self.spec.batch_size, delay_s, on_failed=self._note_lost, name=name, encode=encode)

    def _sink_outbox(self, n: int, handle: Any) -> Outbox:
        """Rows for sink ``n``: handed over in this process when it is hosted here
        (no pickling, no Ray call), otherwise sent to it in batches."""
        delay_s = max(self.spec.batch_delay_s, SINK_BATCH_DELAY_S)
        if self.sink is not None and self.sink.index == n:
            return self._outbox(self.sink.write, f"sink {n} (in this process)", delay_s, encode=None)
        return self._outbox(handle.write.remote, f"sink {n}", delay_s)

    def _note_lost(self, batch: list[TaskState], error: BaseException) -> None:
        """Tasks of a batch that no peer took: the driver collects their ids
        (``heartbeat``) and re-admits them."""
        self._lost.extend(task.id for task in batch)

    def where(self) -> dict[str, Any]:
        """The Ray node, host and pid this worker runs on (for the driver's placement log)."""
        import socket

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    async def deliver(self, batch: bytes | list[TaskState]) -> None:
        """Start the tasks of a batch (see :func:`pack_tasks`)."""
        self._refuse_if_unconnected()
        for task in unpack_tasks(batch):
            self._start(task)

    def _start(self, task: TaskState) -> None:
        t = asyncio.ensure_future(self._drive(task))
        self._running.add(t)
        t.add_done_callback(self._running.discard)

    def _refuse_if_unconnected(self) -> None:
        if self.router is None:  # restarted and not yet reconnected: the sender's failed send re-admits these
            raise NotConnected(f"worker {self.spec.group}/{self.spec.index} (incarnation {self.incarnation}) "
                               "restarted and is not connected yet; its tasks are refused")

    async def deliver_standby(self, batch: bytes | list[TaskState]) -> None:
        """Tasks that wait here until a task ends here (or the driver promotes
        them): they do not run yet."""
        self._refuse_if_unconnected()
        for task in unpack_tasks(batch):
            if self._early.pop(task.id, None) is not None:  # the driver's promote() came first
                self._start(task)
            elif not self._standby_closed:
                self._standby[task.id] = task

    async def promote(self, ids: list[str]) -> None:
        """Start these standby tasks: the driver gave them credits that ended
        elsewhere. One already started here in place of a task that ended
        here is left as it is (the driver learns that from its report); one
        not arrived yet starts when it arrives."""
        now = time.monotonic()
        self._forget_standby_before(now - STANDBY_MEMORY_S)
        for task_id in ids:
            task = self._standby.pop(task_id, None)
            if task is not None:
                self._start(task)
            elif task_id not in self._started_ids:
                self._early[task_id] = now

    def _start_standby(self) -> None:
        """A task that held a slot ended here: the oldest standby task takes it."""
        if not self._standby or self._standby_closed:
            return
        task_id = next(iter(self._standby))
        task = self._standby.pop(task_id)
        now = time.monotonic()
        self._forget_standby_before(now - STANDBY_MEMORY_S)
        self._standby_started.append(task_id)
        self._started_recently.append((now, task_id))
        self._started_ids.add(task_id)
        self.standby_starts += 1
        self._start(task)

    def _forget_standby_before(self, t: float) -> None:
        """Forget what ``STANDBY_MEMORY_S`` covers before ``t`` (called at every
        start from standby and every promotion: the memory stays bounded)."""
        while self._started_recently and self._started_recently[0][0] < t:
            self._started_ids.discard(self._started_recently.popleft()[1])
        if self._early:
            for task_id in [i for i, at in self._early.items() if at < t]:
                del self._early[task_id]

    async def drop_standby(self) -> list[str]:
        """The run is stopping: the standby tasks waiting here will not start;
        their ids (the driver leaves them to the rerun)."""
        self._standby_closed = True
        ids, self._standby = list(self._standby), {}
        return ids

    async def _drive(self, task: TaskState) -> None:
        assert self.router is not None
        me = (self.spec.group, self.spec.index)
        while True:
            try:
                nxt = await self._step(task.role, task)
            except Exception as e:  # a bug in next_role etc.: the row fails, the run goes on
                task.finish(FAILED, error_type=type(e).__name__, error=str(e)[:2000])
                nxt = None
            if task.status is not None or nxt is None:
                if task.status is None:
                    task.finish(OK)
                await self._end_task(task)
                self._to_sink(task)
                self._note_finished(task.id)
                self._start_standby()
                return
            task.role = nxt
            dest = self.router.route(nxt, task.id)
            if dest == me:
                self.local_hops += 1
                continue
            self.remote_hops += 1
            self._peers[dest].put(task)
            return

    async def _step(self, role: str, task: TaskState) -> str | None:
        """Run one role's step with retries; return the next role."""
        t0 = time.perf_counter()
        try:
            return await self._attempts(role, task)
        finally:
            metrics.STEP_LATENCY_S.observe(time.perf_counter() - t0, role)

    async def _attempts(self, role: str, task: TaskState) -> str | None:
        hops = task.hops
        nxt = await run_step(self.workflow, self.agents[role], role, task, self.ctx, self.spec.policy,
                             on_error=lambda e: metrics.STEP_ERRORS.inc(1, role, type(e).__name__))
        self.steps += task.hops - hops
        return nxt

    async def _end_task(self, task: TaskState) -> None:
        """Let services release what the task held (e.g. its sandbox lease),
        whatever its fate."""
        for name, svc in self.ctx.services.items():
            hook = next((getattr(svc, h) for h in TASK_END_HOOKS if hasattr(svc, h)), None)
            if hook is None:
                continue
            try:
                res = hook(task.id)
                if asyncio.iscoroutine(res):
                    await res
            except Exception as e:  # releasing must not lose the row
                log.warning("service %s failed to release task %s: %s", name, task.id, e)

    def _to_sink(self, task: TaskState) -> None:
        self._sinks[sink_of(task.id, self.spec.num_shards, len(self._sinks))].put(task)

    def _note_finished(self, task_id: str) -> None:
        if len(self._running) <= 1:  # the last task here (this one): its row need not wait for a fuller batch
            for box in self._sinks:
                box.flush()
        self._finished.append(task_id)
        if self._finished_ready is not None:
            self._finished_ready.set()

    async def finished(self, timeout_s: float = 1.0) -> tuple[list[str], list[str]]:
        """Long poll (the driver's admission): the ids of the tasks that ended
        here since the last call, and of the standby tasks that started here
        in their places; at most one answer per ``FINISH_REPORT_GAP_S`` so
        that a busy worker answers with batches, not single ids. The ended
        tasks' rows are on the way to their sinks; commits are acknowledged
        by the sinks."""
        if self._finished_ready is None:
            self._finished_ready = asyncio.Event()
        if not self._finished:
            try:
                await asyncio.wait_for(self._finished_ready.wait(), timeout_s)
            except TimeoutError:
                pass
        wait_s = self._finished_reported_at + FINISH_REPORT_GAP_S - time.monotonic()
        if self._finished and wait_s > 0:
            await asyncio.sleep(0)  # the ended tasks leave _running
            if self._running:  # more may end soon: report them together; idle (the run's tail): at once
                await asyncio.sleep(wait_s)
        ended, self._finished = self._finished, []
        started, self._standby_started = self._standby_started, []
        self._finished_reports += bool(ended)
        self._finished_ready.clear()
        self._finished_reported_at = time.monotonic()
        return ended, started

    async def drain_sinks(self, timeout_s: float = 2.0) -> None:
        """Send the rows waiting here for their sinks and wait (at most
        ``timeout_s``) until the sinks hold them: the run's tail flushes the
        sinks after this, so that no row waits for a later commit."""
        await asyncio.gather(*[box.drain(timeout_s) for box in self._sinks])

    async def stats(self) -> dict[str, Any]:
        metrics.flush_batched()  # the driver asks last, before stopping the workers
        peers, sinks = list(self._peers.values()), self._sinks
        return {"group": self.spec.group, "index": self.spec.index, "running": len(self._running),
                "steps": self.steps, "local_hops": self.local_hops, "remote_hops": self.remote_hops,
                "peer_calls": sum(b.batches_sent for b in peers), "sink_calls": sum(b.batches_sent for b in sinks),
                "sink_messages": sum(b.messages_sent for b in sinks), "finished_reports": self._finished_reports,
                "standby_starts": self.standby_starts, "incarnation": self.incarnation}

    async def ping(self) -> str:
        return self.incarnation

    async def heartbeat(self) -> tuple[str, list[str]]:
        """This incarnation, and the ids of tasks lost in failed sends since the last call."""
        lost, self._lost = self._lost, []
        return self.incarnation, lost

    # -- the sink hosted here (output.sink_host; the driver reaches it through HostedSink) --
    def _hosted(self) -> ShardSink:
        if self.sink is None:
            raise RuntimeError(f"worker {self.spec.group}/{self.spec.index} hosts no sink")
        return self.sink

    async def sink_write(self, batch: bytes | list[Any]) -> None:
        await self._hosted().write(batch)

    async def sink_wait_commits(self, timeout_s: float = 1.0) -> list[Any]:
        return await self._hosted().wait_commits(timeout_s)

    async def sink_flush(self) -> None:
        await self._hosted().flush()

    async def sink_close(self) -> dict[str, Any]:
        return await self._hosted().close()

    async def sink_health(self) -> dict[str, Any]:
        return await self._hosted().health()

    async def sink_incarnation_id(self) -> str:
        return await self._hosted().incarnation_id()

    async def close(self) -> None:
        for t in list(self._running):
            t.cancel()
        for svc in self.ctx.services.values():
            close = getattr(svc, "close", None)
            if close is not None:
                res = close()
                if asyncio.iscoroutine(res):
                    await res


def _on_host(method: str) -> Any:  # Any: a property
    """The hosting worker's ``sink_<method>`` (a Ray actor method), read as ``<method>``."""
    return property(lambda self: getattr(self.host, f"sink_{method}"))


@dataclass(frozen=True)
class HostedSink:
    """The driver's (and other workers') handle on a sink that runs inside a
    worker actor (``output.sink_host``): the sink actor's methods, by the names
    a separate sink actor has, mapped onto the hosting worker's ``sink_*``."""

    host: Any  # the worker's Ray actor handle

    write = _on_host("write")
    wait_commits = _on_host("wait_commits")
    flush = _on_host("flush")
    close = _on_host("close")
    health = _on_host("health")
    incarnation_id = _on_host("incarnation_id")
