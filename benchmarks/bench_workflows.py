"""coral and natural_reasoning on a simulated LLM of fixed capacity: matrix_hpc
against the baselines the paper compares with.

One sim server (fixed capacity and latency) serves every system in turn:

- matrix_hpc: ``matrix-hpc run`` (peer-to-peer agents on a local Ray) with the
  sim as an OpenAI-compatible endpoint;
- asyncio: the same workflow (same prompts, same step functions, the same LLM
  client settings) driven by a single-process asyncio orchestrator, the
  paper's dialogue baseline; asyncio_gc: the same with Python's garbage
  collector tuned as a matrix_hpc worker tunes it (the fair measure of the
  runtime's own cost: the defaults cost this loop much of its time);
- ray_data (natural_reasoning only): batch-synchronous Ray Data, one
  ``map_batches`` per stage (filter, score, question), the extraction baseline.

Throughput is measured from the first task's start to the last task's end
(start-up excluded for both: Ray and actors for matrix_hpc, map_batches actors
for Ray Data, whose total with start-up is ``wall_with_startup_s``).

    python benchmarks/bench_workflows.py              # 600 dialogues, 3,000 documents
    python benchmarks/bench_workflows.py --quick      # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from make_workflow_samples import mmlu_pro_rows, web_doc_rows, write_jsonl  # noqa: E402

# The fixed service: 2 sim processes, 128 sequences at once in all, 50 ms to first token, 2 ms per token.
SIM = {"capacity": 128, "ttft_s": 0.05, "time_per_output_token_s": 0.002, "output_tokens": 48,
       "output_tokens_jitter": 16, "seed": 0}
SIM_WORKERS = 2
#: The variable `matrix-hpc run` reads the sim's key from (llm.openai.api_key_env names it; the key is never in argv).
RUN_KEY_ENV = "MATRIX_BENCH_SIM_API_KEY"
MATRIX_EXTRA: list[str] = []  # more `matrix-hpc run` overrides (--matrix-workers)
WORKFLOW_OVERRIDES = {
    "coral": ["workflow.max_turns=6", "workflow.speaker_max_tokens=96"],
    "natural_reasoning": ["workflow.min_score=1", "workflow.require_boxed=false"],
    # in-process environments (no sandbox); trials=1000: the rows' own trials all run (none filtered)
    "tau2": ["workflow.domain=retail", "workflow.max_steps=12", "workflow.trials=1000"],
}


def retail_rows(n: int) -> list[dict[str, Any]]:
    """tau2 retail task rows (tau2's trial seeds), as many trials as it takes to make ``n`` rows."""
    from matrix_hpc.workflows.tau2.rows import task_rows

    trials = -(-n // len(list(task_rows("retail"))))
    return list(task_rows("retail", trials=trials))[:n]


def start_sim(workdir: Path) -> tuple[subprocess.Popen[bytes], str, Any]:
    """A sim server asking for a fresh key, given to it in its environment (never argv, which /proc shows).

    Returns the process, its base URL and the key (a ``client.Secret``, for the clients)."""
    from matrix_hpc.services.llm.sim_server import API_KEY_ENV, new_api_key

    key = new_api_key()
    port_file = workdir / f"sim-{time.time_ns()}.port"
    proc = subprocess.Popen([sys.executable, "-m", "matrix_hpc.services.llm.sim_server", "--conf-json", json.dumps(SIM),
                             "--workers", str(SIM_WORKERS), "--port-file", str(port_file)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, API_KEY_ENV: key.get()})
    deadline = time.time() + 60
    while not port_file.exists():
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit("the sim server did not start")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text()}/v1", key


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def workflow_conf(name: str) -> Any:
    """The workflow's conf with the benchmark's overrides, as the CLI would build it."""
    from omegaconf import OmegaConf

    from matrix_hpc.cli.config_check import compose

    cfg = compose([f"workflow={name}", "dataset.path=x", "output.dir=x", *WORKFLOW_OVERRIDES[name]],
                  str(REPO / "conf"))
    return OmegaConf.to_object(cfg.workflow)


# -- matrix_hpc ----------------------------------------------------------------------


def run_matrix(name: str, data: Path, url: str, key: Any, concurrency: int, workdir: Path,
               model: str = "sim") -> dict[str, Any]:
    import pyarrow.parquet as pq

    from matrix_hpc.store.layout import data_files

    out = workdir / f"out-{name}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "matrix_hpc.cli.main", "run", f"workflow={name}", f"dataset.path={data}",
           f"output.dir={out}", "dataset.id_column=null", "llm=openai", f"llm.openai.base_url={url}",
           "llm.openai.dialect=vllm", f"llm.openai.api_key_env={RUN_KEY_ENV}", f"llm.openai.model={model}",
           # the client the asyncio orchestrator uses (ClientConf()): no cap on connections; llm=openai's
           # 256 (for a shared endpoint) held every matrix_hpc run here to 256 calls in flight
           "llm.client.max_connections=0",
           f"run.max_concurrent_tasks={concurrency}", "run.progress_interval_s=0", "run.summary=false",
           "run.num_cpus=2", *WORKFLOW_OVERRIDES[name], *MATRIX_EXTRA]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, RUN_KEY_ENV: key.get()})
    if proc.returncode != 0:
        raise SystemExit(f"matrix-hpc run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    t = pq.read_table(data_files(out), columns=["status", "prompt_tokens", "completion_tokens", "t_admitted",
                                                 "t_finished"]).to_pydict()
    return _measure(len(t["status"]), min(t["t_admitted"]), max(t["t_finished"]),
                    sum(t["prompt_tokens"]) + sum(t["completion_tokens"]), t["status"], sum(t["completion_tokens"]))


