"""``matrix-hpc``: the command line.

    matrix-hpc run workflow=overhead dataset.path=in.jsonl output.dir=out run.max_concurrent_tasks=1000
    matrix-hpc inspect out
    matrix-hpc report out --out report.html
    matrix-hpc cluster up|status|down cluster=slurm ...
    matrix-hpc sweep multirun/<date>/<time>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from matrix_hpc import startup

USAGE = """usage: matrix-hpc <command> [hydra overrides...]

commands:
  run       run a workflow (Hydra config; rerun the same command to resume)
  inspect   summarise an output directory: matrix-hpc inspect OUTPUT_DIR
  report    HTML report with plots (opens offline): matrix-hpc report OUTPUT_DIR [--out FILE] [--png DIR]
  cluster   matrix-hpc cluster up|status|down cluster=slurm ...
  serve     named LLM services on a cluster: matrix-hpc serve up|status|down|check llm=sim llm.name=NAME ...
  sweep     one line per point of a Hydra multirun: matrix-hpc sweep SWEEP_DIR
  export    rows for trainers: matrix-hpc export hf|jsonl OUTPUT_DIR DEST [--status ok,failed | --all]
  curate    matrix-hpc curate dedup|decontaminate OUTPUT_DIR --column COL --dest DEST ...

examples:
  matrix-hpc run workflow=overhead dataset.path=data/in.jsonl output.dir=out/demo
  matrix-hpc run --cfg job workflow=overhead      # print the resolved config
  matrix-hpc inspect out/demo
"""


def conf_dir() -> Path:
    """The Hydra config tree (``conf/`` at the repository root)."""
    here = Path(__file__).resolve().parents[2] / "conf"
    if here.is_dir():
        return here
    raise FileNotFoundError(f"config directory not found at {here}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        startup.phase("imports")  # the interpreter's start and the CLI's imports
        from matrix_hpc.cli.run_cmd import run_command

        return run_command(rest)
    if command == "inspect":
        from matrix_hpc.cli.inspect_cmd import inspect_command

        return inspect_command(rest)
    if command == "report":
        from matrix_hpc.cli.report_cmd import report_command

        return report_command(rest)
    if command == "cluster":
        from matrix_hpc.cli.cluster_cmd import cluster_command

        return cluster_command(rest)
    if command == "serve":
        from matrix_hpc.cli.serve_cmd import serve_command

        return serve_command(rest)
    if command == "sweep":
        from matrix_hpc.cli.sweep_cmd import sweep_command

        return sweep_command(rest)
    if command == "export":
        from matrix_hpc.cli.export_cmd import export_command

        return export_command(rest)
    if command == "curate":
        from matrix_hpc.cli.curate_cmd import curate_command

        return curate_command(rest)
    print(f"matrix-hpc: unknown command {command!r}; valid commands: run, inspect, report, cluster, serve, sweep, "
          "export, curate\n", file=sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


def fail(message: str) -> int:
    """Print a short actionable error (the traceback hides behind MATRIX_FULL_ERROR=1)."""
    if os.environ.get("MATRIX_FULL_ERROR") and sys.exc_info()[1] is not None:
        raise
    print(f"matrix-hpc: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
