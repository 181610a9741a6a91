"""``matrix-hpc inspect OUTPUT_DIR``: what an output directory holds.

When no run holds the output lock, inspect also repairs what crashes left:
temp files, interrupted compactions, unreadable part files (moved to
``_matrix/quarantine/``). Exit status: 0 clean, 1 when ids are present more
than once or files were unreadable, 2 on usage errors."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from matrix_hpc.cli.main import fail
from matrix_hpc.store.layout import META_DIR, data_files
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
    print(render(out, files))
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


def load_summary_table(files: list[Path]) -> pa.Table:
    tables = []
    for f in files:
        names = pq.ParquetFile(f).schema_arrow.names
        tables.append(pq.read_table(f, columns=[c for c in COLUMNS if c in names]))
    return pa.concat_tables(tables, promote_options="default")


def render(out: Path, files: list[Path]) -> str:
    t = load_summary_table(files).to_pydict()
    n = len(t["id"])
    status = Counter(t["status"])
    lines = [f"{out}: {n} rows in {len(files)} files ({len(set(t['id']))} distinct ids)"]
    lines.append("  by status: " + ", ".join(f"{k} {v} ({v / n:.1%})" for k, v in status.most_common()))
    prompt, completion = sum(x or 0 for x in t["prompt_tokens"]), sum(x or 0 for x in t["completion_tokens"])
    lines.append(f"  tokens: prompt {prompt:,}, completion {completion:,}, total {prompt + completion:,}")
    retried = sum(1 for a in t["attempts"] if (a or 1) > 1)
    lines.append(f"  rows whose steps were retried: {retried}")
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for etype, err, rid in zip(t["error_type"], t["error"], t["id"], strict=True):
        if etype:
            errors[etype] += 1
            examples.setdefault(etype, f"[{rid}] {err}")
    for etype, count in errors.most_common(10):
        lines.append(f"  error {etype} x{count}, e.g. {examples[etype][:200]}")
    reasons = Counter(r for r in t["reason"] if r)
    for reason, count in reasons.most_common(10):
        lines.append(f"  filtered x{count}: {reason[:120]}")
    cfg = out / META_DIR / "workflow.yaml"
    if cfg.exists():
        first = cfg.read_text().splitlines()[:1]
        lines.append(f"  workflow: {' '.join(first)}   (config: {out / META_DIR / 'config.yaml'})")
        lines += [f"  {k}: {_fmt(v)}" for k, v in workflow_metrics(cfg, files).items()]
    return "\n".join(lines)


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
