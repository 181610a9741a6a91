#!/usr/bin/env python
"""Bare load generator against vLLM replicas: output tokens/s at a fixed concurrency.

No runtime, no router: ``--concurrency`` aiohttp coroutines each send chat
completions round-robin over the replicas until ``--requests`` are done. This
is the ceiling the full workflow run is compared with.

Either point it at running servers (``--urls``; their key, if they ask for
one, in ``$VLLM_API_KEY``, as vLLM itself reads it) or let it start replicas
on a local Ray (``--model``, ``--replicas``), send them the service's key, and
stop them afterwards.

Example::

    .venv/bin/python benchmarks/bench_vllm.py --model models/tiny-llama --replicas 2 --concurrency 64
    .venv/bin/python benchmarks/bench_vllm.py --urls http://127.0.0.1:8000/v1 http://127.0.0.1:8001/v1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

_WORDS = "agent task model answer question tool result reason step turn data value check score".split()


def make_prompt(rng: random.Random, n_words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(n_words))}]


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.post(url + "/chat/completions", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {data}")
    return int(data["usage"]["completion_tokens"]), time.perf_counter() - started


#: Where the key of --urls servers is read from (vLLM's own variable); never from argv.
KEY_ENV = "VLLM_API_KEY"


def auth_headers(api_key: Any) -> dict[str, str]:  # api_key: a client.Secret
    return {"Authorization": f"Bearer {api_key.get()}"} if api_key else {}


async def run_load(urls: list[str], model: str, args: argparse.Namespace, api_key: Any) -> dict[str, Any]:
    rng = random.Random(args.seed)
    bodies = [
        {"model": model, "messages": make_prompt(rng, args.prompt_words), "max_tokens": args.max_tokens,
         "ignore_eos": True, "temperature": 1.0}
        for _ in range(args.requests)
    ]
    targets = itertools.cycle(urls)
    queue = list(zip(targets, bodies, strict=False))  # targets is an endless cycle
    results: list[tuple[int, float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600),
                                     headers=auth_headers(api_key)) as session:
        await asyncio.gather(*[_one(session, u, {**b, "max_tokens": 4}) for u, b in queue[: len(urls)]])  # warm-up

        async def worker() -> None:
            while queue:
                url, body = queue.pop()
                results.append(await _one(session, url, body))

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        wall_s = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    latencies = sorted(lat for _, lat in results)
    return {
        "replicas": len(urls),
        "concurrency": args.concurrency,
        "requests": len(results),
        "max_tokens": args.max_tokens,
        "wall_s": round(wall_s, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall_s, 1),
        "requests_per_s": round(len(results) / wall_s, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
    }


def start_replicas(args: argparse.Namespace) -> tuple[Any, list[str]]:
    import ray

    from matrix_hpc.services.llm.vllm_replica import VLLMConf, start_vllm_service

    ray.init(namespace="matrix_hpc", include_dashboard=False)
    conf = VLLMConf(model=args.model, num_replicas=args.replicas, service="bench-vllm",
                    served_model_name="bench", max_model_len=args.max_model_len,
                    extra_engine_args=json.loads(args.engine_args), cpu_bind=args.cpu_bind)
    started = time.perf_counter()
    service = start_vllm_service(conf, Path(args.run_dir or tempfile.mkdtemp(prefix="bench-vllm-")))
    print(f"{args.replicas} replicas healthy after {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return service, [s["base_url"] for s in service.status()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--urls", nargs="*", default=[], help="base URLs of running servers (with /v1)")
    p.add_argument("--model", default="models/tiny-llama", help="model to serve when --urls is not given")
    p.add_argument("--served-model-name", default="", help="model name the --urls servers expect ('' = ask them)")
    p.add_argument("--replicas", type=int, default=2, help="replicas to start when --urls is not given")
    p.add_argument("--max-model-len", type=int, default=2048, help="context of started replicas")
    p.add_argument("--engine-args", default="{}",
                   help='extra engine args of started replicas, JSON: {"enforce-eager": true}')
    p.add_argument("--cpu-bind", default="spread", help="CPU core binding of started replicas: spread, auto, nobind")
    p.add_argument("--run-dir", default="", help="where started replicas log ('' = a temp dir)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--requests", type=int, default=1024, help="requests to send")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--prompt-words", type=int, default=32, help="prompt length in words")
    p.add_argument("--seed", type=int, default=0, help="prompt seed")
    args = p.parse_args(argv)
    from matrix_hpc.services.llm.contract import Secret

    service = None
    urls = list(args.urls)
    model = args.served_model_name
    api_key = Secret(os.environ.get(KEY_ENV))
    if not urls:
        service, urls = start_replicas(args)
        model, api_key = "bench", service.api_key
    try:
        if not model:
            model = asyncio.run(_model_of(urls[0], api_key))
        print(json.dumps(asyncio.run(run_load(urls, model, args, api_key))))
    finally:
        if service is not None:
            service.stop()
    return 0


async def _model_of(url: str, api_key: Any) -> str:
    async with (aiohttp.ClientSession(headers=auth_headers(api_key)) as session,
                session.get(url + "/models") as resp):
        if resp.status != 200:
            raise RuntimeError(f"{url}/models: HTTP {resp.status} (the servers' key goes in ${KEY_ENV})")
        return str((await resp.json())["data"][0]["id"])


if __name__ == "__main__":
    sys.exit(main())
