"""Steps of benchmarks/gpu_suite.sh that need matrix_hpc's Python (docs/serve.md, "GPU suite").

    python benchmarks/gpu_suite_steps.py coral --base-url URL --model NAME --api-key-env VAR \\
        --concurrency 64 --dialogues 128 --json-out results/coral.jsonl
    python benchmarks/gpu_suite_steps.py summary RESULTS_DIR

``coral``: ``matrix-hpc run workflow=coral`` against a running OpenAI-compatible server (the key in
the variable VAR, never in argv), output tokens/s from the rows' own token counts and times.
``summary``: the output tokens/s of ``vllm bench serve`` (its saved JSON), the LLM pipeline and Coral
per concurrency, the ratios to the bare baseline, and one last line that sums it up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "scripts")]


def coral(args: argparse.Namespace) -> int:
    from bench_workflows import run_matrix
    from make_workflow_samples import mmlu_pro_rows, write_jsonl

    from matrix_hpc.services.llm.service import read_api_key

    key = read_api_key(args.api_key_env)
    with tempfile.TemporaryDirectory(prefix="gpu-suite-coral-") as tmp:
        data = write_jsonl(Path(tmp) / "coral.jsonl", mmlu_pro_rows(args.dialogues))
        found = run_matrix("coral", data, args.base_url, key, args.concurrency, Path(tmp), model=args.model)
    line = {"system": "coral", "concurrency": args.concurrency, **found}
    print(json.dumps(line), flush=True)
    with args.json_out.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return 0


def load_results(results: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(system, concurrency) -> result: bare from vllm bench serve's files (bare-c<C>.json), the
    others from the JSON lines the steps appended (*.jsonl)."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(results.glob("bare-c*.json")):
        data = json.loads(path.read_text())
        found["bare", int(data["max_concurrency"])] = {
            "out_tokens_per_s": data["output_throughput"],
            "failed": data.get("failed", data["num_prompts"] - data["completed"]),
            "tasks": data["num_prompts"]}
    for path in sorted(results.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            found[row["system"], int(row["concurrency"])] = row
    return found


def summary(results: Path, concurrency: list[int], failed_steps: list[str]) -> tuple[list[str], bool]:
    """Lines to print (a table, then the one-line summary) and whether every number is there."""
    found = load_results(results)
    systems = ("bare", "pipeline", "coral")
    lines = [f"{'concurrency':>11}  {'system':<9} {'out tok/s':>10} {'vs bare':>8} {'tasks':>6} {'failed':>6}"]
    parts, complete = [], not failed_steps
    for conc in concurrency:
        bare = found.get(("bare", conc), {}).get("out_tokens_per_s") or 0.0
        cells = []
        for system in systems:
            row = found.get((system, conc))
            if row is None:
                complete = False
                lines.append(f"{conc:>11}  {system:<9} {'missing':>10}")
                cells.append(f"{system} -")
                continue
            tps = float(row["out_tokens_per_s"])
            ratio = f"{tps / bare:.2f}x" if bare else "-"
            lines.append(f"{conc:>11}  {system:<9} {tps:>10.0f} {ratio:>8} {row.get('tasks', '-'):>6} "
                         f"{row.get('failed', '-'):>6}")
            cells.append(f"{system} {tps:.0f}" + (f" ({ratio})" if system != "bare" else ""))
        parts.append(f"c={conc}: " + ", ".join(cells))
    verdict = "OK" if complete else "INCOMPLETE (" + (", ".join(failed_steps) or "results missing") + ")"
    lines.append(f"GPU SUITE {verdict}: out tok/s " + "; ".join(parts))
    return lines, complete


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("coral")
    c.add_argument("--base-url", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--api-key-env", required=True, help="variable holding the server's key")
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--dialogues", type=int, required=True)
    c.add_argument("--json-out", type=Path, required=True)
    s = sub.add_parser("summary")
    s.add_argument("results", type=Path)
    s.add_argument("--concurrency", type=int, nargs="+", required=True)
    s.add_argument("--failed", nargs="*", default=[], help="steps that failed")
    args = p.parse_args()
    if args.step == "coral":
        return coral(args)
    lines, complete = summary(args.results, args.concurrency, args.failed)
    print("\n".join(lines))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
