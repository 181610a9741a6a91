"""Sandbox benchmark: start-to-ready latency, exec round trip, pool lease throughput.

    .venv/bin/python benchmarks/bench_sandbox.py                 # bwrap, 1/16/64 concurrent
    .venv/bin/python benchmarks/bench_sandbox.py --ray           # also the Ray pool's leases/s
    .venv/bin/python benchmarks/bench_sandbox.py --json out.json

- start-to-ready: ``start()`` plus the first exec (``true``) returning;
- exec round trip: ``exec(["true"])`` of already started sandboxes, with N
  sandboxes exec'ing at once (p50 / p99 over all execs);
- leases/s: acquire + release (start and stop of a sandbox included) with
  16 concurrent leasers, for the in-process pool and, with ``--ray``, for
  the Ray pool called from the driver.
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
import uuid
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from matrix_hpc.services.sandbox.client import make_sandbox_pool  # noqa: E402
from matrix_hpc.services.sandbox.contract import Sandbox, SandboxConf  # noqa: E402
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf  # noqa: E402
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf  # noqa: E402
from matrix_hpc.services.sandbox.registry import create_sandbox  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(values, 0.5) * 1e3, 1), "p99_ms": round(pct(values, 0.99) * 1e3, 1),
            "mean_ms": round(statistics.fmean(values) * 1e3, 1), "n": len(values)}


async def start_to_ready(conf: SandboxConf, sid: str) -> tuple[Sandbox, float]:
    sb = create_sandbox(conf, sid)
    t0 = time.perf_counter()
    await sb.start()
    r = await sb.exec(["true"])
    assert r.exit_code == 0, r
    return sb, time.perf_counter() - t0


async def bench_concurrency(conf: SandboxConf, n: int, execs: int) -> dict[str, Any]:
    started = await asyncio.gather(*(start_to_ready(conf, f"bench{n}-{i}") for i in range(n)))
    sandboxes = [sb for sb, _ in started]
    ready = [s for _, s in started]
    latencies: list[float] = []

    async def loop(sb: Sandbox) -> None:
        for _ in range(execs):
            t0 = time.perf_counter()
            r = await sb.exec(["true"])
            latencies.append(time.perf_counter() - t0)
            assert r.exit_code == 0, r

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(sb) for sb in sandboxes))
    wall = time.perf_counter() - t0
    await asyncio.gather(*(sb.stop() for sb in sandboxes))
    return {"concurrent": n, "start_to_ready": summary_ms(ready), "exec_round_trip": summary_ms(latencies),
            "execs_per_s": round(len(latencies) / wall, 1)}


async def bench_leases(conf: SandboxConf, leasers: int, leases: int) -> dict[str, Any]:
    pool = make_sandbox_pool(conf)
    done = 0

    async def leaser(k: int) -> None:
        nonlocal done
        while done < leases:
            done += 1
            leased = await pool.acquire(f"lease-{k}-{done}")
            await pool.release(leased)

    t0 = time.perf_counter()
    await asyncio.gather(*(leaser(k) for k in range(leasers)))
    wall = time.perf_counter() - t0
    await pool.close()
    return {"mode": conf.pool.mode, "leasers": leasers, "leases": done, "leases_per_s": round(done / wall, 1)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="mhpc-bench-")
    conf = SandboxConf(backend=args.backend, scratch_root=root, limits=SandboxLimitsConf(cgroup=args.cgroup))
    warm, _ = await start_to_ready(conf, "warm-up")  # one-time per-process probe of bubblewrap
    await warm.stop()
    results: dict[str, Any] = {"backend": args.backend, "cgroup": args.cgroup, "cpus": os.cpu_count(),
                               "load_avg_1m": os.getloadavg()[0], "concurrency": []}
    try:
        for n in args.concurrency:
            res = await bench_concurrency(conf, n, args.execs)
            results["concurrency"].append(res)
            print(json.dumps(res), flush=True)
        pool = SandboxPoolConf(mode="local", size=args.pool_size, max_per_node=args.pool_size, lease_wait_s=600)
        res = await bench_leases(SandboxConf(backend=args.backend, scratch_root=root, pool=pool,
                                             limits=conf.limits), 16, args.leases)
        results["pool_local"] = res
        print(json.dumps(res), flush=True)
        if args.ray:
            results["pool_ray"] = await bench_ray_pool(args, root)
            print(json.dumps(results["pool_ray"]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


async def bench_ray_pool(args: argparse.Namespace, root: str) -> dict[str, Any]:
    import ray

    from matrix_hpc.services.sandbox.ray_pool import shutdown_pool

    ray.init(include_dashboard=False, log_to_driver=False)
    pool = SandboxPoolConf(mode="ray", name=f"bench-{uuid.uuid4().hex[:6]}", size=args.pool_size,
                           max_per_node=args.pool_size, num_hosts=2, lease_wait_s=600)
    try:
        return await bench_leases(SandboxConf(backend=args.backend, scratch_root=root, pool=pool), 16, args.leases)
    finally:
        shutdown_pool(pool.name)
        ray.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="bwrap", choices=["bwrap", "trusted_subprocess"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--execs", type=int, default=20, help="execs per sandbox")
    parser.add_argument("--leases", type=int, default=300)
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--ray", action="store_true", help="also measure the Ray pool")
    parser.add_argument("--cgroup", default="auto", choices=["auto", "off", "required"])
    parser.add_argument("--json", help="write all results to this file")
    ns = parser.parse_args()
    out = asyncio.run(main(ns))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)
