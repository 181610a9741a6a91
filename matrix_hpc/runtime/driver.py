"""The driver: admits tasks, and nothing else.

It streams input rows, skips ids the output already holds, and keeps at most
``max_concurrent_tasks`` running: a credit returns when a worker reports the
task ended (its row on the way to its sink), so admission never waits for a
commit. Up to ``run.standby_tasks`` more wait at their workers and start
there the moment a task ends there, before the driver hears of it (the
worker reports the swap; the driver promotes a standby task itself when a
credit comes back from a worker that had none waiting). A task stays in
flight until a sink acknowledges its committed row, and at most
``max_concurrent_tasks`` + max(``max_concurrent_tasks``, ``MIN_UNCOMMITTED``)
(plus the standby tasks) are in flight: a sink that cannot commit stops
admission. Task state never comes back here: it travels worker to worker
and ends in a sink.

It also keeps the run honest: lost peers and failed sends lead to
re-admission within seconds (see :mod:`matrix_hpc.runtime.peers`), and the
run ends by reading the output back (:mod:`matrix_hpc.runtime.verify`):
only an output holding every input id once is "finished".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matrix_hpc import metrics, startup
from matrix_hpc.background import supervise
from matrix_hpc.runtime.conf import RunConf, standby_size
from matrix_hpc.runtime.message import FAILED, TaskState, pack_tasks
from matrix_hpc.runtime.outbox import Outbox
from matrix_hpc.runtime.peers import PeerEvents, PeerWatch, WorkerKey
from matrix_hpc.runtime.placement import Group, PlacementError, plan_groups, spread_nodes
from matrix_hpc.runtime.progress import FINISHED, INCOMPLETE, INTERRUPTED, ProgressPrinter, RunStats
from matrix_hpc.runtime.samples import expand_samples
from matrix_hpc.runtime.verify import MissingIds, missing_input
from matrix_hpc.runtime.worker import HostedSink, Router, StepPolicy, Worker, WorkerSpec
from matrix_hpc.runtime.workflow import WorkflowConf, build_workflow
from matrix_hpc.store.conf import OutputConf, SinkPlacementError, resolved_num_sinks, sinks_in_workers
from matrix_hpc.store.input import DatasetConf, InputItem, count_input_rows, iter_input
from matrix_hpc.store.layout import META_DIR, sink_of
from matrix_hpc.store.resume import scan_output
from matrix_hpc.store.rows import output_schema
from matrix_hpc.store.sink import DUPLICATE, ShardSink, SinkSettings
from matrix_hpc.store.verify import OutputSummary, summarize_output

NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node
METRICS_INTERVAL_S = 1.0  # how often the driver publishes its counts (Ray exports them on its own interval)
log = logging.getLogger(__name__)

#: Dispatches of one task (first admission included) after which it fails as
#: ``TaskLost`` whatever the causes (a guard against endless re-admission).
MAX_DISPATCHES = 20
#: Ended tasks whose rows are not committed yet, at most (or max_concurrent_tasks
#: if more): rows wait up to output.flush_interval_s for their commit, and a
#: small concurrency must not stall on that.
MIN_UNCOMMITTED = 1024
#: Nothing runs and rows wait for their commit (the run's tail): the workers
#: send their rows to the sinks and the sinks commit at once (no row waits for
#: output.flush_interval_s); again after TAIL_FLUSH_FIRST_GAP_S, and so on at
#: doubling gaps up to TAIL_FLUSH_EVERY_S, until every row is acknowledged.
TAIL_FLUSH_FIRST_GAP_S = 0.02
TAIL_FLUSH_EVERY_S = 0.25
TAIL_DRAIN_TIMEOUT_S = 1.0  # longest wait for the workers' rows before the sinks commit anyway
RUN, STANDBY = "run", "standby"  # how a credit admits a task (Driver._take_credit)


@dataclass
class RunPlan:
    """Everything a run needs, as plain objects (built from the Hydra config)."""

    workflow: WorkflowConf
    dataset: DatasetConf
    output: OutputConf
    run: RunConf
    workflow_yaml: str = ""  # the workflow config as text (for people; resume compares values)
    full_yaml: str = ""  # the whole resolved config, stored with the output
    services: dict[str, Callable[[], Any]] = field(default_factory=dict)  # per-process service factories


@dataclass
class RunResult:
    out_dir: str
    run_id: str
    stats: RunStats
    interrupted: bool
    worker_stats: list[dict[str, Any]]
    outcome: str = FINISHED  # finished | interrupted | incomplete (see progress)
    disk: OutputSummary | None = None  # this run's rows as read back from the output
    missing: MissingIds | None = None  # input ids without a row; None when not checked (interrupted)
    problems: list[str] = field(default_factory=list)  # why the run could not complete


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class Driver:
    def __init__(self, plan: RunPlan, run_id: str | None = None) -> None:
        self.plan = plan
        self.run_id = run_id or new_run_id()
        self.out_dir = Path(plan.output.dir).expanduser().resolve()
        self.workflow = build_workflow(plan.workflow)
        self.stats = RunStats()
        self.inflight: dict[str, InputItem] = {}
        self.running: set[str] = set()  # dispatched to a worker, its end not yet reported (admission credits)
        self.standby_limit = 0  # run.standby_tasks, resolved for the placement (_create_actors)
        self._standby: dict[WorkerKey, dict[str, None]] = {}  # standby ids per worker, not known to have started
        self._standby_count = 0
        self._standby_boxes: dict[WorkerKey, Outbox] = {}  # standby tasks to each worker
        self._promote_boxes: dict[WorkerKey, Outbox] = {}  # ids of its standby tasks to start, to each worker
        self.max_in_flight = in_flight_cap(plan.run, 0)
        self.problems: list[str] = []
        self._credit_event: asyncio.Event | None = None
        self._stopping = False
        self._aborting = False  # stop without the drain wait: what is in flight cannot be committed
        self._actors: list[Any] = []
        self._created: list[Any] = []  # actors of the current start attempt (killed if it fails)
        self._admitted_at: dict[str, float] = {}  # last dispatch, for the task timeout
        self._dispatches: dict[str, int] = {}  # re-dispatched ids -> dispatches so far
        self._losses: dict[str, int] = {}  # ids lost with a worker or timed out -> times
        self._lost_sends: set[str] = set()  # ids of failed sends, re-admitted at the next peer check
        self._admitted = self._rows_read = 0  # cumulative, for the metrics (published once a second)
        self._published = metrics.Deltas()
        self._done: Any = None  # the ids the output holds (the store's IdSet), once prepare() ran
        metrics.set_run(self.run_id, plan.workflow.name)

    # -- the run loop -----------------------------------------------------
    async def run(self) -> RunResult:
        """Admit every input row not yet in the output, complete what is
        missing, close, and report what the output holds."""
        self._credit_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._done is None:
            self.prepare()
        done = self._done
        self._start_counting_input()
        await self._start_actors()
        startup.phase("actors")
        background = self._start_background()
        try:
            await self._admit_all(done)
            await self._wait_in_flight()
            await self._complete_missing()
        finally:
            interrupted = self._stopping or bool(self.inflight)
            self.stats.t_end = time.time()
            await self._close_sinks(background)
            self.publish_metrics()
            worker_stats = await self._stop_actors()
        return self._result(interrupted, worker_stats)

    def request_stop(self) -> None:
        """Stop admitting; in-flight tasks get ``drain_timeout_s`` to finish.
        Safe to call from a signal handler or another thread."""
        self._stopping = True
        log.warning("stop requested: no new tasks; draining in-flight tasks for up to %.0f s",
                    self.plan.run.drain_timeout_s)
        self._wake_admission()

    def _fail(self, problem: str) -> None:
        """Stop at once: something the run cannot recover from (it exits non-zero)."""
        log.error("%s; stopping the run (rerun the same command once it is fixed: it resumes)", problem)
        self.problems.append(problem)
        self._stopping = self._aborting = True
        self._wake_admission()

    def _wake_admission(self) -> None:
        if self._credit_event is not None:
            self._loop.call_soon_threadsafe(self._credit_event.set)

    def prepare(self) -> None:
        """The resume scan; it needs no Ray, so the app runs it while Ray starts (before :meth:`run`)."""
        self._done = self._prepare_output()
        startup.phase("resume_scan")

    # -- steps ------------------------------------------------------------
    def _prepare_output(self) -> Any:  # Any: the store's IdSet
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_dir = self.out_dir / META_DIR / "runs" / self.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(self.plan.full_yaml)
        scan = scan_output(self.out_dir, retry_failed=self.plan.run.retry == "failed")
        for path in scan.quarantined:
            log.warning("unreadable output file %s moved to quarantine; its ids run again", path)
        if scan.duplicates:
            log.warning("%s holds %d duplicate id(s) from earlier runs; see `matrix-hpc inspect %s`",
                        self.out_dir, scan.duplicates, self.out_dir)
        if len(scan.done) or scan.retried:
            log.info("resuming: %d ids already in %s%s", len(scan.done), self.out_dir,
                     f"; {scan.retried} failed rows run again (run.retry=failed)" if scan.retried else "")
        self.stats.retried_failed = scan.retried
        return scan.done

    def _start_counting_input(self) -> None:
        def count() -> None:
            try:
                self.stats.total_input = count_input_rows(self.plan.dataset) * self.plan.run.samples_per_input
            except Exception:  # only the ETA needs it
                pass

        threading.Thread(target=count, daemon=True).start()

    async def _start_actors(self, tries: int = 3) -> None:
        """Sinks and workers, connected. A node lost while they are being placed
        (seen on busy multi-node clusters) fails the start: try again, afresh."""
        for attempt in range(1, tries + 1):
            self._created = []
            try:
                await self._create_actors(attempt)
                return
            except (SinkPlacementError, PlacementError):  # the configuration, not a lost node: no retry
                self._kill(self._created)
                raise
            except Exception as e:
                if attempt == tries:
                    raise
                log.warning("starting the run's actors failed (%s); retrying", str(e).splitlines()[0])
                self._kill(self._created)
                await asyncio.sleep(2.0 * attempt)

    async def _create_actors(self, attempt: int) -> None:
        import ray

        run, out = self.plan.run, self.plan.output
        schema = output_schema(self.workflow.result_columns())
        cpus = ray.cluster_resources().get("CPU", 0)
        groups = plan_groups(self.workflow.roles, run.placement, run.num_workers, run.role_workers)
        num_workers = sum(g.instances for g in groups)
        num_sinks = resolved_num_sinks(out, cpus)
        if out.sink_host == "workers" and out.num_sinks is None:  # chosen by the run: at most one per worker
            num_sinks = min(num_sinks, num_workers)
        # Rows wait in sink buffers until committed (in flight meanwhile): commit before half the concurrency does.
        flush_rows = max(64, min(out.max_buffered_rows, run.max_concurrent_tasks // (2 * num_sinks)))
        settings = SinkSettings(str(self.out_dir), out.num_shards, self.run_id, out.flush_interval_s,
                                flush_rows, out.compression, out.keep, out.compact_min_files,
                                workflow=self.plan.workflow.name)
        hosted = sinks_in_workers(out, cpus, num_sinks, num_workers)
        where = " inside the worker process(es)" if hosted else ""
        why = [] if out.num_sinks is not None else ["output.num_sinks=null: chosen for this Ray's CPUs"]
        why += [f"output.sink_host={out.sink_host}"] if out.sink_host == "auto" and hosted else []
        log.info("%d sink(s) write the %d shards%s%s", num_sinks, out.num_shards, where,
                 f" ({'; '.join(why)})" if why else "")
        sink_actors: list[Any] = []
        if not hosted:
            sink_cls = _actor_class(ShardSink)
            sink_actors = [sink_cls.remote(settings, schema, i) for i in range(num_sinks)]
            self._created += sink_actors
        hosted_specs = [(settings, schema, i) for i in range(num_sinks)] if hosted else []
        handles = await self._start_workers(groups, attempt, hosted_specs)
        workers = [h for hs in handles.values() for h in hs]
        self.sinks = [HostedSink(workers[i]) for i in range(num_sinks)] if hosted else sink_actors
        router = Router({r: g.name for g in groups for r in g.roles}, {g.name: g.instances for g in groups})
        keys = [(g, i) for g, hs in handles.items() for i in range(len(hs))]
        incarnations = await asyncio.gather(*[handles[g][i].connect.remote(router, handles, self.sinks)
                                              for g, i in keys])
        sink_incarnations = await asyncio.gather(*[s.incarnation_id.remote() for s in self.sinks])
        self._actors = workers + sink_actors
        self.router, self.handles = router, handles
        events = PeerEvents(self._on_lost_sends, self._on_worker_restarted, self._on_sink_restarted,
                            self._on_sink_stalled)
        self._watch = PeerWatch(handles, self.sinks, (router, handles, self.sinks), events,
                                dict(zip(keys, incarnations, strict=True)), [str(i) for i in sink_incarnations],
                                commit_stall_timeout_s=run.commit_stall_timeout_s)
        self._sink_boxes = [self._outbox(s.write.remote, f"sink {n}") for n, s in enumerate(self.sinks)]
        self._first_boxes = {(g, i): self._outbox(h.deliver.remote, f"worker {g}/{i}")
                             for g, hs in handles.items() for i, h in enumerate(hs)}
        self.standby_limit = standby_size(run, len(groups))
        self.max_in_flight = in_flight_cap(run, self.standby_limit)
        if run.standby_tasks and not self.standby_limit:
            log.warning("run.standby_tasks=%d is ignored: the roles run in %d placement groups, so a task ends "
                        "on another worker than the one it starts on", run.standby_tasks, len(groups))
        self._standby = {key: {} for key in self._first_boxes}
        self._standby_boxes = {(g, i): self._outbox(h.deliver_standby.remote, f"worker {g}/{i} (standby)")
                               for g, hs in handles.items() for i, h in enumerate(hs)}
        self._promote_boxes = {(g, i): Outbox(h.promote.remote, run.batch_size, run.batch_delay_ms / 1000,
                                              name=f"worker {g}/{i} (promotions)")
                               for g, hs in handles.items() for i, h in enumerate(hs)}

    async def _start_workers(self, groups: list[Group], attempt: int = 1,
                             hosted_sinks: list[tuple[Any, Any, int]] | None = None) -> dict[str, list[Any]]:
        """Worker actors, started and their places logged; the ``k``-th of them hosts
        ``hosted_sinks[k]`` (if any: output.sink_host). ``run.spread_workers``
        puts them round robin on the cluster's alive nodes (a node lost
        later falls back to another); without it Ray
        packs these CPU-less actors onto the driver's node."""
        run = self.plan.run
        worker_cls = _actor_class(Worker)
        policy = StepPolicy(run.max_attempts, run.backoff_base_s, run.backoff_max_s)
        slots = [(g, i) for g in groups for i in range(g.instances)]
        hosted = hosted_sinks or []
        places_opts = _spread_options(len(slots)) if run.spread_workers else [{}] * len(slots)
        workers = [
            worker_cls.options(name=f"matrix-{self.run_id}-{g.name}-{i}" + (f"-r{attempt}" if attempt > 1 else ""),
                               **opts)
            .remote(WorkerSpec(g.name, i, g.roles, self.plan.workflow, run.seed, policy, run.batch_size,
                               run.batch_delay_ms / 1000, self.plan.output.num_shards, self.plan.services,
                               run_id=self.run_id, sink=hosted[k] if k < len(hosted) else None))
            for k, ((g, i), opts) in enumerate(zip(slots, places_opts, strict=True))
        ]
        self._created += workers
        places = await asyncio.gather(*[w.where.remote() for w in workers])
        log.info("placed %d worker(s) on %d node(s): %s", len(places), len({p["node_id"] for p in places}),
                 ", ".join(f"{g.name}-{i}@{p['host']}:{p['pid']}/{p['node_id'][:8]}"
                           for (g, i), p in zip(slots, places, strict=True)))
        handles: dict[str, list[Any]] = {g.name: [] for g in groups}
        for (g, _), w in zip(slots, workers, strict=True):
            handles[g.name].append(w)
        return handles

    def _outbox(self, send: Callable[[list[Any]], Any], name: str) -> Outbox:
        return Outbox(send, self.plan.run.batch_size, self.plan.run.batch_delay_ms / 1000,
                      on_failed=lambda batch, _e: self._on_lost_sends([t.id for t in batch]), name=name,
                      encode=pack_tasks)

    def _start_background(self) -> list[asyncio.Task[None]]:
        """The driver's loops, each supervised: an unexpected exception is
        logged and the loop restarted; one that keeps failing stops the run
        (the progress line, cosmetic, just stops)."""
        interval_s = self.plan.run.peer_check_interval_s
        loops: list[tuple[Callable[[], Awaitable[None]], str]] = [
            (functools.partial(self._poll_commits, sink), f"commit poller of sink {n}")
            for n, sink in enumerate(self.sinks)]
        loops += [(functools.partial(self._poll_finished, h), f"finish poller of worker {g}/{i}")
                  for g, hs in self.handles.items() for i, h in enumerate(hs)]
        loops += [(functools.partial(self._watch.watch_workers, interval_s, self._after_peer_check), "worker watch"),
                  (functools.partial(self._watch.watch_sinks, interval_s, self._after_peer_check), "sink watch")]
        essential = [supervise(fn, name, max_restarts=5, on_fatal=functools.partial(self._on_loop_fatal, name))
                     for fn, name in loops]
        return [*essential, supervise(self._show_progress, "progress line", restart=False),
                supervise(self._publish_metrics_periodically, "metrics publisher")]

    def _on_loop_fatal(self, name: str, error: BaseException) -> None:
        self._fail(f"the driver's {name} keeps failing ({type(error).__name__}: {error})")

    async def _show_progress(self) -> None:
        interval_s = self.plan.run.progress_interval_s
        if interval_s <= 0:
            return
        printer = ProgressPrinter(mode=self.plan.run.progress)
        try:
            while True:
                await asyncio.sleep(printer.interval_s(interval_s))
                printer.show(self.stats)
        finally:
            printer.end()

    async def _publish_metrics_periodically(self) -> None:
        if not metrics.ray_connected():
            return
        while True:
            self.publish_metrics()
            await asyncio.sleep(METRICS_INTERVAL_S)

    def publish_metrics(self) -> None:
        """The driver's counts as Ray metrics (matrix_hpc.metrics): the hot
        path counts with ints, this sends the differences."""
        pub = self._published
        pub.publish(metrics.TASKS_ADMITTED, self._admitted)
        pub.publish(metrics.INPUT_ROWS_READ, self._rows_read)
        pub.publish(metrics.TASKS_READMITTED, self.stats.readmitted + self.stats.verify_readmitted)
        for status, n in list(self.stats.by_status.items()):
            pub.publish(metrics.TASKS_COMPLETED, n, status)
        metrics.TASKS_IN_FLIGHT.set(len(self.inflight))

    # -- admission --------------------------------------------------------
    async def _admit_all(self, done: Any) -> None:
        self.stats.t_admit_start = time.time()
        for n, item in enumerate(self._tasks_of_input()):
            self._rows_read += int(item.sample == 0)  # input rows, not their samples (run.samples_per_input)
            if item.id in done:
                self.stats.skipped_done += 1
                continue
            if self._skip_duplicate(item):
                continue
            how = await self._take_credit()
            if not how:
                break
            self._admit(item, standby=how == STANDBY)
            if self._admitted == 1:
                startup.phase("first_admitted")
            if n % 512 == 0:
                await asyncio.sleep(0)  # let the commit pollers run
        self._flush_boxes()

    def _tasks_of_input(self) -> Iterator[InputItem]:
        """The input rows, each as its ``run.samples_per_input`` tasks (see runtime.samples)."""
        return expand_samples(iter_input(self.plan.dataset), self.plan.run.samples_per_input, self.plan.run.seed)

    def _missing_input(self) -> MissingIds:
        return missing_input(self.out_dir, self.plan.dataset, self.plan.run.samples_per_input, self.plan.run.seed)

    def _skip_duplicate(self, item: InputItem) -> bool:
        """A repeated input id runs once; the repeat is reported with where it is."""
        first = item.duplicate_of  # the input marks repeats of an id it already yielded
        if first is None and item.id in self.inflight:
            first = self.inflight[item.id].where
        if first is None:
            return False
        self.stats.note_duplicate(item.id, item.where, first)
        return True

    async def _take_credit(self) -> str:
        """How the next task is admitted: ``RUN`` (a credit is free), ``STANDBY``
        (to wait at its worker), or "" (the run is stopping)."""
        assert self._credit_event is not None
        limit = self.plan.run.max_concurrent_tasks
        while not self._stopping:
            self._promote_standby()
            if len(self.inflight) < self.max_in_flight:
                if len(self.running) < limit:
                    return RUN
                if self._standby_count < self.standby_limit:
                    return STANDBY
            self._flush_boxes(sinks=False)
            self._credit_event.clear()
            await self._credit_event.wait()
        return ""

    def _admit(self, item: InputItem, standby: bool = False) -> None:
        self.inflight[item.id] = item
        self._admitted += 1
        self.stats.in_flight = len(self.inflight)
        self._dispatch(item, attempt=1, standby=standby)

    def _dispatch(self, item: InputItem, attempt: int, standby: bool = False) -> None:
        """Send a task on its way: to the first role (``standby``: to wait
        there), or (unreadable or invalid input) straight to its sink as a
        ``failed`` row."""
        self._admitted_at[item.id] = time.time()
        self.running.discard(item.id)  # running again below, unless it goes straight to its sink
        self._unstandby(item.id)
        if item.row is None:
            self._sink_box(item.id).put(_failed_input(item, attempt))
            return
        first = self.workflow.first_role
        task = TaskState(item.id, item.row, first, attempt=attempt, sample=item.sample, seed=item.seed)
        try:
            self.workflow.validate_input(item.row)
        except ValueError as e:
            task.finish(FAILED, error_type="InputError", error=f"{item.where}: {e}")
            self._sink_box(item.id).put(task)
            return
        key = self.router.route(first, item.id)
        if standby:
            self._standby[key][item.id] = None
            self._standby_count += 1
            self._standby_boxes[key].put(task)
        else:
            self.running.add(item.id)
            self._first_boxes[key].put(task)

    def _waiting_with(self, task_id: str) -> dict[str, None] | None:
        """The standby ids of the worker where ``task_id`` waits, or None when it waits nowhere."""
        if not self._standby_count:
            return None
        waiting = self._standby.get(self.router.route(self.workflow.first_role, task_id))
        return waiting if waiting is not None and task_id in waiting else None

    def _unstandby(self, task_id: str) -> bool:
        """Forget that a task waits at its worker; whether it did."""
        waiting = self._waiting_with(task_id)
        if waiting is None:
            return False
        del waiting[task_id]
        self._standby_count -= 1
        return True

    def _promote_standby(self) -> None:
        """Free credits start standby tasks before any new admission: a worker
        whose tasks ended with none waiting there returned them."""
        limit = self.plan.run.max_concurrent_tasks
        if not self._standby_count or self._stopping:
            return
        for key, waiting in self._standby.items():
            while waiting and len(self.running) < limit:
                task_id = next(iter(waiting))
                del waiting[task_id]
                self._standby_count -= 1
                self.running.add(task_id)
                self._promote_boxes[key].put(task_id)

    async def _drop_standby(self) -> None:
        """Stopping: standby tasks do not start; those still waiting at their
        workers leave the run (the rerun does them). The sends of standby
        tasks settle first, so that every one is either waiting there or
        started (and reported)."""
        keys = [key for key, waiting in self._standby.items() if waiting]
        if not keys:
            return
        await asyncio.gather(*[self._standby_boxes[key].drain(5.0) for key in keys])
        dropped = await asyncio.gather(*[self.handles[g][i].drop_standby.remote() for g, i in keys],
                                       return_exceptions=True)
        n = 0
        for ids in dropped:
            for task_id in ids if isinstance(ids, list) else []:
                if self._unstandby(task_id):
                    self.inflight.pop(task_id, None)
                    self._admitted_at.pop(task_id, None)
                    n += 1
        if n:
            log.info("%d standby task(s) were not started; the rerun does them", n)
        self.stats.in_flight = len(self.inflight)

    def _flush_boxes(self, sinks: bool = True) -> None:
        self._promote_standby()
        for box in [*self._first_boxes.values(), *self._standby_boxes.values(), *self._promote_boxes.values(),
                    *(self._sink_boxes if sinks else [])]:
            box.flush()

    def _sink_box(self, task_id: str) -> Outbox:
        return self._sink_boxes[sink_of(task_id, self.plan.output.num_shards, len(self._sink_boxes))]

    # -- admission credits and commits ------------------------------------
    async def _poll_finished(self, worker: Any) -> None:
        """A worker's ended tasks return their admission credits, but those
        that standby tasks took there."""
        assert self._credit_event is not None
        while True:
            try:
                ended, started = await worker.finished.remote(1.0)
            except Exception:  # restarting: the worker watch re-admits what it held
                await asyncio.sleep(1.0)
                continue
            self._on_finished(ended, started)

    def _on_finished(self, ended: list[str], started: list[str]) -> None:
        """A worker's report: tasks that ended there, standby tasks that started there."""
        assert self._credit_event is not None
        now = time.time()
        for task_id in started:  # before the ended: a standby task may have started and ended since the last report
            if self._unstandby(task_id) and task_id in self.inflight:
                self.running.add(task_id)
                self._admitted_at[task_id] = now
        self.running.difference_update(ended)
        if ended or started:
            self._credit_event.set()

    async def _poll_commits(self, sink: Any) -> None:
        assert self._credit_event is not None
        while True:
            try:
                acks = await sink.wait_commits.remote(1.0)
            except Exception as e:  # the sink is restarting: the sink watch re-admits its tasks
                log.warning("sink unreachable (%s); checking it now", str(e).splitlines()[0][:200])
                self._watch.wake()
                await asyncio.sleep(1.0)
                continue
            for ack in acks:
                self._on_ack(*ack)
            if acks:
                startup.phase("first_committed")
                self.stats.in_flight = len(self.inflight)
                self._credit_event.set()

    def _on_ack(self, task_id: str, status: str, error_type: str | None, error: str | None, tokens: int) -> None:
        item = self.inflight.pop(task_id, None)
        if item is None:  # a late copy of a task already acknowledged
            return
        self._admitted_at.pop(task_id, None)
        self.running.discard(task_id)  # its end report may still be on the way
        self._unstandby(task_id)  # a copy of it may wait at its worker
        if status != DUPLICATE:  # a duplicate ack: a copy of a task whose row a sink had already written
            self.stats.record(status, error_type, error, tokens)

    # -- lost peers and tasks -----------------------------------------------
    def _after_peer_check(self) -> None:
        """Re-admit the tasks of failed sends, and tasks past ``run.task_timeout_s``."""
        lost, self._lost_sends = self._lost_sends, set()
        for task_id in lost:
            self._readmit(task_id, loss=False, gone=True)
        timeout_s = self.plan.run.task_timeout_s
        if timeout_s > 0:
            now = time.time()
            for task_id in [t for t, t0 in self._admitted_at.items() if now - t0 > timeout_s]:
                self._readmit(task_id, loss=True)
        if lost or timeout_s > 0:
            self._flush_boxes()

    def _on_lost_sends(self, task_ids: list[str]) -> None:
        """Sends that failed (here or between workers): re-admitted at the next
        peer check, by when a restarted peer is reconnected."""
        self._lost_sends.update(task_ids)
        self.stats.lost_sends += len(task_ids)

    def _on_worker_restarted(self, key: WorkerKey) -> None:
        """Co-located, a task lives on the worker its id routes to (and counts
        the loss: a task that keeps killing its worker fails); across role
        groups it could be on any worker, so every task goes again, uncounted."""
        colocated = len(self.handles) == 1
        first = self.workflow.first_role
        waited = set(self._standby.get(key, ()))  # standby tasks, not started: not the cause
        for task_id in list(self.inflight):
            if not colocated or self.router.route(first, task_id) == key:
                self._readmit(task_id, loss=colocated and task_id not in waited, gone=True)
        self._flush_boxes()

    def _on_sink_restarted(self, n: int) -> None:
        """Tasks routed to the sink and not acknowledged may have been in its buffer."""
        shards, sinks = self.plan.output.num_shards, len(self.sinks)
        for task_id in [t for t in self.inflight if sink_of(t, shards, sinks) == n]:
            self._readmit(task_id, loss=False)
        self._flush_boxes()

    def _on_sink_stalled(self, n: int, message: str) -> None:
        if not self._aborting:  # reported once; the run is stopping
            self._fail(f"sink {n} cannot commit: {message}")

    def _readmit(self, task_id: str, loss: bool, gone: bool = False) -> None:
        """Send an in-flight task again. ``loss``: its worker died or it timed
        out (a task that keeps doing that fails after ``run.max_attempts``);
        a failed send or a lost sink is not the task's doing. A standby task
        (not started, so it has no row to lose) is sent again only when its
        copy is ``gone`` (its worker restarted, its send failed), to wait again."""
        item = self.inflight.get(task_id)
        if item is None:
            return
        standby = self._waiting_with(task_id) is not None
        if standby and not gone:
            self._admitted_at[task_id] = time.time()  # waiting is not running: no timeout
            return
        n = self._dispatches[task_id] = self._dispatches.get(task_id, 1) + 1
        losses = self._losses[task_id] = self._losses.get(task_id, 0) + int(loss)
        if losses >= self.plan.run.max_attempts or n > MAX_DISPATCHES:
            self._admitted_at[task_id] = time.time()
            self.running.discard(task_id)
            self._unstandby(task_id)
            self._sink_box(task_id).put(_lost_task(item, n, losses))
            return
        self.stats.readmitted += 1
        self._dispatch(item, n, standby=standby)

    async def _wait_in_flight(self) -> None:
        assert self._credit_event is not None
        deadline: float | None = None
        tail_flush_at, tail_gap_s = 0.0, TAIL_FLUSH_FIRST_GAP_S
        while self.inflight and not self._aborting:
            self._flush_boxes()
            if self.running:
                tail_flush_at, tail_gap_s = 0.0, TAIL_FLUSH_FIRST_GAP_S
            elif time.monotonic() >= tail_flush_at:  # the rest waits for commits: ask for them
                tail_flush_at = time.monotonic() + tail_gap_s
                tail_gap_s = min(TAIL_FLUSH_EVERY_S, 2 * tail_gap_s)
                try:
                    await asyncio.wait_for(self._commit_tail(), 5.0)  # a restarting peer: its watch takes over
                except TimeoutError:
                    pass
                continue
            if self._stopping:
                if deadline is None:
                    await self._drop_standby()
                deadline = deadline or time.time() + self.plan.run.drain_timeout_s
                if time.time() >= deadline:
                    log.warning("drain timeout: %d tasks abandoned (they run again on resume)", len(self.inflight))
                    return
            self._credit_event.clear()
            wait_s = 0.5 if self.running else min(0.5, max(0.0, tail_flush_at - time.monotonic()))
            try:
                await asyncio.wait_for(self._credit_event.wait(), wait_s)
            except TimeoutError:
                pass

    # -- the end: verify, close, report -----------------------------------
    async def _complete_missing(self) -> None:
        """Read the output back; admit again the input ids it lacks (at most
        ``run.verify_rounds`` times)."""
        for round_no in range(1, self.plan.run.verify_rounds + 1):
            if self._stopping:
                return
            t0 = time.perf_counter()
            await self._flush_sinks()
            missing = await asyncio.to_thread(self._missing_input)
            if not missing:
                log.info("output checked: every input id has its row (%.2f s)", time.perf_counter() - t0)
                return
            log.warning("verify round %d/%d: %d input id(s) have no row in %s (e.g. %s); admitting them again",
                        round_no, self.plan.run.verify_rounds, len(missing), self.out_dir,
                        ", ".join(missing.examples()))
            self.stats.verify_readmitted += len(missing)
            for item in missing.items:
                how = await self._take_credit()
                if not how:
                    return
                self._admit(item, standby=how == STANDBY)
            self._flush_boxes()
            await self._wait_in_flight()

    async def _commit_tail(self) -> None:
        """Rows still in the workers go to their sinks, then the sinks commit:
        a worker's ended tasks can be reported before their rows reach the
        sink (another Ray caller), and such a row would wait for the next flush."""
        drains = asyncio.gather(*[w.drain_sinks.remote() for hs in self.handles.values() for w in hs],
                                return_exceptions=True)  # a dead worker: its tasks are re-admitted by the watch
        try:
            await asyncio.wait_for(drains, TAIL_DRAIN_TIMEOUT_S)
        except TimeoutError:  # a restarting worker answers late: the others' rows are committed meanwhile
            pass
        await self._flush_sinks()

    async def _flush_sinks(self) -> None:
        results = await asyncio.gather(*[s.flush.remote() for s in self.sinks], return_exceptions=True)
        for n, r in enumerate(results):
            if isinstance(r, Exception):
                log.warning("sink %d could not flush before the output check: %s", n, str(r).splitlines()[0][:300])

    async def _close_sinks(self, background: list[asyncio.Task[None]]) -> None:
        # A final flush commits what is buffered; the pollers (still running) collect its acks.
        close_timeout_s = max(60.0, self.plan.run.drain_timeout_s)
        closing = [asyncio.wait_for(asyncio.wrap_future(s.close.remote().future()), close_timeout_s)
                   for s in self.sinks]
        for n, r in enumerate(await asyncio.gather(*closing, return_exceptions=True)):
            if isinstance(r, BaseException):
                log.error("sink %d did not close cleanly (%s: %s); the output check below tells what is missing",
                          n, type(r).__name__, str(r).splitlines()[0][:300] if str(r) else "")
        await self._collect_last_acks(5.0 if not self._stopping else 0.2)
        for task in background:
            task.cancel()
        self.stats.in_flight = len(self.inflight)

    async def _collect_last_acks(self, timeout_s: float) -> None:
        """The pollers (still running) collect the acks of the final commits (for the live counts only)."""
        assert self._credit_event is not None
        deadline = time.time() + timeout_s
        while self.inflight and time.time() < deadline:
            self._credit_event.clear()
            try:
                await asyncio.wait_for(self._credit_event.wait(), max(0.0, deadline - time.time()))
            except TimeoutError:
                return

    async def _stop_actors(self) -> list[dict[str, Any]]:
        workers = [h for hs in self.handles.values() for h in hs]
        stats: list[dict[str, Any]] = []
        try:
            results = await asyncio.gather(*[w.stats.remote() for w in workers], return_exceptions=True)
            stats = [r for r in results if isinstance(r, dict)]
            await asyncio.gather(*[w.close.remote() for w in workers], return_exceptions=True)
        finally:
            self._kill(self._actors)
        return stats

    def _result(self, interrupted: bool, worker_stats: list[dict[str, Any]]) -> RunResult:
        """What the output holds, read from disk: the run's only report."""
        # A drained run (signal) leaves work for the rerun and has no time to spare; a failed one says what it lacks.
        checked = self.problems or not interrupted
        missing = self._missing_input() if checked else None
        disk = summarize_output(self.out_dir, self.run_id)
        if disk.unreadable:
            self.problems.append(f"{len(disk.unreadable)} output file(s) cannot be read, e.g. {disk.unreadable[0]}; "
                                 "rerun the same command: it quarantines them and runs their ids again")
        if self.problems or (missing is not None and (len(missing) or disk.duplicate_ids)):
            outcome = INCOMPLETE
        else:
            outcome = INTERRUPTED if interrupted else FINISHED
        return RunResult(str(self.out_dir), self.run_id, self.stats, interrupted, worker_stats, outcome, disk,
                         missing, list(self.problems))

    @staticmethod
    def _kill(actors: list[Any]) -> None:
        import ray

        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass


