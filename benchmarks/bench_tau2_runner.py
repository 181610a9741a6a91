"""matrix_hpc's workflow=tau2 against tau2-bench's own runner, on one llm=sim endpoint (the paper's comparison).

    .venv/bin/python benchmarks/bench_tau2_runner.py                                # retail, 228 dialogues
    .venv/bin/python benchmarks/bench_tau2_runner.py --domain telecom --trials 2 --concurrency 32 --best 1000
    .venv/bin/python benchmarks/bench_tau2_runner.py --sandbox disabled             # matrix_hpc's envs in-process

One sim server (matrix_hpc's OpenAI-compatible simulated LLM, started here
with a fresh key given to it in its environment) serves both systems. The
same tasks (the domain's ``base`` split, ``--trials`` each), the same step
limit, tau2's first message: dialogues of random text and random tool calls
that end at ``--max-steps``, so both do the same number of LLM calls.

- tau2: its ``run_domain`` (thread per dialogue, ``max_concurrency`` threads)
  in the venv where tau2-bench a2c02472 is installed (``--tau2-python``, not
  a matrix_hpc dependency), talking to the sim through litellm's
  OpenAI-compatible client (``openai/sim`` with ``api_base``; the key in
  ``OPENAI_API_KEY``);
- matrix_hpc: ``matrix-hpc run workflow=tau2`` at the same concurrency, then
  at ``--best``, its environments placed by ``--sandbox``: ``bwrap`` (the
  default: ``sandbox=bwrap workflow.require_sandbox=true``, so every task's
  environment is its own process, forked by the worker's warm server inside
  a bubblewrap sandbox; ``env_server=auto`` picks fork) or ``disabled``
  (in-process, ``sandbox=disabled``). Each run's rows say where their
  environment ran (``env_backend``: fork / sandbox / local), counted in the
  output; with bwrap, sandbox dirs left behind are counted too.

Tasks/s and tokens/s are over each system's first admission to last finish
(tau2: its simulations' start and end times). Load averages are printed
before and after: the box is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import bench_workflows as bw  # noqa: E402  (the sim server and the matrix-hpc run of the workflow benchmark)

from matrix_hpc.workflows.tau2.rows import task_rows  # noqa: E402

#: Runs inside tau2's venv: argv[1] a JSON of settings, the sim's key in OPENAI_API_KEY.
TAU2_DRIVER = r"""
import json, sys, os
from datetime import datetime
from tau2.data_model.simulation import TextRunConfig
from tau2.runner.batch import run_domain
s = json.loads(sys.argv[1])
args = {"api_base": s["url"], "temperature": 0.0}
config = TextRunConfig(domain=s["domain"], task_split_name="base", num_trials=s["trials"], num_tasks=s["num_tasks"],
                       max_concurrency=s["concurrency"], max_steps=s["max_steps"], save_to=s["save_to"],
                       llm_agent="openai/sim", llm_args_agent=args, llm_user="openai/sim", llm_args_user=args,
                       max_retries=0, log_level="ERROR")
results = run_domain(config)
tokens = 0
for sim in results.simulations:
    for m in sim.messages or []:
        usage = getattr(m, "usage", None) or {}
        tokens += int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
t0 = min(datetime.fromisoformat(x.start_time) for x in results.simulations)
t1 = max(datetime.fromisoformat(x.end_time) for x in results.simulations)
reasons = {}
for x in results.simulations:
    reasons[x.termination_reason.value] = reasons.get(x.termination_reason.value, 0) + 1
print("TAU2_RESULT " + json.dumps({"n": len(results.simulations), "wall_s": (t1 - t0).total_seconds(),
                                   "tokens": tokens, "reasons": reasons}))
