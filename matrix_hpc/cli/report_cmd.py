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
from typing import TYPE_CHECKING

from matrix_hpc.cli.inspect_cmd import fmt, problem_lines, repair, sample_counts, workflow_line, workflow_metrics
from matrix_hpc.cli.main import fail
from matrix_hpc.store.layout import META_DIR, data_files
from matrix_hpc.store.verify import output_totals, summarize_output

if TYPE_CHECKING:
    from matrix_hpc.report.build import ReportInput

DEFAULT_NAME = "report.html"  # written under OUTPUT_DIR/_matrix/ unless --out says otherwise


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="matrix-hpc report", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a run's output.dir")
    p.add_argument("--out", type=Path, help=f"the HTML file (or a directory) to write "
                   f"(default: OUTPUT_DIR/{META_DIR}/{DEFAULT_NAME})")
    p.add_argument("--png", type=Path, metavar="DIR", help="also write each figure as DIR/<name>.png")
    return p.parse_args(args)


def report_command(args: list[str]) -> int:
    opts = parse(args)
    out: Path = opts.output_dir
    problem = check_output_dir(out)
    target = opts.out or out / META_DIR / DEFAULT_NAME
    target = target / DEFAULT_NAME if target.is_dir() else target
    problem = problem or make_dirs([target.parent] + ([opts.png] if opts.png else []))
    if problem:
        return fail(problem)
    from matrix_hpc.report.build import build_report

    t0 = time.perf_counter()
    inp = report_input(out)
    if not inp.files:
        return fail(f"{out} holds no readable committed rows (every part file is unreadable; see `matrix-hpc "
                    f"inspect {out}`)")
    report = build_report(inp)
    try:
        target.write_text(report.html, encoding="utf-8")
        for f in report.figures if opts.png else []:
            (opts.png / f"{f.key}.png").write_bytes(f.png)
    except OSError as e:
        return fail(f"cannot write the report: {e}")
    print(f"wrote {target} ({len(report.figures)} figures, {inp.summary.rows:,} rows, {len(report.html) / 1e6:.1f} MB,"
          f" {time.perf_counter() - t0:.1f} s)" + (f"; figures in {opts.png}/" if opts.png else ""))
    return 0


def report_input(out: Path) -> ReportInput:
    """What inspect counts, by inspect's code: the same repair first, then the summary,
    the totals and the workflow's metrics."""
    from matrix_hpc.report.build import ReportInput

    notes = repair(out)
    summary = summarize_output(out)
    files = [f for f in data_files(out) if f not in summary.unreadable]
    workflow = workflow_line(out)
    metrics = workflow_metrics(out / META_DIR / "workflow.yaml", files) if workflow and files else {}
    shown = {k: fmt(v) for k, v in metrics.items()} | (sample_counts(out, files) if files else {})
    return ReportInput(out, files, summary, output_totals(files), workflow, shown,
                       notes + problem_lines(out, summary))


def make_dirs(dirs: list[Path]) -> str | None:
    """Create where the report goes, before the work (a path that cannot be written is refused at once)."""
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot write the report: {e}"
    return None


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
