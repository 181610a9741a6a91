"""Runtime overhead on the LLM-free overhead workload (issue 9: the
guarantees must not cost speed).

Each case runs in a fresh subprocess (its own local Ray) and reports
tasks/s, hops/s and the peak memory of the whole process tree (driver + Ray
+ actors). Next to matrix_hpc it runs a *bare loop*: one process, one
asyncio loop, no Ray, the same workflow roles hopping through in-process
queues, the same Parquet rows written with the store's table builder, a
task's slot freed when its row is written. Every case is repeated and the
medians compared in the same run; the load average is printed before and
after (the figures mean little on a busy machine). Then the resume
skip-set build over 1,000,000 committed rows.

    python benchmarks/bench_overhead.py                # all cases, 3 repeats
    python benchmarks/bench_overhead.py --quick        # smaller
    python benchmarks/bench_overhead.py --repeats 5 --no-resume --cases 2000x1000 --placements colocated
    python benchmarks/bench_overhead.py --no-resume --cases 2000x1000 --checkouts /tmp/before,.   # before/after

``--checkouts`` runs matrix_hpc's cases from each copy of the repository
(e.g. a ``git worktree`` at the old commit), interleaved with this one's bare
loop, so that a before/after comparison sees the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
BARE = "bare"  # the baseline's name where a placement would be


def tree_rss_bytes(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def input_file(tasks: int, workdir: Path) -> Path:
    data = workdir / f"in-{tasks}.jsonl"
    if not data.exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_overhead_data.py"), "--rows", str(tasks),
                        "--out", str(data)], check=True, capture_output=True)
    return data


def run_case(tasks: int, concurrency: int, placement: str, workdir: Path, rep: int,
             checkout: Path | None = None) -> dict[str, Any]:
    """One run in a child process; ``placement`` is colocated, per_role or bare;
    ``checkout``: the repository copy whose matrix_hpc runs it (default: this one)."""
    data = input_file(tasks, workdir)
    tag = f"{placement}-{tasks}-{concurrency}-{rep}-{checkout.name if checkout else 'here'}"
    out, report = workdir / f"out-{tag}", workdir / f"report-{tag}.json"
    env = {**os.environ, "PYTHONPATH": str(checkout)} if checkout is not None else None
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(data), str(out), str(concurrency), placement,
                             str(report)], cwd=checkout or REPO, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"case {placement} {tasks}@{concurrency} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(report.read_text())
    result["peak_tree_rss_gb"] = peak / 1e9
    return result


def child(data: str, out: str, concurrency: int, placement: str, report: str) -> None:
    """One run, in-process, reporting its own timing (from the first admission to the verified end)."""
    if placement == BARE:
        Path(report).write_text(json.dumps(asyncio.run(BareLoop(data, out, concurrency).run())))
        return
    import ray

    from matrix_hpc.config.schema import OutputConf, Placement, RunConf
    from matrix_hpc.runtime.driver import Driver, RunPlan
    from matrix_hpc.runtime.progress import FINISHED
    from matrix_hpc.store.input import DatasetConf
    from matrix_hpc.workflows.overhead import OverheadConf

    try:  # Ray as a run starts it (nothing scrapes it: no metrics, lean); an older checkout: plain
        from matrix_hpc.cluster.local_ray import start_local_ray

        start_local_ray(None)
    except ImportError:
        ray.init(include_dashboard=False, logging_level="WARNING")
    plan = RunPlan(OverheadConf(), DatasetConf(path=data), OutputConf(dir=out),
                   RunConf(max_concurrent_tasks=concurrency, placement=Placement(placement), progress_interval_s=0))
    driver = Driver(plan)
    meter = CpuMeter(driver.stats)
    result = asyncio.run(driver.run())
    if result.outcome != FINISHED:
        raise SystemExit(f"the run ended {result.outcome}: {result.problems}")
    s = result.stats
    wall = (s.t_end or time.time()) - (s.t_admit_start or s.t_start)
    ws = result.worker_stats
    steps = sum(w["steps"] for w in ws)
    driver_calls = sum(b.batches_sent for b in [*driver._first_boxes.values(), *driver._sink_boxes])
    Path(report).write_text(json.dumps({
        "tasks": s.done, "wall_s": wall, "tasks_per_s": s.done / wall, "hops_per_s": steps / wall,
        "remote_hops": sum(w["remote_hops"] for w in ws),
        # Ray calls carrying tasks or their ends, per task: worker -> worker, worker -> sink, worker -> driver
        # (finished reports with ids), driver -> worker/sink (admissions)
        "calls_per_task": {k: sum(w.get(k, 0) for w in ws) / max(1, s.done)
                           for k in ("peer_calls", "sink_calls", "finished_reports")}
        | {"driver_calls": driver_calls / max(1, s.done)},
        "cpu_ms_per_task": {k: 1000 * v / max(1, s.done) for k, v in meter.spent().items()},
    }))
    ray.shutdown()


def process_kind(p: psutil.Process, root: int) -> str:
    """driver, worker, sink, raylet, gcs or other (Ray names its actor processes ``ray::Class``)."""
    if p.pid == root:
        return "driver"
    cmd = " ".join(p.cmdline()[:2])
    for marker, kind in (("ray::Worker", "worker"), ("ray::ShardSink", "sink"), ("raylet", "raylet"),
                         ("gcs_server", "gcs")):
        if marker in cmd:
            return kind
    return "other"


def cpu_by_kind(root: int) -> dict[str, float]:
    """CPU seconds (user + system) spent so far by each kind of process in the tree."""
    out: dict[str, float] = {}
    top = psutil.Process(root)
    for p in [top, *top.children(recursive=True)]:
        try:
            kind, t = process_kind(p, root), p.cpu_times()
        except psutil.Error:
            continue
        out[kind] = out.get(kind, 0.0) + t.user + t.system
    return out


class CpuMeter:
    """The process tree's CPU between the run's first admission and its end
    (``RunStats.t_admit_start`` / ``t_end``, polled by a thread), per kind
    of process: less sensitive to other load than the wall time."""

    POLL_S = 0.01

    def __init__(self, stats: Any) -> None:
        import threading

        self.stats = stats
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.stats.t_admit_start is None:
            time.sleep(self.POLL_S)
        self.start = cpu_by_kind(os.getpid())
        while self.stats.t_end is None:  # set before the sinks close and the actors stop
            time.sleep(self.POLL_S)
        self.end = cpu_by_kind(os.getpid())

    def spent(self) -> dict[str, float]:
        self._thread.join(timeout=5.0)
        spent = {k: v - self.start.get(k, 0.0) for k, v in self.end.items()}
        return {**spent, "total": sum(spent.values())}


class BareLoop:
    """The baseline: one process, one asyncio loop, no Ray.

    Each role has an in-process queue and a consumer that starts the step of
    every message it takes; a task hops role to role through the queues (the
    same workflow, the same steps, the same seeds). Finished tasks are
    buffered and written as matrix_hpc's sinks write them (one file per shard
    per flush, the same flush period and threshold, the store's table builder
    and atomic write), and a task's slot is freed when its row is written.
    """

    def __init__(self, data: str, out: str, concurrency: int, flush_interval_s: float = 0.2,
                 num_shards: int = 4, num_sinks: int | None = None, max_buffered_rows: int = 20000) -> None:
        from matrix_hpc.runtime.workflow import AgentContext, build_workflow
        from matrix_hpc.store.input import DatasetConf
        from matrix_hpc.store.rows import output_schema
        from matrix_hpc.workflows.overhead import OverheadConf

        self.dataset = DatasetConf(path=data)
        self.out = Path(out)
        self.workflow = build_workflow(OverheadConf())
        self.ctx = AgentContext(0)
        self.schema = output_schema(self.workflow.result_columns())
        self.concurrency = concurrency
        self.num_shards = num_shards
        self.flush_interval_s = flush_interval_s
        if num_sinks is None:  # as a run on this machine chooses it
            try:
                from matrix_hpc.store.conf import OutputConf, resolved_num_sinks
                num_sinks = resolved_num_sinks(OutputConf(dir=out, num_shards=num_shards), os.cpu_count() or 1)
            except ImportError:  # a checkout from before output.num_sinks=null (--checkouts)
                num_sinks = 2
        self.flush_rows = max(64, min(max_buffered_rows, concurrency // (2 * num_sinks)))  # as the driver sets it
        self.steps = 0
        self.rows = 0
        self.files = 0
        self.buffer: list[Any] = []  # finished TaskStates

    async def run(self) -> dict[str, Any]:
        from matrix_hpc.runtime.message import TaskState
        from matrix_hpc.store.input import iter_input

        self.slots = asyncio.Semaphore(self.concurrency)
        self.queues: dict[str, asyncio.Queue[Any]] = {role: asyncio.Queue() for role in self.workflow.roles}
        self.wrote = asyncio.Event()
        self.running: set[asyncio.Task[None]] = set()
        loops = [asyncio.ensure_future(self._consume(role)) for role in self.workflow.roles]
        loops.append(asyncio.ensure_future(self._flush_periodically()))
        t0, cpu0, admitted = time.time(), time.process_time(), 0
        first = self.workflow.first_role
        for item in iter_input(self.dataset):
            await self.slots.acquire()
            self.queues[first].put_nowait(TaskState(item.id, item.row or {}, first))
            admitted += 1
        while self.rows < admitted:
            self.wrote.clear()
            await self.wrote.wait()
        wall, cpu_ms = time.time() - t0, 1000 * (time.process_time() - cpu0)
        for loop in loops:
            loop.cancel()
        return {"tasks": self.rows, "wall_s": wall, "tasks_per_s": self.rows / wall, "hops_per_s": self.steps / wall,
                "cpu_ms_per_task": {"total": cpu_ms / max(1, self.rows)}}

    async def _consume(self, role: str) -> None:
        queue = self.queues[role]
        while True:
            task = await queue.get()
            step = asyncio.ensure_future(self._step(role, task))
            self.running.add(step)
            step.add_done_callback(self.running.discard)

    async def _step(self, role: str, task: Any) -> None:
        from matrix_hpc.runtime.message import OK

        await self.workflow.agent(role)(task, self.ctx)
        self.steps += 1
        task.hops += 1
        nxt = self.workflow.next_role(task, role) if task.status is None else None
        if nxt is not None:
            task.role = nxt
            self.queues[nxt].put_nowait(task)
            return
        task.finish(OK)
        self.buffer.append(task)
        if len(self.buffer) >= self.flush_rows:
            await self._flush()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self._flush()

    async def _flush(self) -> None:
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        await asyncio.to_thread(self._write, batch)
        self.rows += len(batch)
        for _ in batch:
            self.slots.release()
        self.wrote.set()

    def _write(self, tasks: list[Any]) -> None:
        from matrix_hpc.store.layout import shard_dir, shard_of, write_table_atomic
        from matrix_hpc.store.rows import tasks_to_table

        by_shard: dict[int, list[Any]] = {}
        for t in tasks:
            by_shard.setdefault(shard_of(t.id, self.num_shards), []).append(t)
        for shard, rows in sorted(by_shard.items()):
            self.files += 1
            path = shard_dir(self.out, shard) / f"part-bare-{self.files:06d}.parquet"
            write_table_atomic(tasks_to_table(rows, "bare", self.schema), path)


def bench_resume(workdir: Path, rows: int) -> dict[str, Any]:
    """Build an output dir with ``rows`` committed rows, then time the skip set in a fresh process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matrix_hpc.store.layout import shard_dir, shard_of

    out = workdir / f"resume-{rows}"
    if not out.exists():
        per_file, shards = 25_000, 16
        for start in range(0, rows, per_file):
            ids = [f"task-{i:09d}" for i in range(start, min(rows, start + per_file))]
            by_shard: dict[int, list[str]] = {}
            for i in ids:
                by_shard.setdefault(shard_of(i, shards), []).append(i)
            for shard, sids in by_shard.items():
                t = pa.table({"id": sids, "status": ["ok"] * len(sids), "input": ['{"q": "x"}'] * len(sids)})
                path = shard_dir(out, shard) / f"part-bench-{start:09d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(t, path)
    code = (
        "import resource, time; from pathlib import Path\n"
        "from matrix_hpc.store.resume import scan_output\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"t = time.perf_counter(); ids = scan_output(Path({str(out)!r})).done; dt = time.perf_counter() - t\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(len(ids), dt, (r1 - r0) / 1024, r1 / 1024)\n"
    )
    times, mems = [], []
    n = "0"
    for _ in range(3):
        n, dt, delta_mb, _peak_mb = subprocess.check_output([sys.executable, "-c", code], cwd=REPO, text=True).split()
        times.append(float(dt))
        mems.append(float(delta_mb))
    return {"rows": int(n), "median_s": statistics.median(times), "median_extra_rss_mb": statistics.median(mems)}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_cases(cases: list[tuple[int, ...]], placements: list[str], repeats: int, workdir: Path,
                checkouts: list[Path | None]) -> None:
    """Every placement (of every checkout) and the bare loop, interleaved per
    repeat (so a load change hits all alike); medians, and matrix_hpc's ratio
    to the bare loop. Each run's load average is printed beside it."""
    for tasks, conc in cases:
        keys = [(p, c) for c in checkouts for p in placements] + [(BARE, None)]
        runs: dict[tuple[str, Path | None], list[dict[str, Any]]] = {k: [] for k in keys}
        for rep in range(repeats):
            for p, c in keys:
                before = load_average()
                r = run_case(tasks, conc, p, workdir, rep, c)
                runs[(p, c)].append(r)
                print(f"  {case_label(p, c)} {tasks}@{conc} #{rep + 1}: {r['tasks_per_s']:.0f} tasks/s, "
                      f"CPU ms/task {fmt_per_task(r.get('cpu_ms_per_task', {}))}, "
                      f"Ray calls/task {fmt_per_task(r.get('calls_per_task', {}))} "
                      f"(load average before {before}, after {load_average()})", flush=True)
        bare = statistics.median(r["tasks_per_s"] for r in runs[(BARE, None)])
        print(f"{'case':<10} {'tasks':>6} {'conc':>6} {'tasks/s (median)':>17} {'all runs':>24} {'hops/s':>9} "
              f"{'peak GB':>8} {'vs bare':>8} {'CPU ms/task':>12}")
        for (p, c), rs in runs.items():
            rate = statistics.median(r["tasks_per_s"] for r in rs)
            each = "/".join(f"{r['tasks_per_s']:.0f}" for r in rs)
            cpu = statistics.median(r.get("cpu_ms_per_task", {}).get("total", float("nan")) for r in rs)
            print(f"{p:<10} {rs[0]['tasks']:>6} {conc:>6} {rate:>17.0f} {each:>24} "
                  f"{statistics.median(r['hops_per_s'] for r in rs):>9.0f} "
                  f"{max(r['peak_tree_rss_gb'] for r in rs):>8.2f} {rate / bare:>7.2f}x {cpu:>12.2f}"
                  f"{'' if c is None else f'  [{c}]'}", flush=True)


