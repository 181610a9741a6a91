"""A bare load generator: keeps C chat requests in flight against an endpoint, no runtime.

It is the yardstick of the pipeline benchmarks (same HTTP library, nothing
else in the way) and a capacity probe for real endpoints. ``mode='aiohttp'``
posts with a bare aiohttp session; ``mode='client'`` goes through
:class:`LLMClient` (routing, retries), so the two show the client's own cost.

    MATRIX_SIM_API_KEY=<the server's key> \
        python benchmarks/loadgen.py --url http://127.0.0.1:8000 --concurrency 1000 --duration-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo

from matrix_hpc.services.llm.client import LLMClient  # noqa: E402
from matrix_hpc.services.llm.config import ClientConf  # noqa: E402
from matrix_hpc.services.llm.contract import Secret  # noqa: E402
from matrix_hpc.services.llm.endpoints import StaticEndpoints, normalize_base_url  # noqa: E402
from matrix_hpc.services.llm.sim_server import API_KEY_ENV  # noqa: E402


@dataclass
class LoadReport:
    mode: str  # 'aiohttp' (bare session) or 'client' (LLMClient)
    concurrency: int
    calls: int  # calls completed in the measured window
    errors: int
    error_kinds: dict[str, int]  # exception type -> count, in the window
    unfinished_after_drain: int  # calls still open drain_timeout_s after the window (cancelled)
    retries: int  # attempts beyond the first (mode 'client'), whole run
    window_s: float
    calls_per_s: float
    completion_tokens_per_s: float
    client_cpu_s_per_call: float  # user+system CPU of this process per completed call
    latency_p50_s: float
    latency_p99_s: float


class _Window:
    """Counts completions after the warm-up mark."""

    def __init__(self) -> None:
        self.open = False
        self.calls = 0
        self.errors = 0
        self.tokens = 0
        self.latencies: list[float] = []
        self.error_kinds: Counter[str] = Counter()
        self.answered_callers = 0  # callers that got their first answer (warm-up ends when all did)

    def record(self, latency_s: float, tokens: int, error: Exception | None) -> None:
        if not self.open:
            return
        if error is None:
            self.calls += 1
            self.tokens += tokens
            self.latencies.append(latency_s)
        else:
            self.errors += 1
            self.error_kinds[type(error).__name__] += 1


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    url: str,
    concurrency: int,
    duration_s: float = 20.0,
    warmup_s: float = 2.0,
    mode: str = "aiohttp",
    model: str = "sim",
    max_tokens: int = 64,
    drain_timeout_s: float = 60.0,
    max_warmup_s: float = 300.0,
    api_key: Secret | None = None,
) -> LoadReport:
    """Keep ``concurrency`` requests in flight; measure ``duration_s`` of steady state.

    Warm-up lasts until every one of the ``concurrency`` callers has had an
    answer (at C = 10,000 the first wave alone takes C / throughput seconds),
    plus ``warmup_s``; at most ``max_warmup_s``. ``api_key``: the server's key
    (e.g. ``SimServerProcess.api_key``), sent as ``Authorization: Bearer``.
    """
    from matrix_hpc.services.llm.sim_server import raise_fd_limit

    raise_fd_limit()
    window = _Window()
    stop = asyncio.Event()
    send = _sender(mode, url, model, max_tokens, api_key or Secret(None))
    try:
        workers = [asyncio.ensure_future(_worker(i, send.call, window, stop)) for i in range(concurrency)]
        await _first_wave_done(window, concurrency, max_warmup_s)
        await asyncio.sleep(warmup_s)
        window.open, cpu0, t0 = True, _cpu_s(), time.perf_counter()
        await asyncio.sleep(duration_s)
        window.open, cpu1, t1 = False, _cpu_s(), time.perf_counter()
        stop.set()
        # In-flight calls finish (outside the window); a stuck one must not hang the run.
        _, stuck = await asyncio.wait(workers, timeout=drain_timeout_s)
        for worker in stuck:
            worker.cancel()
    finally:
        await send.close()
    lat = sorted(window.latencies) or [float("nan")]
    wall = t1 - t0
    return LoadReport(
        mode=mode,
        concurrency=concurrency,
        calls=window.calls,
        errors=window.errors,
        error_kinds=dict(window.error_kinds),
        unfinished_after_drain=len(stuck),
        retries=send.client.retries if mode == "client" else 0,
        window_s=round(wall, 3),
        calls_per_s=round(window.calls / wall, 1),
        completion_tokens_per_s=round(window.tokens / wall, 1),
        client_cpu_s_per_call=round((cpu1 - cpu0) / max(window.calls, 1), 7),
        latency_p50_s=round(lat[len(lat) // 2], 4),
        latency_p99_s=round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 4),
    )


async def _first_wave_done(window: _Window, concurrency: int, max_wait_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait_s
    # Polls a counter that thousands of callers bump: an Event set per bump would cost more than this.
    while window.answered_callers < concurrency and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def _worker(index: int, call: Any, window: _Window, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            tokens = await call(f"worker {index} request {n}: say something")
            window.record(time.perf_counter() - started, tokens, None)
        except Exception as exc:
            window.record(time.perf_counter() - started, 0, exc)
        if n == 0:
            window.answered_callers += 1
        n += 1


class _BareSender:
    def __init__(self, url: str, model: str, max_tokens: int, api_key: Secret):
        self.url = normalize_base_url(url) + "/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        headers = {"Authorization": f"Bearer {api_key.get()}"} if api_key else {}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)

    async def call(self, text: str) -> int:
        body = {"model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": self.max_tokens}
        async with self.session.post(self.url, json=body) as resp:
            data = await resp.json()
            resp.raise_for_status()
        return int(data["usage"]["completion_tokens"])

    async def close(self) -> None:
        await self.session.close()


class _ClientSender:
    def __init__(self, url: str, model: str, max_tokens: int, api_key: Secret):
        conf = ClientConf(timeout_s=600.0)
        self.client = LLMClient(StaticEndpoints([url]), conf, model=model, api_key=api_key)
        self.max_tokens = max_tokens

    async def call(self, text: str) -> int:
        result = await self.client.chat([{"role": "user", "content": text}], max_tokens=self.max_tokens)
        return result.usage.completion_tokens

    async def close(self) -> None:
        await self.client.close()


def _sender(mode: str, url: str, model: str, max_tokens: int, api_key: Secret) -> Any:
    if mode == "aiohttp":
        return _BareSender(url, model, max_tokens, api_key)
    if mode == "client":
        return _ClientSender(url, model, max_tokens, api_key)
    raise ValueError(f"mode must be 'aiohttp' or 'client', got {mode!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="endpoint base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=2.0, help="after every caller had one answer")
    parser.add_argument("--mode", choices=("aiohttp", "client"), default="aiohttp")
    parser.add_argument("--model", default="sim")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    api_key = Secret(os.environ.get(API_KEY_ENV))  # the key by environment, as the sim server takes it
    coro = run_load(args.url, args.concurrency, args.duration_s, args.warmup_s, args.mode, args.model, args.max_tokens,
                    api_key=api_key)
    print(json.dumps(asdict(run_in_loop(coro, args.loop))))


def run_in_loop(coro: Any, loop: str = "asyncio") -> Any:
    """Run ``coro`` on a fresh asyncio or uvloop event loop."""
    factory = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


if __name__ == "__main__":
    main()