def _measure(n: int, t0: float, t1: float, tokens: int, statuses: list[str],
             out_tokens: int | None = None) -> dict[str, Any]:
    """``tokens_per_s``: prompt and output tokens; ``out_tokens_per_s`` (when given): output tokens only."""
    wall = max(1e-9, t1 - t0)
    found = {"tasks": n, "wall_s": round(wall, 2), "tasks_per_s": round(n / wall, 1),
             "tokens_per_s": round(tokens / wall), "ok": statuses.count("ok"), "failed": statuses.count("failed")}
    if out_tokens is not None:
        found["out_tokens_per_s"] = round(out_tokens / wall)
    return found


# -- the single-process asyncio orchestrator ---------------------------------------------


async def run_task(workflow: Any, task: Any, ctx: Any) -> Any:
    """One task, all its steps in this process: the central orchestrator's loop."""
    try:
        await _steps(workflow, task, ctx)
    finally:
        for svc in list(ctx.services.values()):  # what the runtime's task-end hook does (e.g. drop the env)
            hook = getattr(svc, "on_task_end", None)
            if hook is not None and asyncio.iscoroutine(res := hook(task.id)):
                await res
    return task


async def _steps(workflow: Any, task: Any, ctx: Any) -> None:
    from matrix_hpc.runtime.message import FAILED, FILTERED, OK
    from matrix_hpc.runtime.workflow import Filtered

    role = workflow.first_role
    while role is not None:
        try:
            await workflow.agent(role)(task, ctx)
        except Filtered as f:
            task.finish(FILTERED, reason=f.reason)
            return
        except Exception as e:  # no retries here: the baseline is kept simple
            task.finish(FAILED, error_type=type(e).__name__, error=str(e))
            return
        if task.status is not None:
            return
        role = workflow.next_role(task, role)
    task.finish(OK)


async def _asyncio_baseline(name: str, rows: list[dict[str, Any]], url: str, key: Any,
                            concurrency: int) -> dict[str, Any]:
    from matrix_hpc.runtime.message import TaskState
    from matrix_hpc.runtime.workflow import AgentContext, build_workflow
    from matrix_hpc.services.llm.client import LLMClient
    from matrix_hpc.services.llm.config import ClientConf
    from matrix_hpc.services.llm.endpoints import StaticEndpoints

    workflow = build_workflow(workflow_conf(name))
    client = LLMClient(StaticEndpoints([url]), ClientConf(), model="sim", api_key=key)
    ctx = AgentContext(0, {"llm": client})
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, row: dict[str, Any]) -> Any:
        async with gate:
            return await run_task(workflow, TaskState(str(i), row, workflow.first_role), ctx)

    t0 = time.time()
    tasks = await asyncio.gather(*(one(i, r) for i, r in enumerate(rows)))
    t1 = time.time()
    await client.close()
    tokens = sum((m["prompt_tokens"] or 0) + (m["completion_tokens"] or 0) for t in tasks for m in t.history)
    return _measure(len(tasks), t0, t1, tokens, [t.status for t in tasks])