def in_flight_cap(run: RunConf, standby: int) -> int:
    """Tasks in flight at most: running, waiting at their workers (``standby``),
    and ended with their rows not committed yet (see ``MIN_UNCOMMITTED``)."""
    return run.max_concurrent_tasks + standby + max(run.max_concurrent_tasks, MIN_UNCOMMITTED)


def _spread_options(count: int) -> list[dict[str, Any]]:
    """Ray options placing each of ``count`` workers on its node, round robin
    over the alive nodes. A label selector on the node id with a fallback to
    any other node: measured on Ray 2.60, a soft NodeAffinitySchedulingStrategy
    and SPREAD both left nodes empty (3 workers on 3 nodes landed on 1 or 2),
    while the selector is honoured and, when its node is lost, the restarted
    actor falls back to another node (16 s in a raylet-kill trial)."""
    import ray

    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    return [{"label_selector": {NODE_ID_LABEL: node},
             "fallback_strategy": [{"label_selector": {NODE_ID_LABEL: f"!{node}"}}]}
            for node in spread_nodes(alive, count)] or [{}] * count


def _actor_class(cls: type) -> Any:  # Any: a Ray ActorClass
    """Async actors that Ray restarts when they die (the driver reconnects and re-admits).
    Without Ray's task events: Ray records each call's status changes, in caller and
    callee, and ships them to the GCS every second for its dashboard and state API
    (``ray list tasks``); the runtime's calls (admissions, rows, long polls) are
    many and small, and the run reports its own counts (docs/monitoring.md)."""
    import ray

    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": -1,
                               "enable_task_events": False}
    return ray.remote(**options)(cls)