import shutil
from tau2.utils.utils import DATA_DIR
shutil.rmtree(DATA_DIR / "simulations" / s["save_to"], ignore_errors=True)  # the run's results file, not kept
"""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_tau2(python: str, domain: str, num_tasks: int | None, trials: int, concurrency: int, max_steps: int,
             url: str, key: Any) -> dict[str, Any]:
    settings = {"url": url, "domain": domain, "num_tasks": num_tasks, "trials": trials, "concurrency": concurrency,
                "max_steps": max_steps, "save_to": f"bench-matrix-{time.time_ns()}"}
    env = {**os.environ, "OPENAI_API_KEY": key.get(), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([python, "-c", TAU2_DRIVER, json.dumps(settings)], capture_output=True, text=True,
                          env=env, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TAU2_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"tau2's runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(line.split(" ", 1)[1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wall = max(1e-9, r["wall_s"])
    return {"tasks": r["n"], "wall_s": round(wall, 2), "tasks_per_s": round(r["n"] / wall, 2),
            "tokens_per_s": round(r["tokens"] / wall), "termination": r["reasons"],
            "runner_cpu_s": round(cpu_s, 1)}  # the runner's own CPU (one process, its threads)


def run_matrix(data: Path, url: str, key: Any, concurrency: int, workdir: Path) -> dict[str, Any]:
    """bench_workflows' ``matrix-hpc run`` in a fresh ``workdir``, plus where the rows' environments ran."""
    import pyarrow.parquet as pq

    from matrix_hpc.store.layout import data_files

    workdir.mkdir()
    found = bw.run_matrix("tau2", data, url, key, concurrency, workdir)
    (out,) = workdir.glob("out-tau2-*")  # the run's output dir (bench_workflows names it)
    backends = pq.read_table(data_files(out), columns=["env_backend"]).column("env_backend").to_pylist()
    found["env_backend"] = {b: backends.count(b) for b in sorted(set(backends), key=str)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="retail", choices=["retail", "airline", "telecom"])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--num-tasks", type=int, help="the split's first N tasks (default: all of base)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32, help="dialogues in flight, both systems")
    parser.add_argument("--best", type=int, default=1000, help="matrix_hpc's own concurrency for the last run")
    parser.add_argument("--sandbox", default="bwrap", choices=["bwrap", "disabled"],
                        help="matrix_hpc's environments: bwrap = each task's forked in a bubblewrap sandbox "
                             "(default), disabled = in-process")
    parser.add_argument("--tau2-python", default="/work/tau2venv/bin/python")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    first = [r["task_id"] for r in task_rows(args.domain)][: args.num_tasks]  # the split's order, as tau2 cuts it
    rows = list(task_rows(args.domain, None, first, trials=args.trials))
    bw.WORKFLOW_OVERRIDES["tau2"] = [f"workflow.domain={args.domain}", f"workflow.max_steps={args.max_steps}",
                                     f"workflow.trials={args.trials}"]
    out: dict[str, Any] = {"domain": args.domain, "dialogues": len(rows), "max_steps": args.max_steps,
                           "sandbox": args.sandbox, "sim": bw.SIM, "sim_workers": bw.SIM_WORKERS,
                           "load_before": loadavg()}
    print(f"matrix_hpc's environments: sandbox={args.sandbox}", flush=True)
    print(f"load average before: {out['load_before']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-tau2-runner-") as tmp:
        scratch = Path(tmp) / "sandboxes"  # the sandboxes' dirs, here so that leftovers can be counted
        bw.WORKFLOW_OVERRIDES["tau2"] += (["sandbox=disabled"] if args.sandbox == "disabled" else
                                          ["sandbox=bwrap", "workflow.require_sandbox=true",
                                           f"sandbox.scratch_root={scratch}"])
        data = Path(tmp) / "tasks.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sim, url, key = bw.start_sim(Path(tmp))
        try:
            out["tau2_runner"] = run_tau2(args.tau2_python, args.domain, args.num_tasks, args.trials, args.concurrency,
                                          args.max_steps, url, key)
            print(f"tau2 runner, {args.concurrency} threads: {out['tau2_runner']}", flush=True)
            out["matrix_hpc"] = run_matrix(data, url, key, args.concurrency, Path(tmp) / "equal")
            print(f"matrix_hpc, {args.concurrency} in flight: {out['matrix_hpc']}", flush=True)
            out["matrix_hpc_best"] = run_matrix(data, url, key, args.best, Path(tmp) / "best")
            print(f"matrix_hpc, {args.best} in flight: {out['matrix_hpc_best']}", flush=True)
        finally:
            bw.stop(sim)
        if args.sandbox == "bwrap":
            out["sandbox_dirs_left"] = len(list(scratch.iterdir())) if scratch.exists() else 0
    out["load_after"] = loadavg()
    base = out["tau2_runner"]
    for name in ("matrix_hpc", "matrix_hpc_best"):
        r = out[name]
        r["x_tau2_tasks_per_s"] = round(r["tasks_per_s"] / max(base["tasks_per_s"], 1e-9), 2)
        r["x_tau2_tokens_per_s"] = round(r["tokens_per_s"] / max(base["tokens_per_s"], 1e-9), 2)
    print(f"load average after: {out['load_after']}")
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