def run_asyncio(name: str, rows: list[dict[str, Any]], url: str, key: Any, concurrency: int,
                worker_gc: bool = False) -> dict[str, Any]:
    """``worker_gc``: with the garbage collector tuned as a matrix_hpc worker tunes
    it (``runtime.worker._tune_gc``). Python's defaults cost this loop much of its
    time with thousands of dialogues alive (coral, 4,000 in flight: 13.6-14.5 s
    against 7.7-7.9 s); the tuned run is the fair measure of the runtime's own
    cost, the default one the orchestrator as it would usually be written."""
    import gc

    if not worker_gc:
        return asyncio.run(_asyncio_baseline(name, rows, url, key, concurrency))
    from matrix_hpc.runtime.worker import _tune_gc

    thresholds = gc.get_threshold()
    _tune_gc()
    try:
        return asyncio.run(_asyncio_baseline(name, rows, url, key, concurrency))
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


# -- batch-synchronous Ray Data ---------------------------------------------------------


class Stage:
    """A map_batches UDF running one natural_reasoning stage over a whole batch:
    the batch's calls go out together and the batch waits for the slowest."""

    def __init__(self, role: str, url: str, key: Any) -> None:  # key: a client.Secret, pickled to the actors
        from matrix_hpc.runtime.workflow import build_workflow

        self.role, self.url, self.key = role, url, key
        self.workflow = build_workflow(workflow_conf("natural_reasoning"))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run(self._run(batch))

    async def _run(self, batch: dict[str, Any]) -> dict[str, Any]:
        from matrix_hpc.runtime.message import TaskState
        from matrix_hpc.runtime.workflow import AgentContext, Filtered
        from matrix_hpc.services.llm.client import LLMClient
        from matrix_hpc.services.llm.config import ClientConf
        from matrix_hpc.services.llm.endpoints import StaticEndpoints

        client = LLMClient(StaticEndpoints([self.url]), ClientConf(), model="sim", api_key=self.key)
        ctx = AgentContext(0, {"llm": client})

        async def one(state_json: str) -> str:
            s = json.loads(state_json)
            if s["status"] is not None:
                return state_json
            s.setdefault("t0", time.time())
            task = TaskState(s["id"], s["input"], self.role)
            task.result, task.history = s["result"], s["history"]
            try:
                await self.workflow.agent(self.role)(task, ctx)
                if self.role == self.workflow.roles[-1]:
                    s["status"] = "ok"
            except Filtered:
                s["status"] = "filtered"
            except Exception:
                s["status"] = "failed"
            s["result"], s["history"], s["t1"] = task.result, task.history, time.time()
            return json.dumps(s)

        states = await asyncio.gather(*(one(x) for x in batch["state"]))
        await client.close()
        return {"state": list(states)}


