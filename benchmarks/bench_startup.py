"""Start-up of ``matrix-hpc run``: time to the first admitted task, and where it goes (issue 16).

Runs the real CLI in a fresh process, as a user would, with
``MATRIX_HPC_STARTUP_TRACE=1`` (matrix_hpc/startup.py prints the end of each
phase), each case ``--repeats`` times, the cases interleaved. Prints the load
average before and after each run, then per case the median time since the
process started at the end of each phase, the median phase durations, and the
whole command's wall time.

    python benchmarks/bench_startup.py                         # overhead, generate on llm=sim, the 40-row demo
    python benchmarks/bench_startup.py --cases overhead --repeats 5
    python benchmarks/bench_startup.py --cases demo --demo-llm vllm   # `make demo`'s job itself (starts vLLM)
    python benchmarks/bench_startup.py --checkouts /tmp/before,.      # two checkouts (git worktree), interleaved

Cases: ``overhead`` (the overhead workload, 200 rows, default placement),
``generate_sim`` (``workflow=generate llm=sim``, 200 rows), ``demo`` (`make
demo`'s job: coral on the 40-row MMLU-Pro sample; ``--demo-llm sim`` by
default, where nothing heavy starts).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "matrix-hpc")
TRACE = re.compile(r"^matrix-hpc startup: (\w+) \+([\d.]+) s")
TARGET_PHASE = "first_admitted"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def case_args(case: str, data: Path, demo_llm: str) -> list[str]:
    if case == "overhead":
        return ["workflow=overhead", f"dataset.path={data}"]
    if case == "generate_sim":
        return ["workflow=generate", "llm=sim", f"dataset.path={data}"]
    if case == "demo":  # the Makefile's demo target, its LLM swappable
        replicas = "llm.vllm.num_replicas=2" if demo_llm == "vllm" else "llm.sim.num_replicas=2"
        return ["workflow=coral", "dataset=mmlu_pro_sample", f"llm={demo_llm}", replicas, "workflow.max_turns=4",
                "workflow.speaker_max_tokens=48", "run.max_concurrent_tasks=64"]
    raise SystemExit(f"unknown case {case!r}; valid: overhead, generate_sim, demo")


def run_once(case: str, data: Path, out: Path, demo_llm: str, checkout: Path | None) -> dict[str, float]:
    """One fresh ``matrix-hpc run``: the phase offsets it traced, and its wall time as ``wall``.
    ``checkout``: another copy of the repository, run as ``python -m matrix_hpc.cli.main`` from there."""
    env = {**os.environ, "MATRIX_HPC_STARTUP_TRACE": "1"}
    cli = [CLI]
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
        cli = [sys.executable, "-m", "matrix_hpc.cli.main"]
    cmd = [*cli, "run", *case_args(case, data, demo_llm), f"output.dir={out}", "run.progress_interval_s=0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout or REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{case}: exit code {proc.returncode}\n{proc.stderr[-3000:]}")
    phases = {m.group(1): float(m.group(2)) for line in proc.stderr.splitlines() if (m := TRACE.match(line))}
    return {**phases, "wall": wall}


def report(case: str, runs: list[dict[str, float]]) -> None:
    order = [p for p in runs[0] if p != "wall"]
    print(f"\n{case}: medians of {len(runs)} runs (s since the process started; phase duration)")
    previous = 0.0
    for phase in order:
        at = statistics.median(r[phase] for r in runs if phase in r)
        print(f"  {phase:<24} {at:7.2f}  {at - previous:+7.2f}")
        previous = at
    firsts = [r[TARGET_PHASE] for r in runs if TARGET_PHASE in r]
    whole = statistics.median(r["wall"] for r in runs)
    print(f"  to the first admitted task: median {statistics.median(firsts):.2f} s "
          f"(min {min(firsts):.2f}, max {max(firsts):.2f}); whole command {whole:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="overhead,generate_sim,demo", help="comma-separated: overhead,generate_sim,demo")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (medians; >= 3)")
    ap.add_argument("--rows", type=int, default=200, help="input rows of the overhead and generate_sim cases")
    ap.add_argument("--demo-llm", default="sim", choices=("sim", "vllm"), help="the demo case's LLM")
    ap.add_argument("--checkouts", default="", help="comma-separated repository copies to compare (default: this one)")
    args = ap.parse_args()
    checkouts: list[Path | None] = [Path(c).resolve() for c in args.checkouts.split(",") if c] or [None]
    cases = [(c, k) for c in args.cases.split(",") for k in checkouts]
    results: dict[tuple[str, Path | None], list[dict[str, float]]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        data = Path(tmp) / "in.jsonl"
        subprocess.run([sys.executable, str(REPO / "scripts/make_overhead_data.py"), "--rows", str(args.rows),
                        "--out", str(data)], check=True, capture_output=True)
        for rep in range(args.repeats):
            for n, (case, checkout) in enumerate(cases):  # interleaved: a busy spell hits every case alike
                before = loadavg()
                r = run_once(case, data, Path(tmp) / f"out-{n}-{rep}", args.demo_llm, checkout)
                results[(case, checkout)].append(r)
                print(f"{label(case, checkout)} #{rep + 1}: first admitted {r.get(TARGET_PHASE, float('nan')):.2f} s, "
                      f"first committed {r.get('first_committed', float('nan')):.2f} s, whole {r['wall']:.2f} s; "
                      f"loadavg before {before}, after {loadavg()}", flush=True)
    for case, checkout in cases:
        report(label(case, checkout), results[(case, checkout)])


def label(case: str, checkout: Path | None) -> str:
    return case if checkout is None else f"{case} [{checkout}]"


if __name__ == "__main__":
    main()
