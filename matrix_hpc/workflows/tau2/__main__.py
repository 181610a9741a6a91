"""Command line of the tau2 package.

Example::

    python -m matrix_hpc.workflows.tau2 replay --domain telecom --input actions.jsonl --output results.jsonl
    python -m matrix_hpc.workflows.tau2 tasks --domain telecom --trials 2 --out data/tau2_telecom.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matrix_hpc.workflows.tau2.domains import DOMAIN_NAMES


def _replay(args: argparse.Namespace) -> int:
    from matrix_hpc.workflows.tau2.replay import replay_stream

    if not args.input.is_file():
        print(f"error: input file {args.input} does not exist", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.input.open(encoding="utf-8") as lines, args.output.open("w", encoding="utf-8") as out:
        summary = replay_stream(args.domain, lines, out, sys.stderr, live=args.live)
    print(f"replayed {summary.replayed} task(s) to {args.output}; {summary.bad_lines} bad line(s)", file=sys.stderr)
    return 1 if summary.bad_lines else 0


def _tasks(args: argparse.Namespace) -> int:
    import json

    from matrix_hpc.workflows.tau2.rows import task_rows

    split = None if args.split in ("", "all", "none") else args.split
    task_ids = args.task_ids.split(",") if args.task_ids else None
    try:
        written = list(task_rows(args.domain, split, task_ids, args.trials, args.seed))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in written)
    print(f"wrote {len(written)} row(s) to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.workflows.tau2", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="replay action lists through fresh tau2 environments")
    replay.add_argument("--domain", required=True, choices=DOMAIN_NAMES)
    replay.add_argument(
        "--input", required=True, type=Path, help="JSONL: {task_id, actions: [{name, arguments, requestor?}]}"
    )
    replay.add_argument("--output", required=True, type=Path, help="JSONL: {task_id, outputs, db_hash, user_db_hash}")
    replay.add_argument("--live", action="store_true", help="sync after every call, as a dialogue does (telecom)")
    replay.set_defaults(run=_replay)
    tasks = commands.add_parser("tasks", help="write workflow rows (one per task and trial) as JSONL")
    tasks.add_argument("--domain", required=True, choices=DOMAIN_NAMES)
    tasks.add_argument("--out", required=True, type=Path, help="the JSONL file to write")
    tasks.add_argument("--split", default="base", help="tau2 split (default base); 'all' for every task")
    tasks.add_argument("--task-ids", default=None, help="comma-separated task ids (instead of a split)")
    tasks.add_argument("--trials", type=int, default=1, help="rows per task, each with its trial's seed")
    tasks.add_argument("--seed", type=int, default=300, help="seed of the trial seeds (tau2's default 300)")
    tasks.set_defaults(run=_tasks)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
