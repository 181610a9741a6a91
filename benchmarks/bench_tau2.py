"""tau2 environment benchmark: a task's sandboxed environment from lease to ready, per domain and start mode.

    .venv/bin/python benchmarks/bench_tau2.py                        # bwrap, 1 and 8 concurrent, 3 domains, both modes
    .venv/bin/python benchmarks/bench_tau2.py --concurrency 1 64 512 --modes fork --json out.json

Start-to-ready is what the workflow's ``env`` role pays before a dialogue's
first turn, up to the answer to its first tool call:

- ``per_task``: lease a sandbox (start included), write the server's code and
  the domain's data into its scratch dir, start ``python -m matrix_hpc.workflows.tau2.server``
  and get the answer to ``open`` (the task's environment built inside);
- ``fork``: the worker's warm server (one sandbox, started once per process,
  its start reported apart as ``warm_start_s``) forks the task's process, which
  answers ``open``.

Also the in-process cost of a fresh environment (``sandbox=disabled``), the
memory the run added (``MemAvailable`` before and at the peak, all
environments open), and the load average before and after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from matrix_hpc.services.sandbox.client import make_sandbox_pool  # noqa: E402
from matrix_hpc.services.sandbox.contract import SandboxConf  # noqa: E402
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf  # noqa: E402
from matrix_hpc.workflows.tau2.db import data_dir  # noqa: E402
from matrix_hpc.workflows.tau2.sessions import EnvSessions  # noqa: E402
from matrix_hpc.workflows.tau2.tasks import build_environment, load_tasks  # noqa: E402


def summary_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(ordered[len(ordered) // 2] * 1e3, 1),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, 1),
            "mean_ms": round(statistics.fmean(values) * 1e3, 1), "n": len(values)}


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 1)[0]


async def sandboxed(domain: str, n: int, root: str, bind_data: bool, mode: str) -> dict[str, Any]:
    inside = f"/data/tau2_{domain}" if bind_data else None
    binds = [f"{data_dir(domain)}:{inside}:ro"] if inside else []
    pool = make_sandbox_pool(SandboxConf(backend="bwrap", scratch_root=root, binds=binds, pool=SandboxPoolConf(
        mode="local", size=n, max_per_node=n, lease_wait_s=600)))
    sessions = EnvSessions(domain, pool, start_timeout_s=600, request_timeout_s=60, data_dir_inside=inside,
                           env_server=mode)
    tasks = load_tasks(domain)
    load_before, mem_before = loadavg(), mem_available_mb()
    warm_start_s = None
    if mode == "fork":  # the warm server's own start, once per worker process: reported apart
        t0 = time.perf_counter()
        await sessions.open("warm", 1, tasks[0])
        warm_start_s = round(time.perf_counter() - t0, 3)
        await sessions.release("warm")

    async def one(i: int) -> float:
        t0 = time.perf_counter()
        env = await sessions.open(f"bench-{i}", 1, tasks[i % len(tasks)])
        await env.step([{"name": "calculate", "arguments": {"expression": "1+1"}, "requestor": "assistant"}]
                       if domain != "telecom" else
                       [{"name": "check_status_bar", "arguments": {}, "requestor": "user"}])
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    times = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    mem_used = mem_before - mem_available_mb()  # every environment still open here
    await sessions.close()
    await pool.close()
    return {"domain": domain, "mode": mode, "concurrent": n, "data": "bound" if bind_data else "copied",
            **summary_ms(list(times)), "wall_s": round(wall, 2), "warm_start_s": warm_start_s,
            "mem_mb_per_task": round(mem_used / n, 1), "load_before": load_before, "load_after": loadavg()}


def in_process(domain: str, n: int = 50) -> dict[str, Any]:
    tasks = load_tasks(domain)
    build_environment(domain, tasks[0])  # the template, once per process
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        build_environment(domain, tasks[i % len(tasks)])
        times.append(time.perf_counter() - t0)
    return {"domain": domain, "in_process": True, **summary_ms(times)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", nargs="+", default=["retail", "airline", "telecom"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["per_task", "fork"], choices=["per_task", "fork"])
    parser.add_argument("--bind-data", action="store_true", help="bind the data read-only instead of copying it")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    results = [in_process(d) for d in args.domains]
    root = tempfile.mkdtemp(prefix="bench-tau2-")
    try:
        for domain in args.domains:
            for n in args.concurrency:
                for mode in args.modes:
                    results.append(await sandboxed(domain, n, root, args.bind_data, mode))
                    print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for r in results[:len(args.domains)]:
        print(json.dumps(r))
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
