"""The driver: admits tasks, and nothing else.

It streams input rows, skips ids the output already holds, keeps at most
``max_concurrent_tasks`` in flight, and returns a credit when a sink
acknowledges a committed row. Task state never comes back here: it travels
worker to worker and ends in a sink.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from matrix_hpc.config.schema import OutputConf, RunConf
from matrix_hpc.runtime.message import FAILED, TaskState
from matrix_hpc.runtime.outbox import Outbox
from matrix_hpc.runtime.placement import Group, plan_groups
from matrix_hpc.runtime.progress import ProgressPrinter, RunStats
from matrix_hpc.runtime.worker import Router, StepPolicy, Worker, WorkerSpec
from matrix_hpc.runtime.workflow import WorkflowConf, build_workflow
from matrix_hpc.store.input import DatasetConf, InputItem, count_input_rows, iter_input
from matrix_hpc.store.layout import META_DIR, sink_of
from matrix_hpc.store.resume import check_and_record_config, completed_ids
from matrix_hpc.store.rows import output_schema
from matrix_hpc.store.sink import DUPLICATE, ShardSink, SinkSettings

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """Everything a run needs, as plain objects (built from the Hydra config)."""

    workflow: WorkflowConf
    dataset: DatasetConf
    output: OutputConf
    run: RunConf
    workflow_yaml: str = ""  # the workflow config as recorded for resume checks
    full_yaml: str = ""  # the whole resolved config, stored with the output
    services: dict[str, Callable[[], Any]] = field(default_factory=dict)  # per-process service factories


@dataclass
class RunResult:
    out_dir: str
    run_id: str
    stats: RunStats
    interrupted: bool
    worker_stats: list[dict[str, Any]]


class Driver:
    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.out_dir = Path(plan.output.dir).expanduser().resolve()
        self.workflow = build_workflow(plan.workflow)
        self.stats = RunStats()
        self.inflight: dict[str, InputItem] = {}
        self.credits = plan.run.max_concurrent_tasks
        self._credit_event: asyncio.Event | None = None
        self._stopping = False
        self._actors: list[Any] = []
        self._created: list[Any] = []  # actors of the current start attempt (killed if it fails)
        self._admitted_at: dict[str, float] = {}  # for the task timeout
        self._admissions: dict[str, int] = {}  # re-admitted ids -> admissions so far

    # -- the run loop -----------------------------------------------------
    async def run(self) -> RunResult:
        self._credit_event = asyncio.Event()
        done_ids = self._prepare_output()
        self._start_counting_input()
        await self._start_actors()
        pollers = [asyncio.ensure_future(self._poll_commits(s)) for s in self.sinks]
        progress = asyncio.ensure_future(self._show_progress())
        pollers.append(asyncio.ensure_future(self._watch_peers()))
        try:
            await self._admit_all(done_ids)
            await self._wait_in_flight()
        finally:
            interrupted = self._stopping or bool(self.inflight)
            self.stats.t_end = time.time()
            await self._close_sinks(pollers)
            progress.cancel()
            worker_stats = await self._stop_actors()
        return RunResult(str(self.out_dir), self.run_id, self.stats, interrupted, worker_stats)

    def request_stop(self) -> None:
        """Stop admitting; in-flight tasks get ``drain_timeout_s`` to finish.
        Safe to call from a signal handler or another thread."""
        self._stopping = True
        log.warning("stop requested: no new tasks; draining in-flight tasks for up to %.0f s",
                    self.plan.run.drain_timeout_s)
        if self._credit_event is not None:
            self._loop.call_soon_threadsafe(self._credit_event.set)

    # -- steps ------------------------------------------------------------
    def _prepare_output(self) -> set[str]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        check_and_record_config(self.out_dir, self.plan.workflow_yaml, self.plan.full_yaml,
                                force=self.plan.run.resume.value == "force")
        run_dir = self.out_dir / META_DIR / "runs" / self.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(self.plan.full_yaml)
        done = completed_ids(self.out_dir)
        if done:
            log.info("resuming: %d ids already in %s", len(done), self.out_dir)
        return done

    def _start_counting_input(self) -> None:
        def count() -> None:
            try:
                self.stats.total_input = count_input_rows(self.plan.dataset)
            except Exception:  # only the ETA needs it
                pass

        threading.Thread(target=count, daemon=True).start()

    async def _start_actors(self, tries: int = 3) -> None:
        """Sinks and workers, connected. A node lost while they are being placed
        (seen on busy multi-node clusters) fails the start: try again, afresh."""
        self._loop = asyncio.get_running_loop()
        for attempt in range(1, tries + 1):
            self._created = []
            try:
                await self._create_actors(attempt)
                return
            except Exception as e:
                if attempt == tries:
                    raise
                log.warning("starting the run's actors failed (%s); retrying", str(e).splitlines()[0])
                self._kill(self._created)
                await asyncio.sleep(2.0 * attempt)

    async def _create_actors(self, attempt: int) -> None:
        run, out = self.plan.run, self.plan.output
        schema = output_schema(self.workflow.result_columns())
        # Credits return only on commit: flush before half the credits sit in buffers.
        flush_rows = max(64, min(out.max_buffered_rows, run.max_concurrent_tasks // (2 * out.num_sinks)))
        settings = SinkSettings(str(self.out_dir), out.num_shards, self.run_id, out.flush_interval_s,
                                flush_rows, out.compression, out.keep, out.compact_min_files)
        sink_cls = _actor_class(ShardSink)
        self.sinks = [sink_cls.remote(settings, schema, i) for i in range(out.num_sinks)]
        self._created += self.sinks
        groups = plan_groups(self.workflow.roles, run.placement, run.num_workers, run.role_workers)
        handles = await self._start_workers(groups, attempt)
        router = Router({r: g.name for g in groups for r in g.roles}, {g.name: g.instances for g in groups})
        self._incarnations = await asyncio.gather(*[h.connect.remote(router, handles, self.sinks)
                                                    for hs in handles.values() for h in hs])
        self._actors = [h for hs in handles.values() for h in hs] + self.sinks
        self.router, self.handles = router, handles
        self._sink_boxes = [self._outbox(s.write.remote) for s in self.sinks]

    async def _start_workers(self, groups: list[Group], attempt: int = 1) -> dict[str, list[Any]]:
        """Worker actors, started and their places logged. ``run.spread_workers``
        asks Ray to spread them over the nodes (SPREAD: best effort, a node busy
        starting processes may be passed over); without it Ray packs these
        CPU-less actors onto the driver's node."""
        run = self.plan.run
        worker_cls = _actor_class(Worker)
        policy = StepPolicy(run.max_attempts, run.backoff_base_s, run.backoff_max_s)
        spread = {"scheduling_strategy": "SPREAD"} if run.spread_workers else {}
        slots = [(g, i) for g in groups for i in range(g.instances)]
        workers = [
            worker_cls.options(name=f"matrix-{self.run_id}-{g.name}-{i}" + (f"-r{attempt}" if attempt > 1 else ""),
                               **spread)
            .remote(WorkerSpec(g.name, i, g.roles, self.plan.workflow, run.seed, policy, run.batch_size,
                               run.batch_delay_ms / 1000, self.plan.output.num_shards, self.plan.services))
            for g, i in slots
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

    def _outbox(self, send: Callable[[list[Any]], Any]) -> Outbox:
        return Outbox(send, self.plan.run.batch_size, self.plan.run.batch_delay_ms / 1000)

    async def _admit_all(self, done_ids: set[str]) -> None:
        assert self._credit_event is not None
        first = self.workflow.first_role
        self.stats.t_admit_start = time.time()
        boxes = self._first_boxes = {(g, i): self._outbox(h.deliver.remote)
                                     for g, hs in self.handles.items() for i, h in enumerate(hs)}
        for n, item in enumerate(iter_input(self.plan.dataset)):
            if item.id in done_ids:
                self.stats.skipped_done += 1
                continue
            if item.id in self.inflight:
                self.stats.duplicates += 1
                continue
            while self.credits <= 0 and not self._stopping:
                for box in boxes.values():
                    box.flush()
                self._credit_event.clear()
                await self._credit_event.wait()
            if self._stopping:
                break
            self.credits -= 1
            self.inflight[item.id] = item
            self._admitted_at[item.id] = time.time()
            self.stats.in_flight = len(self.inflight)
            if item.row is None:
                self._sink_box(item.id).put(_failed_input(item))
                continue
            task = TaskState(item.id, item.row, first)
            try:
                self.workflow.validate_input(item.row)
            except ValueError as e:
                task.finish(FAILED, error_type="InputError", error=f"{item.where}: {e}")
                self._sink_box(item.id).put(task)
                continue
            boxes[self.router.route(first, item.id)].put(task)
            if n % 512 == 0:
                await asyncio.sleep(0)  # let the commit pollers run
        for box in boxes.values():
            box.flush()
        for box in self._sink_boxes:
            box.flush()

    def _sink_box(self, task_id: str) -> Outbox:
        return self._sink_boxes[sink_of(task_id, self.plan.output.num_shards, len(self._sink_boxes))]

    async def _poll_commits(self, sink: Any) -> None:
        assert self._credit_event is not None
        while True:
            try:
                acks = await sink.wait_commits.remote(1.0)
            except Exception as e:  # the sink is restarting; its buffered tasks time out and come back
                log.warning("sink unreachable (%s); retrying", e)
                await asyncio.sleep(1.0)
                continue
            for task_id, status, error_type, error, tokens in acks:
                if self.inflight.pop(task_id, None) is None:
                    continue
                self._admitted_at.pop(task_id, None)
                self.credits += 1
                if status == DUPLICATE:
                    self.stats.duplicates += 1
                else:
                    self.stats.record(status, error_type, error, tokens)
            if acks:
                self.stats.in_flight = len(self.inflight)
                self._credit_event.set()

    async def _watch_peers(self, interval_s: float = 2.0) -> None:
        """Re-admit tasks lost with a worker (Ray restarts it; we reconnect it)
        or stuck past ``run.task_timeout_s``. Sinks drop a second copy.

        A slow ping is not a loss: a worker busy with thousands of tasks on a
        loaded node answers late. Only a new incarnation (a restart) is."""
        keys = [(g, i) for g, hs in self.handles.items() for i in range(len(hs))]
        while True:
            await asyncio.sleep(interval_s)
            flags = await asyncio.gather(*[self._restarted(n, key) for n, key in enumerate(keys)])
            restarted = [key for key, flag in zip(keys, flags, strict=True) if flag]  # one slow worker delays none
            timeout = self.plan.run.task_timeout_s
            now = time.time()
            for task_id, t0 in list(self._admitted_at.items()):
                if (timeout > 0 and now - t0 > timeout) or self._was_on(task_id, restarted):
                    self._readmit(task_id)

    async def _restarted(self, n: int, key: tuple[str, int]) -> bool:
        worker = self.handles[key[0]][key[1]]
        try:
            incarnation = await asyncio.wait_for(worker.ping.remote(), 60)
        except Exception:  # busy, or dead and restarting: judged by the next ping
            return False
        if incarnation == self._incarnations[n]:
            return False
        self._incarnations[n] = await worker.connect.remote(self.router, self.handles, self.sinks)
        log.warning("worker %s/%d restarted; re-admitting the tasks it may have held", *key)
        return True

    def _was_on(self, task_id: str, restarted: list[tuple[str, int]]) -> bool:
        """Could the task have been on a restarted worker? Co-located, a task
        lives on one worker only; across role groups it could be anywhere."""
        if not restarted:
            return False
        if len(self.handles) == 1:
            return self.router.route(self.workflow.first_role, task_id) in restarted
        return True

    def _readmit(self, task_id: str) -> None:
        item = self.inflight.get(task_id)
        if item is None or item.row is None:
            return
        n = self._admissions[task_id] = self._admissions.get(task_id, 1) + 1
        self._admitted_at[task_id] = time.time()
        task = TaskState(task_id, item.row, self.workflow.first_role, attempt=n)
        if n > self.plan.run.max_attempts:
            task.finish(FAILED, error_type="TaskLost",
                        error=f"lost {n - 1} times (worker died or run.task_timeout_s passed)")
            self._sink_box(task_id).put(task)
        else:
            self.stats.readmitted += 1
            self._first_boxes[self.router.route(task.role, task_id)].put(task)

    async def _wait_in_flight(self) -> None:
        assert self._credit_event is not None
        deadline: float | None = None
        while self.inflight:
            for box in self._sink_boxes:
                box.flush()
            if self._stopping:
                deadline = deadline or time.time() + self.plan.run.drain_timeout_s
                if time.time() >= deadline:
                    log.warning("drain timeout: %d tasks abandoned (they run again on resume)", len(self.inflight))
                    return
            self._credit_event.clear()
            try:
                await asyncio.wait_for(self._credit_event.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def _show_progress(self) -> None:
        interval = self.plan.run.progress_interval_s
        if interval <= 0:
            return
        printer = ProgressPrinter()
        try:
            while True:
                await asyncio.sleep(interval)
                printer.show(self.stats)
        finally:
            printer.end()

    async def _close_sinks(self, pollers: list[asyncio.Task[None]]) -> None:
        # A final flush commits what is buffered; the pollers (still running) collect its acks.
        await asyncio.gather(*[s.close.remote() for s in self.sinks], return_exceptions=True)
        deadline = time.time() + 5.0
        while self.inflight and time.time() < deadline and not self._stopping:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2 if self._stopping else 0)
        for p in pollers:
            p.cancel()
        self.stats.in_flight = len(self.inflight)

    async def _stop_actors(self) -> list[dict[str, Any]]:
        workers = [h for hs in self.handles.values() for h in hs]
        stats = []
        try:
            stats = list(await asyncio.gather(*[w.stats.remote() for w in workers]))
            await asyncio.gather(*[w.close.remote() for w in workers], return_exceptions=True)
        finally:
            self._kill(self._actors)
        return stats

    @staticmethod
    def _kill(actors: list[Any]) -> None:
        import ray

        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass


def _actor_class(cls: type) -> Any:  # Any: a Ray ActorClass
    """Async actors that Ray restarts when they die (the driver reconnects and re-admits)."""
    import ray

    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": -1}
    return ray.remote(**options)(cls)


def _failed_input(item: InputItem) -> TaskState:
    task = TaskState(item.id, item.raw if item.raw is not None else {}, "")  # type: ignore[arg-type]
    task.finish(FAILED, error_type="InputError", error=item.error)
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