def _failed_input(item: InputItem, attempt: int = 1) -> TaskState:
    task = TaskState(item.id, item.raw if item.raw is not None else {}, "", attempt,  # type: ignore[arg-type]
                     sample=item.sample, seed=item.seed)
    task.finish(FAILED, error_type="InputError", error=item.error)
    return task


def _lost_task(item: InputItem, dispatches: int, losses: int) -> TaskState:
    task = TaskState(item.id, item.row if item.row is not None else {}, "", dispatches, sample=item.sample,
                     seed=item.seed)
    task.finish(FAILED, error_type="TaskLost",
                error=f"sent {dispatches} times and never committed ({losses} lost with a worker that died or "
                      "past run.task_timeout_s); rerun with run.retry=failed to try it again")
    return task


def install_signal_handlers(driver: Driver) -> None:
    """SIGTERM / SIGUSR1 (Slurm's pre-timeout signal) / first Ctrl-C: drain
    and commit; a second Ctrl-C aborts."""
    loop = asyncio.get_running_loop()
    interrupts = {"n": 0}

    def on_int() -> None:
        interrupts["n"] += 1
        if interrupts["n"] > 1:
            raise KeyboardInterrupt
        driver.request_stop()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        loop.add_signal_handler(sig, driver.request_stop)
    loop.add_signal_handler(signal.SIGINT, on_int)
