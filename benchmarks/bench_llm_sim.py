"""Bare load generator against the simulated endpoint: calls/s, tokens/s, CPU per call.

Starts a sim server in a child process, then, in this process, keeps C
requests in flight for each concurrency and mode:

- ``aiohttp``: a bare aiohttp session (the yardstick of the pipeline benchmark);
- ``client``: the same calls through ``LLMClient`` (routing, retries, parsing).

It reports calls/s, output tokens/s, latency, and the CPU seconds per call
of the client (this process) and of the server.

    python benchmarks/bench_llm_sim.py --concurrency 1000 10000 --duration-s 15
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.request
from dataclasses import asdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import run_in_loop, run_load  # noqa: E402
from matrix_hpc.services.llm.config import SimConf  # noqa: E402
from matrix_hpc.services.llm.sim_server import SimServerProcess  # noqa: E402


def server_cpu_s(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--modes", nargs="+", default=["aiohttp", "client"], choices=["aiohttp", "client"])
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0, help="after every caller had its first answer")
    parser.add_argument("--server-workers", type=int, default=1, help="sim server processes sharing the port")
    parser.add_argument("--ttft-s", type=float, default=0.5)
    parser.add_argument("--time-per-output-token-s", type=float, default=0.01)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="client event loop")
    parser.add_argument("--json-out", type=Path, help="append one JSON line per measurement here")
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds the `with` below, so the sim server child goes too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sim = SimConf(capacity=1_000_000, ttft_s=args.ttft_s, time_per_output_token_s=args.time_per_output_token_s,
                  output_tokens=64, output_tokens_jitter=16)
    rows = []
    with SimServerProcess(sim, workers=args.server_workers) as server:
        assert server.proc is not None
        for concurrency in args.concurrency:
            for mode in args.modes:
                cpu0 = server_cpu_s(server.proc.pid)
                report = run_in_loop(run_load(server.url, concurrency, args.duration_s, args.warmup_s, mode,
                                              max_tokens=args.max_tokens, api_key=server.api_key), args.loop)
                server_cpu = (server_cpu_s(server.proc.pid) - cpu0) / max(report.calls, 1)
                stats_req = urllib.request.Request(server.url + "/sim/stats",
                                                   headers={"Authorization": f"Bearer {server.api_key.get()}"})
                with urllib.request.urlopen(stats_req, timeout=30) as resp:
                    max_in_flight = json.load(resp)["max_in_flight"]
                row = {**asdict(report), "loop": args.loop, "server_cpu_s_per_call_incl_warmup": round(server_cpu, 7),
                       "server_workers": args.server_workers, "cpus": psutil.cpu_count(),
                       "server_max_in_flight_so_far": max_in_flight, "load_avg_1m": round(os.getloadavg()[0], 1),
                       "ttft_s": args.ttft_s, "time_per_output_token_s": args.time_per_output_token_s}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json_out:
                    with args.json_out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print()
    print("| concurrency | mode | calls/s | output tok/s | p50 s | p99 s | client CPU ms/call "
          "| server CPU ms/call | errors | load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['mode']} | {r['calls_per_s']:.0f} | {r['completion_tokens_per_s']:.0f} | "
              f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {1000 * r['client_cpu_s_per_call']:.3f} | "
              f"{1000 * r['server_cpu_s_per_call_incl_warmup']:.3f} | {r['errors']} | {r['load_avg_1m']} |")


if __name__ == "__main__":
    main()
