"""Runtime overhead on the LLM-free overhead workload (issue: foundation).

Runs each case in a fresh subprocess (its own local Ray) and prints tasks/s,
hops/s and the peak memory of the whole process tree (driver + Ray + actors),
then the resume skip-set build over 1,000,000 committed rows.

    python benchmarks/bench_overhead.py            # all cases
    python benchmarks/bench_overhead.py --quick    # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


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


def run_case(tasks: int, concurrency: int, placement: str, workdir: Path) -> dict:
    data = workdir / f"in-{tasks}.jsonl"
    if not data.exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_overhead_data.py"), "--rows", str(tasks),
                        "--out", str(data)], check=True, capture_output=True)
    out = workdir / f"out-{placement}-{tasks}-{concurrency}"
    report = workdir / f"report-{placement}-{tasks}-{concurrency}.json"
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(data), str(out), str(concurrency), placement,
                             str(report)], cwd=REPO)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"case {placement} {tasks}@{concurrency} failed with {proc.returncode}")
    result = json.loads(report.read_text())
    result["peak_tree_rss_gb"] = peak / 1e9
    return result


def child(data: str, out: str, concurrency: int, placement: str, report: str) -> None:
    """One run, in-process, reporting its own timing."""
    import asyncio

    import ray

    from matrix_hpc.config.schema import OutputConf, Placement, RunConf
    from matrix_hpc.runtime.driver import Driver, RunPlan
    from matrix_hpc.store.input import DatasetConf
    from matrix_hpc.workflows.overhead import OverheadConf

    ray.init(include_dashboard=False, logging_level="WARNING")
    plan = RunPlan(OverheadConf(), DatasetConf(path=data), OutputConf(dir=out),
                   RunConf(max_concurrent_tasks=concurrency, placement=Placement(placement), progress_interval_s=0))
    result = asyncio.run(Driver(plan).run())
    s = result.stats
    wall = (s.t_end or time.time()) - (s.t_admit_start or s.t_start)
    steps = sum(w["steps"] for w in result.worker_stats)
    Path(report).write_text(json.dumps({
        "placement": placement, "tasks": s.done, "concurrency": concurrency, "wall_s": wall,
        "tasks_per_s": s.done / wall, "hops_per_s": steps / wall,
        "remote_hops": sum(w["remote_hops"] for w in result.worker_stats),
    }))
    ray.shutdown()


def bench_resume(workdir: Path, rows: int) -> dict:
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
        "from matrix_hpc.store.resume import completed_ids\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"t = time.perf_counter(); ids = completed_ids(Path({str(out)!r})); dt = time.perf_counter() - t\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(len(ids), dt, (r1 - r0) / 1024, r1 / 1024)\n"
    )
    times, mems = [], []
    for _ in range(3):
        n, dt, delta_mb, peak_mb = subprocess.check_output([sys.executable, "-c", code], cwd=REPO, text=True).split()
        times.append(float(dt))
        mems.append(float(delta_mb))
    times.sort()
    mems.sort()
    return {"rows": int(n), "median_s": times[1], "median_extra_rss_mb": mems[1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        data, out, conc, placement, report = args.child
        child(data, out, int(conc), placement, report)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cases = [(2000, 1000), (20000, 10000)] if not args.quick else [(1000, 500)]
    print(f"cores: {os.cpu_count()}  workdir: {workdir}")
    print(f"{'placement':<10} {'tasks':>6} {'conc':>6} {'tasks/s':>9} {'hops/s':>9} {'peak GB':>8}")
    for tasks, conc in cases:
        for placement in ("colocated", "per_role"):
            r = run_case(tasks, conc, placement, workdir)
            print(f"{placement:<10} {r['tasks']:>6} {conc:>6} {r['tasks_per_s']:>9.0f} {r['hops_per_s']:>9.0f} "
                  f"{r['peak_tree_rss_gb']:>8.2f}", flush=True)
    rows = 1_000_000 if not args.quick else 100_000
    r = bench_resume(workdir, rows)
    print(f"resume skip set over {r['rows']:,} rows: {r['median_s']:.2f} s (median of 3), "
          f"+{r['median_extra_rss_mb']:.0f} MB RSS")


if __name__ == "__main__":
    main()
