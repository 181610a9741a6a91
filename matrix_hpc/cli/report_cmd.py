"""``matrix-hpc report OUTPUT_DIR [--out FILE] [--png DIR]``: a self-contained
HTML report of an output directory (figures embedded; opens offline).

Its counts come from the code ``inspect`` prints them with (the same
repair first, :func:`summarize_output`, :func:`output_totals`, the
workflow's ``summarize``), so the two never disagree. Exit status: 0 written,
2 on usage errors (a missing, empty or non-output directory).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from matrix_hpc.cli.inspect_cmd import fmt, problem_lines, repair, workflow_line, workflow_metrics
from matrix_hpc.cli.main import fail
from matrix_hpc.store.layout import META_DIR, data_files
from matrix_hpc.store.verify import output_totals, summarize_output

DEFAULT_NAME = "report.html"  # written under OUTPUT_DIR/_matrix/ unless --out says otherwise


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="matrix-hpc report", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a run's output.dir")
    p.add_argument("--out", type=Path, help=f"the HTML file to write (default: OUTPUT_DIR/{META_DIR}/{DEFAULT_NAME})")
    p.add_argument("--png", type=Path, metavar="DIR", help="also write each figure as DIR/<name>.png")
    return p.parse_args(args)


def report_command(args: list[str]) -> int:
    opts = parse(args)
    out: Path = opts.output_dir
    problem = check_output_dir(out)
    if problem:
        return fail(problem)
    from matrix_hpc.report.build import ReportInput, build_report

    t0 = time.perf_counter()
    notes = repair(out)
    summary = summarize_output(out)
    files = [f for f in data_files(out) if f not in summary.unreadable]
    if not files:
        return fail(f"{out} holds no readable committed rows (every part file is unreadable; see `matrix-hpc "
                    f"inspect {out}`)")
    metrics = workflow_metrics(out / META_DIR / "workflow.yaml", files) if workflow_line(out) else {}
    inp = ReportInput(out, files, summary, output_totals(files), workflow_line(out),
                      {k: fmt(v) for k, v in metrics.items()}, notes + problem_lines(out, summary))
    report = build_report(inp)
    target: Path = opts.out or out / META_DIR / DEFAULT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report.html, encoding="utf-8")
    if opts.png:
        opts.png.mkdir(parents=True, exist_ok=True)
        for f in report.figures:
            (opts.png / f"{f.key}.png").write_bytes(f.png)
    print(f"wrote {target} ({len(report.figures)} figures, {summary.rows:,} rows, {len(report.html) / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f} s)" + (f"; figures in {opts.png}/" if opts.png else ""))
    return 0


def check_output_dir(out: Path) -> str | None:
    """Why ``out`` is not an output directory to report on (None when it is)."""
    if not out.exists():
        return f"{out} does not exist (give the output.dir of a run)"
    if not out.is_dir():
        return f"{out} is not a directory (give the output.dir of a run)"
    if not data_files(out):
        kind = "is empty" if not any(out.iterdir()) else "holds no committed rows (no shard=*/part-*.parquet files)"
        hint = "; it is a run's output dir, has the run committed anything yet?" if (out / META_DIR).is_dir() else \
            "; is it a run's output.dir?"
        return f"{out} {kind}{hint}"
    return None


if __name__ == "__main__":
    sys.exit(report_command(sys.argv[1:]))
