"""Command line of the tau2 package.

Example::

    python -m matrix_hpc.workflows.tau2 replay --domain telecom --input actions.jsonl --output results.jsonl
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
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
