"""Regenerate tests/data/tau2_golden/ from real tau2-bench (the reference).

This script runs OUTSIDE matrix_hpc's venv, in a venv where tau2-bench at
commit a2c02472 is installed (``pip install -e <checkout>``; its data folder
must hold the domain files from ../shared/data). It replays action lists
through tau2's own environments exactly as tau2's evaluator replays gold
actions -- a fresh environment per task, ``set_state`` with the task's
initialisation data and actions, then ``Environment.make_tool_call`` per action
with no sync in between -- and writes, per task, what the caller sees
(``to_json_str`` of the result, or ``"Error: " + message``), the ok flag and
both DB hashes. Input and output lines have the interface of
``python -m matrix_hpc.workflows.tau2 replay``.

Example (regenerates everything the tests compare)::

    /work/tau2venv/bin/python scripts/tau2_golden.py --tau2-root /work/tau2ref --all

One domain, gold actions of one split, or a custom action list::

    python scripts/tau2_golden.py --tau2-root /work/tau2ref --domain telecom --split base --output t.jsonl
    python scripts/tau2_golden.py --tau2-root /work/tau2ref --domain retail --input probes.jsonl --output p.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT / "tests" / "data" / "tau2_golden"
DOMAINS = ("retail", "airline", "telecom")

# What --all writes: (domain, split, input file or None for gold actions, output file).
ALL_JOBS: tuple[tuple[str, str, str | None, str], ...] = (
    ("retail", "base", None, "retail.jsonl.gz"),
    ("airline", "base", None, "airline.jsonl.gz"),
    ("telecom", "base", None, "telecom.jsonl.gz"),
    ("telecom", "full", None, "telecom_full.jsonl.gz"),
    ("retail", "base", "retail_probes_input.jsonl", "retail_probes.jsonl"),
    ("airline", "base", "airline_probes_input.jsonl", "airline_probes.jsonl"),
    ("telecom", "full", "telecom_probes_input.jsonl", "telecom_probes.jsonl"),
)


def _tau2_modules(domain: str) -> tuple[Any, Any]:
    """tau2's environment module for ``domain`` and its Environment class."""
    env_module = importlib.import_module(f"tau2.domains.{domain}.environment")
    from tau2.environment.environment import Environment

    return env_module, Environment


def _fresh_environment(domain: str, task: Any) -> Any:
    """A tau2 environment set up for ``task`` as tau2's evaluator sets up its gold env."""
    env_module, _ = _tau2_modules(domain)
    if domain == "telecom":
        # tau2 keeps the phone's default VPN details in one class attribute that
        # break_vpn mutates in place; a fresh object per task gives every task the
        # state a fresh process would have (each of our tasks runs in its own sandbox).
        from tau2.domains.telecom.user_data_model import PerformanceLevel, VpnDetails
        from tau2.domains.telecom.user_tools import TelecomUserTools

        TelecomUserTools.default_vpn_details = VpnDetails(
            server_address="192.168.1.1", protocol="OpenVPN", server_performance=PerformanceLevel.EXCELLENT
        )
    env = env_module.get_environment()
    state = task.initial_state
    env.set_state(
        initialization_data=state.initialization_data if state else None,
        initialization_actions=state.initialization_actions if state else None,
        message_history=(state.message_history or []) if state else [],
    )
    return env


def replay_task(domain: str, task: Any, actions: list[dict[str, Any]]) -> dict[str, Any]:
    """One output line: every action through a fresh tau2 environment for ``task``."""
    _, environment_cls = _tau2_modules(domain)
    env = _fresh_environment(domain, task)
    outputs = []
    for action in actions:
        try:
            result = env.make_tool_call(
                tool_name=action["name"], requestor=action.get("requestor", "assistant"), **action["arguments"]
            )
            outputs.append({"ok": True, "text": environment_cls.to_json_str(result)})
        except Exception as exc:  # tau2 shows every exception to the caller this way
            outputs.append({"ok": False, "text": environment_cls.to_json_str(f"Error: {exc}")})
    return {
        "task_id": task.id,
        "outputs": outputs,
        "db_hash": env.get_db_hash(),
        "user_db_hash": env.get_user_db_hash(),
    }


def _gold_inputs(tasks: Iterable[Any]) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    for task in tasks:
        criteria = task.evaluation_criteria
        gold = criteria.actions if criteria is not None and criteria.actions else []
        yield task, [{"name": a.name, "arguments": a.arguments, "requestor": a.requestor} for a in gold]


def _file_inputs(path: Path, tasks: list[Any]) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    by_id = {task.id: task for task in tasks}
    with path.open() as fp:
        for number, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row["task_id"] not in by_id:
                raise SystemExit(f"{path}:{number}: unknown task_id {row['task_id']!r}")
            yield by_id[row["task_id"]], row["actions"]


def _open_output(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":  # mtime=0: the same content gives the same bytes
        raw = gzip.GzipFile(filename=path, mode="wb", compresslevel=9, mtime=0)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return path.open("w", encoding="utf-8")


def run_job(domain: str, split: str, input_path: Path | None, output_path: Path) -> int:
    env_module, _ = _tau2_modules(domain)
    tasks = env_module.get_tasks(split)
    pairs = _gold_inputs(tasks) if input_path is None else _file_inputs(input_path, tasks)
    count = 0
    with _open_output(output_path) as out:
        for task, actions in pairs:
            out.write(json.dumps(replay_task(domain, task, actions), ensure_ascii=False) + "\n")
            count += 1
    print(f"{domain}/{split}: {count} tasks -> {output_path}", file=sys.stderr)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tau2-root", type=Path, required=True, help="tau2-bench checkout (its data/ is used)")
    parser.add_argument("--all", action="store_true", help="regenerate every file under tests/data/tau2_golden/")
    parser.add_argument("--domain", choices=DOMAINS)
    parser.add_argument("--split", default="base", help="task split for gold actions (default: base)")
    parser.add_argument("--input", type=Path, help="replay this action list instead of the gold actions")
    parser.add_argument("--output", type=Path, help="output JSONL (.gz for gzip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TAU2_DATA_DIR", str(args.tau2_root / "data"))
    try:
        import loguru

        loguru.logger.remove()  # tau2 logs every tool call; the output file is what matters
    except ImportError:
        pass
    if args.all:
        for domain, split, input_name, output_name in ALL_JOBS:
            input_path = GOLDEN_DIR / input_name if input_name else None
            run_job(domain, split, input_path, GOLDEN_DIR / output_name)
        return 0
    if args.domain is None or args.output is None:
        parser.error("give --all, or --domain and --output")
    run_job(args.domain, args.split, args.input, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
