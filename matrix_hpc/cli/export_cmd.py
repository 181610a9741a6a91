"""``matrix-hpc export hf|jsonl OUTPUT_DIR DEST``: an output's rows for trainers (docs/datasets_out.md).

    matrix-hpc export hf out/run1 exports/run1            # ok rows, datasets.load_from_disk("exports/run1")
    matrix-hpc export jsonl out/run1 run1.jsonl --status ok,filtered
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matrix_hpc.cli.main import fail


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matrix-hpc export", description="Export an output directory's rows.")
    p.add_argument("format", choices=["hf", "jsonl", "tau2"],
                   help="hf: a datasets.load_from_disk directory; jsonl: one file; tau2: tau2-bench's results JSON")
    p.add_argument("output_dir", type=Path, help="the run's output.dir (read only)")
    p.add_argument("dest", type=Path, help="where to write (outside the output directory)")
    add_selection(p)
    p.add_argument("--force", action="store_true", help="replace an existing DEST")
    return p


def add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", default="ok", help="comma-separated statuses to include (ok, filtered, failed)")
    p.add_argument("--all", dest="all_rows", action="store_true", help="include every row, whatever its status")


def export_command(args: list[str]) -> int:
    opts = parser().parse_args(args)
    if opts.format == "tau2":
        return export_tau2_command(opts)
    from matrix_hpc.data.export import EXPORTERS
    from matrix_hpc.data.source import SourceError, parse_statuses

    try:
        statuses = parse_statuses(opts.status, opts.all_rows)
        result = EXPORTERS[opts.format](opts.output_dir, opts.dest, statuses, force=opts.force)
    except SourceError as e:
        return fail(str(e))
    for note in result.notes:
        print(note)
    tokens = result.prompt_tokens + result.completion_tokens
    print(f"{result.rows:,} rows ({tokens:,} tokens) -> {result.dest}")
    return 0


def export_tau2_command(opts: argparse.Namespace) -> int:
    """A workflow=tau2 output as tau2-bench's results JSON (its ok rows; docs/tau2.md)."""
    from matrix_hpc.data.source import OutputSource, SourceError, check_destination
    from matrix_hpc.workflows.tau2.export import COLUMNS, ExportError, export_tau2

    try:
        src = OutputSource.open(opts.output_dir, statuses=None)
        check_destination(src.out_dir, opts.dest, opts.force)
        summary = export_tau2(src.out_dir, opts.dest, (b for f in src.files for b in src.batches(f, COLUMNS)))
    except (SourceError, ExportError) as e:
        return fail(str(e))
    skipped = ", ".join(f"{n:,} {status}" for status, n in sorted(summary.skipped.items()))
    print(f"{summary.simulations:,} simulations of {summary.tasks:,} tasks -> {summary.dest}"
          + (f" (not exported: {skipped} rows)" if skipped else ""))
    return 0