def run_ray_data(rows: list[dict[str, Any]], url: str, key: Any, batch_size: int) -> dict[str, Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")])}})
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

        items = [{"state": json.dumps({"id": str(i), "input": r, "status": None, "result": {}, "history": []})}
                 for i, r in enumerate(rows)]
        ds = ray.data.from_items(items)
        for role in ("filter", "score", "question"):
            ds = ds.map_batches(Stage, fn_constructor_args=(role, url, key), batch_size=batch_size, concurrency=2)
        t0 = time.time()
        states = [json.loads(r["state"]) for r in ds.take_all()]
        wall_with_startup_s = time.time() - t0
    finally:
        ray.shutdown()
    tokens = sum((m["prompt_tokens"] or 0) + (m["completion_tokens"] or 0) for s in states for m in s["history"])
    # Like matrix_hpc's figure: first task started to last task ended (actor start-up before it excluded).
    result = _measure(len(states), min(s["t0"] for s in states), max(s["t1"] for s in states), tokens,
                      [s["status"] for s in states])
    result["wall_with_startup_s"] = round(wall_with_startup_s, 1)
    return result


# -- main ------------------------------------------------------------------------------------


def bench(name: str, rows: list[dict[str, Any]], concurrency: int, batch_size: int, workdir: Path) -> dict[str, Any]:
    data = write_jsonl(workdir / f"{name}.jsonl", iter(rows))
    results: dict[str, Any] = {}
    systems = ["matrix_hpc", "asyncio", "asyncio_gc"] + (["ray_data"] if name == "natural_reasoning" else [])
    for system in systems:
        sim, url, key = start_sim(workdir)  # a fresh server (and key) per system: same capacity, empty queues
        try:
            if system == "matrix_hpc":
                results[system] = run_matrix(name, data, url, key, concurrency, workdir)
            elif system in ("asyncio", "asyncio_gc"):  # asyncio_gc: the GC tuned as in a worker (run_asyncio)
                results[system] = run_asyncio(name, rows, url, key, concurrency, worker_gc=system == "asyncio_gc")
            else:
                results[system] = run_ray_data(rows, url, key, batch_size)
        finally:
            stop(sim)
        print(f"  {name:18s} {system:10s} {json.dumps(results[system])}", flush=True)
    base = results["matrix_hpc"]
    for system in systems[1:]:
        r = results[system]
        print(f"  {name:18s} matrix_hpc / {system}: tasks/s x{base['tasks_per_s'] / max(r['tasks_per_s'], 1e-9):.2f}, "
              f"tokens/s x{base['tokens_per_s'] / max(r['tokens_per_s'], 1e-9):.2f}", flush=True)
    return results


def main() -> None:
    global SIM_WORKERS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 dialogues, 1,000 documents")
    parser.add_argument("--concurrency", type=int, default=1000, help="tasks in flight (matrix_hpc and asyncio)")
    parser.add_argument("--batch-size", type=int, default=256, help="Ray Data map_batches batch size")
    parser.add_argument("--only", choices=["coral", "natural_reasoning", "tau2"])
    parser.add_argument("--trajectories", type=int, default=0, help="tau2 retail dialogues (default 342)")
    parser.add_argument("--capacity", type=int, default=SIM["capacity"], help="sequences the sim serves at once")
    parser.add_argument("--dialogues", type=int, help="coral tasks (overrides the default)")
    parser.add_argument("--documents", type=int, help="natural_reasoning tasks (overrides the default)")
    parser.add_argument("--matrix-workers", type=int, default=1, help="matrix_hpc worker processes (run.num_workers)")
    parser.add_argument("--sim-workers", type=int, default=SIM_WORKERS, help="sim server processes")
    args = parser.parse_args()
    SIM_WORKERS = args.sim_workers
    MATRIX_EXTRA.append(f"run.num_workers={args.matrix_workers}")
    n_dialogues, n_docs = (200, 1000) if args.quick else (600, 3000)
    n_dialogues, n_docs = args.dialogues or n_dialogues, args.documents or n_docs
    SIM["capacity"] = args.capacity
    print(f"sim service: {SIM_WORKERS} processes, {json.dumps(SIM)}")
    with tempfile.TemporaryDirectory(prefix="bench-workflows-") as tmp:
        out: dict[str, Any] = {}
        if args.only in (None, "coral"):
            rows = list(mmlu_pro_rows(n_dialogues))
            out["coral"] = bench("coral", rows, args.concurrency, args.batch_size, Path(tmp))
        if args.only in (None, "natural_reasoning"):
            out["natural_reasoning"] = bench("natural_reasoning", list(web_doc_rows(n_docs)), args.concurrency,
                                             args.batch_size, Path(tmp))
        if args.only in (None, "tau2"):
            out["tau2"] = bench("tau2", retail_rows(args.trajectories or 342), args.concurrency, args.batch_size,
                                Path(tmp))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
