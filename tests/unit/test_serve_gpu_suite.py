"""benchmarks/gpu_suite.sh's summary (docs/serve.md, "GPU suite"): output tokens/s per system and
concurrency from the files the steps leave (vllm bench serve's result JSON, the steps' JSON lines),
ratios to the bare baseline, and a last line that says OK only when every number is there."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def steps() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_suite_steps", REPO / "benchmarks" / "gpu_suite_steps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results(results: Path, with_coral_at_8: bool) -> None:
    for conc, tps in ((4, 400.0), (8, 800.0)):  # the keys vllm bench serve --save-result writes
        (results / f"bare-c{conc}.json").write_text(json.dumps(
            {"max_concurrency": conc, "output_throughput": tps, "num_prompts": 2 * conc, "completed": 2 * conc,
             "failed": 0, "date": "20261130-013300"}))
    lines = [{"system": "pipeline", "concurrency": c, "tasks": 2 * c, "out_tokens_per_s": t, "failed": 0}
             for c, t in ((4, 380.0), (8, 720.0))]
    (results / "pipeline.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    corals = [(4, 200.0)] + ([(8, 1000.0)] if with_coral_at_8 else [])
    (results / "coral.jsonl").write_text("".join(json.dumps(
        {"system": "coral", "concurrency": c, "tasks": c, "out_tokens_per_s": t, "ok": c, "failed": 0}) + "\n"
        for c, t in corals))


def test_summary_gives_ratios_to_the_baseline_and_one_ok_line(tmp_path: Path) -> None:
    write_results(tmp_path, with_coral_at_8=True)
    lines, complete = steps().summary(tmp_path, [4, 8], [])
    assert complete and len(lines) == 1 + 6 + 1
    assert lines[-1] == ("GPU SUITE OK: out tok/s c=4: bare 400, pipeline 380 (0.95x), coral 200 (0.50x); "
                         "c=8: bare 800, pipeline 720 (0.90x), coral 1000 (1.25x)")
    assert lines[2].split() == ["4", "pipeline", "380", "0.95x", "8", "0"]


def test_a_missing_result_or_a_failed_step_makes_the_suite_incomplete(tmp_path: Path) -> None:
    write_results(tmp_path, with_coral_at_8=False)
    lines, complete = steps().summary(tmp_path, [4, 8], [])
    assert not complete and lines[-1].startswith("GPU SUITE INCOMPLETE (results missing): ")
    assert "coral -" in lines[-1] and any(line.split()[:3] == ["8", "coral", "missing"] for line in lines)
    write_results(tmp_path, with_coral_at_8=True)
    lines, complete = steps().summary(tmp_path, [4, 8], ["bare-c8"])
    assert not complete and lines[-1].startswith("GPU SUITE INCOMPLETE (bare-c8): ")
