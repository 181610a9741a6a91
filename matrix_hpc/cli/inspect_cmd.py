"""``matrix-hpc inspect OUTPUT_DIR``: what an output directory holds.

When no run holds the output lock, inspect also repairs what crashes left:
temp files, interrupted compactions, unreadable part files (moved to
``_matrix/quarantine/``). Exit status: 0 clean, 1 when ids are present more
than once or files were unreadable, 2 on usage errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from matrix_hpc.cli.main import fail
from matrix_hpc.store.layout import META_DIR, data_files, read_columns
from matrix_hpc.store.lock import OutputLock, OutputLocked
from matrix_hpc.store.resume import recorded_identity, scan_output
from matrix_hpc.store.verify import OutputSummary, count_samples, output_totals, summarize_output


def inspect_command(args: list[str]) -> int:
    if len(args) != 1:
        return fail("usage: matrix-hpc inspect OUTPUT_DIR")
    out = Path(args[0])
    if not out.is_dir():
        return fail(f"{out} is not a directory")
    notes = repair(out)
    summary = summarize_output(out)
    files = [f for f in data_files(out) if f not in summary.unreadable]
    for note in notes:
        print(note)
    if not files:
        return fail(f"{out} holds no readable committed rows (no shard=*/part-*.parquet files)")
    print(render(out, files, summary))
    problems = problem_lines(out, summary)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def repair(out: Path) -> list[str]:
    """Tidy what crashes left, unless a live run holds the output (then its
    temp files are its own and nothing is touched)."""
    try:
        with OutputLock(out, "inspect"):
            scan = scan_output(out)
    except OutputLocked as e:
        return [f"  (not repaired: {e})"]
    return [f"  quarantined unreadable part file -> {p} (its ids run again on the next run)"
            for p in scan.quarantined]


def problem_lines(out: Path, summary: OutputSummary) -> list[str]:
    lines = []
    if summary.duplicate_ids:
        lines.append(f"DUPLICATE IDS: {summary.duplicate_ids} id(s) of {out} are present more than once "
                     f"({summary.rows} rows, {summary.distinct_ids} distinct ids), e.g. "
                     f"{', '.join(summary.duplicate_examples)}. Readers will count these rows twice.")
    for f in summary.unreadable:
        lines.append(f"UNREADABLE: {f} (a run holds the output; the next run quarantines it)")
    return lines


def render(out: Path, files: list[Path], summary: OutputSummary) -> str:
    """Counts, tokens, error kinds with an example each, filter reasons:
    aggregated file by file with Arrow (no Python object per row)."""
    n = max(summary.rows, 1)
    lines = [f"{out}: {summary.rows} rows in {len(files)} files ({summary.distinct_ids} distinct ids)"]
    by_status = sorted(summary.by_status.items(), key=lambda kv: -kv[1])
    lines.append("  by status: " + ", ".join(f"{k} {v} ({v / n:.1%})" for k, v in by_status))
    totals = output_totals(files)
    prompt, completion = totals.prompt_tokens, totals.completion_tokens
    lines.append(f"  tokens: prompt {prompt:,}, completion {completion:,}, total {prompt + completion:,}")
    lines.append(f"  rows whose steps were retried: {totals.retried}")
    for etype, count in totals.errors.most_common(10):
        lines.append(f"  error {etype} x{count}, e.g. {totals.examples[etype][:200]}")
    for reason, count in totals.reasons.most_common(10):
        lines.append(f"  filtered x{count}: {reason[:120]}")
    lines += sample_lines(out, files)
    name = workflow_line(out)
    if name is not None:
        lines.append(f"  workflow: {name}   (config: {out / META_DIR / 'config.yaml'})")
        lines += [f"  {k}: {fmt(v)}" for k, v in workflow_metrics(out / META_DIR / "workflow.yaml", files).items()]
    return "\n".join(lines)


def sample_counts(out: Path, files: list[Path]) -> dict[str, str]:
    """Rows per sample and inputs with all their samples, when the runs drew
    several samples per input row (run.samples_per_input); {} otherwise. The
    one home of these numbers for inspect and report."""
    recorded = (recorded_identity(out) or {}).get("run", {}).get("samples_per_input", 1)
    if recorded <= 1:  # one task per input: nothing to count (and no pass over every id)
        return {}
    counts = count_samples(files, recorded)
    return {"samples_per_input": str(recorded),
            "rows_by_sample": ", ".join(f"{k}: {v}" for k, v in counts.by_sample.items()),
            "inputs_with_rows": str(counts.inputs),
            "inputs_with_all_samples": str(counts.complete)}


def sample_lines(out: Path, files: list[Path]) -> list[str]:
    counts = sample_counts(out, files)
    if not counts:
        return []
    n = counts["samples_per_input"]
    return [f"  samples: {n} per input (run.samples_per_input); rows by sample: {counts['rows_by_sample']}",
            f"  inputs: {counts['inputs_with_rows']} with rows, "
            f"{counts['inputs_with_all_samples']} with all {n} samples"]


def workflow_line(out: Path) -> str | None:
    """The first line of the recorded workflow config (``name: coral``), or None."""
    cfg = out / META_DIR / "workflow.yaml"
    return " ".join(cfg.read_text().splitlines()[:1]) if cfg.exists() else None


def workflow_metrics(workflow_yaml: Path, files: list[Path]) -> dict[str, object]:
    """The workflow's own summary (a module-level ``summarize(table)``), if it has one."""
    import importlib

    import yaml

    from matrix_hpc.runtime.workflow import workflow_conf_classes

    name = (yaml.safe_load(workflow_yaml.read_text()) or {}).get("name")
    conf_cls = workflow_conf_classes().get(str(name))
    module = importlib.import_module(conf_cls.__module__) if conf_cls else None
    summarize = getattr(module, "summarize", None)
    if summarize is None:
        return {}
    needed = getattr(module, "SUMMARY_COLUMNS", None)  # the columns it reads, when it says so
    tables = []
    for f in files:
        names = [n for n in pq.ParquetFile(f).schema_arrow.names
                 if (n in needed if needed is not None else n not in ("messages", "input"))]
        tables.append(read_columns(f, names))
    metrics = summarize(pa.concat_tables(tables, promote_options="default"))
    return {k: v for k, v in metrics.items() if k not in ("rows", "by_status")}


def fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(inspect_command(sys.argv[1:]))