def fmt_per_task(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in values.items()) or "-"


def case_label(placement: str, checkout: Path | None) -> str:
    return placement if checkout is None else f"{placement} [{checkout}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=5)
    ap.add_argument("--quick", action="store_true", help="one small case")
    ap.add_argument("--cases", default="2000x1000,20000x10000", help="TASKSxCONCURRENCY, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (medians are reported); at least 3")
    ap.add_argument("--placements", default="colocated,per_role", help="comma-separated matrix_hpc placements")
    ap.add_argument("--no-resume", action="store_true", help="skip the resume skip-set benchmark")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--checkouts", default="", help="comma-separated repository copies to compare (default: this one)")
    args = ap.parse_args()
    if args.child:
        data, out, conc, placement, report = args.child
        child(data, out, int(conc), placement, report)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cases = [tuple(map(int, c.split("x"))) for c in args.cases.split(",")] if not args.quick else [(1000, 500)]
    print(f"cores: {os.cpu_count()}  workdir: {workdir}  repeats: {args.repeats}")
    print(f"load average before: {load_average()}")
    checkouts: list[Path | None] = [Path(c).resolve() for c in args.checkouts.split(",") if c] or [None]
    bench_cases(cases, args.placements.split(","), max(3, args.repeats), workdir, checkouts)
    if not args.no_resume:
        rows = 1_000_000 if not args.quick else 100_000
        r = bench_resume(workdir, rows)
        print(f"resume skip set over {r['rows']:,} rows: {r['median_s']:.2f} s (median of 3), "
              f"+{r['median_extra_rss_mb']:.0f} MB RSS")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
