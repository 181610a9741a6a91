"""``matrix-hpc inspect OUTPUT_DIR``: what an output directory holds.

When no run holds the output lock, inspect also repairs what crashes left:
temp files, interrupted compactions, unreadable part files (moved to
``_matrix/quarantine/``). Exit status: 0 clean, 1 when ids are present more
than once or files were unreadable, 2 on usage errors."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from matrix_hpc.cli.main import fail
from matrix_hpc.store.layout import META_DIR, data_files, read_columns
from matrix_hpc.store.lock import OutputLock, OutputLocked
from matrix_hpc.store.resume import scan_output
from matrix_hpc.store.verify import OutputSummary, summarize_output

COLUMNS = ["id", "status", "error_type", "error", "reason", "prompt_tokens", "completion_tokens", "attempts"]


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
    totals = _aggregate(files)
    prompt, completion = totals.prompt_tokens, totals.completion_tokens
    lines.append(f"  tokens: prompt {prompt:,}, completion {completion:,}, total {prompt + completion:,}")
    lines.append(f"  rows whose steps were retried: {totals.retried}")
    for etype, count in totals.errors.most_common(10):
        lines.append(f"  error {etype} x{count}, e.g. {totals.examples[etype][:200]}")
    for reason, count in totals.reasons.most_common(10):
        lines.append(f"  filtered x{count}: {reason[:120]}")
    cfg = out / META_DIR / "workflow.yaml"
    if cfg.exists():
        first = cfg.read_text().splitlines()[:1]
        lines.append(f"  workflow: {' '.join(first)}   (config: {out / META_DIR / 'config.yaml'})")
        lines += [f"  {k}: {_fmt(v)}" for k, v in workflow_metrics(cfg, files).items()]
    return "\n".join(lines)


@dataclass
class _Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retried: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)


def _aggregate(files: list[Path]) -> _Totals:
    totals = _Totals()
    for f in files:
        names = set(pq.read_schema(f).names)
        t = read_columns(f, [c for c in COLUMNS if c in names])
        totals.prompt_tokens += _sum(t, "prompt_tokens")
        totals.completion_tokens += _sum(t, "completion_tokens")
        if "attempts" in names:
            totals.retried += int(pc.sum(pc.greater(t.column("attempts"), 1)).as_py() or 0)
        if "error_type" in names:
            _count_errors(t, totals)
        if "reason" in names:
            totals.reasons.update(_value_counts(t.column("reason")))
    return totals


def _count_errors(t: pa.Table, totals: _Totals) -> None:
    failed = t.filter(pc.is_valid(t.column("error_type")))
    for etype, count in _value_counts(failed.column("error_type")).items():
        totals.errors[etype] += count
        if etype not in totals.examples:
            row = failed.filter(pc.equal(failed.column("error_type"), etype)).slice(0, 1).to_pylist()[0]
            totals.examples[etype] = f"[{row.get('id')}] {row.get('error')}"


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    valid = column.filter(pc.is_valid(column))
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(valid).to_pylist() if v["values"]}


def _sum(t: pa.Table, column: str) -> int:
    return int(pc.sum(t.column(column)).as_py() or 0) if column in t.column_names else 0


def workflow_metrics(workflow_yaml: Path, files: list[Path]) -> dict[str, object]:
    """The workflow's own summary (a module-level ``summarize(table)``), if it has one."""
    import importlib

    import yaml

    from matrix_hpc.runtime.workflow import workflow_conf_classes

    name = (yaml.safe_load(workflow_yaml.read_text()) or {}).get("name")
    conf_cls = workflow_conf_classes().get(str(name))
    summarize = getattr(importlib.import_module(conf_cls.__module__), "summarize", None) if conf_cls else None
    if summarize is None:
        return {}
    tables = []
    for f in files:
        names = [n for n in pq.ParquetFile(f).schema_arrow.names if n not in ("messages", "input")]
        tables.append(pq.read_table(f, columns=names))
    metrics = summarize(pa.concat_tables(tables, promote_options="default"))
    return {k: v for k, v in metrics.items() if k not in ("rows", "by_status")}


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(inspect_command(sys.argv[1:]))
