"""What an output directory holds, read from the disk (not from acks): the
end-of-run summary and ``inspect`` both come from here.

    s = summarize_output(Path("out/run1"), run_id="20261129-101500-ab12cd")
    s.by_status, s.tokens, s.rows, s.distinct_ids, s.duplicate_ids
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from matrix_hpc.store.ids import hash_ids
from matrix_hpc.store.layout import data_files, read_columns

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("id", "status", "run_id", "prompt_tokens", "completion_tokens")
MAX_EXAMPLES = 10


@dataclass
class OutputSummary:
    by_status: dict[str, int]  # rows of run_id (or all rows when run_id is None), by status
    tokens: int  # prompt+completion tokens of those rows
    rows: int  # whole dataset (incl. _rejected/)
    distinct_ids: int
    duplicate_ids: int  # ids present more than once (should be 0)
    duplicate_examples: list[str] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)  # part files that could not be read (not counted)


def summarize_output(out_dir: Path, run_id: str | None = None) -> OutputSummary:
    """Counts of ``out_dir`` read from its files. Read-only: an unreadable file
    is listed in ``unreadable`` (``scan_output`` quarantines it)."""
    by_status: Counter[str] = Counter()
    tokens, rows = 0, 0
    readable: list[Path] = []
    unreadable: list[Path] = []
    files = data_files(Path(out_dir))
    hashes = np.empty(_rows_in_footers(files), np.uint64)  # 8 bytes an id, filled file by file
    for f in files:
        try:
            t = _read_summary_columns(f)
        except (OSError, pa.ArrowException) as e:
            log.error("cannot read %s (%s); not counted", f, e)
            unreadable.append(f)
            continue
        readable.append(f)
        hashes[rows:rows + t.num_rows] = hash_ids(t.column("id").fill_null(""))
        rows += t.num_rows
        mine = t if run_id is None else t.filter(pc.fill_null(pc.equal(t.column("run_id"), run_id), False))
        by_status.update(_status_counts(mine))
        tokens += _sum(mine, "prompt_tokens") + _sum(mine, "completion_tokens")
    duplicate_ids, examples = _duplicates(readable, hashes[:rows])
    distinct = rows - duplicate_ids
    return OutputSummary(dict(by_status), tokens, rows, distinct, duplicate_ids, examples, unreadable)


def _rows_in_footers(files: list[Path]) -> int:
    total = 0
    for f in files:
        try:
            total += pq.read_metadata(f).num_rows
        except (OSError, pa.ArrowException):
            pass  # reported when its columns are read
    return total


def _read_summary_columns(path: Path) -> pa.Table:
    names = set(pq.read_schema(path).names)
    t = read_columns(path, [c for c in SUMMARY_COLUMNS if c in names])
    for c in SUMMARY_COLUMNS:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.int64() if c.endswith("tokens") else pa.string()))
    return t


def _status_counts(t: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(t.column("status").fill_null("failed"))
    return {str(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


def _sum(t: pa.Table, column: str) -> int:
    return int(pc.sum(t.column(column)).as_py() or 0)


def _duplicates(files: list[Path], hashes: np.ndarray) -> tuple[int, list[str]]:
    """Extra copies of ids, confirmed on the ids themselves (hashes only pick
    the candidates, so a hash collision is never counted as a duplicate)."""
    if len(hashes) < 2:
        return 0, []
    hashes.sort()  # in place: the caller's array is ours to reorder
    candidates = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if len(candidates) == 0:
        return 0, []
    counts: Counter[str] = Counter()
    for f in files:
        ids = read_columns(f, ["id"]).column("id").fill_null("")
        hit = np.isin(hash_ids(ids), candidates)
        if hit.any():
            counts.update(ids.filter(pa.array(hit)).to_pylist())
    extra = {i: n - 1 for i, n in counts.items() if n > 1}
    return sum(extra.values()), sorted(extra)[:MAX_EXAMPLES]


TOTALS_COLUMNS = ("id", "status", "error_type", "error", "reason", "prompt_tokens", "completion_tokens", "attempts")


@dataclass
class OutputTotals:
    """Tokens, retries, error kinds (with one example each) and filter reasons
    of a set of part files: what ``inspect`` and ``report`` show."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    retried: int = 0  # rows whose steps were retried (attempts > 1)
    errors: Counter[str] = field(default_factory=Counter)  # error_type -> rows
    examples: dict[str, str] = field(default_factory=dict)  # error_type -> "[id] error"
    reasons: Counter[str] = field(default_factory=Counter)  # filter reason -> rows


def output_totals(files: list[Path]) -> OutputTotals:
    """Aggregated file by file with Arrow (no Python object per row)."""
    totals = OutputTotals()
    for f in files:
        names = set(pq.read_schema(f).names)
        t = read_columns(f, [c for c in TOTALS_COLUMNS if c in names])
        totals.prompt_tokens += _sum_present(t, "prompt_tokens")
        totals.completion_tokens += _sum_present(t, "completion_tokens")
        if "attempts" in names:
            totals.retried += int(pc.sum(pc.greater(t.column("attempts"), 1)).as_py() or 0)
        if "error_type" in names:
            _count_errors(t, totals)
        if "reason" in names:
            totals.reasons.update(_value_counts(t.column("reason")))
    return totals


def _count_errors(t: pa.Table, totals: OutputTotals) -> None:
    failed = t.filter(pc.is_valid(t.column("error_type")))
    for etype, count in _value_counts(failed.column("error_type")).items():
        totals.errors[etype] += count
        if etype not in totals.examples:
            row = failed.filter(pc.equal(failed.column("error_type"), etype)).slice(0, 1).to_pylist()[0]
            totals.examples[etype] = f"[{row.get('id')}] {row.get('error')}"


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    valid = column.filter(pc.is_valid(column))
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(valid).to_pylist() if v["values"]}


def _sum_present(t: pa.Table, column: str) -> int:
    return _sum(t, column) if column in t.column_names else 0


SAMPLE_SUFFIX = r"#s\d+$"  # the suffix of a sample's task id (matrix_hpc.runtime.samples), stripped for the input id


@dataclass
class SampleCounts:
    """What an output holds per sample (``run.samples_per_input``)."""

    by_sample: dict[int, int]  # rows by sample number
    inputs: int  # distinct input ids with at least one row
    complete: int  # input ids with a row for every sample 0..N-1


def count_samples(files: list[Path], samples_per_input: int) -> SampleCounts:
    """Rows per sample, and input ids with all their samples, from the ``id``
    and ``sample`` columns (files without ``sample``: sample 0). 16 bytes a row."""
    by_sample: Counter[int] = Counter()
    keys: list[np.ndarray] = []
    for f in files:
        t = read_columns(f, [c for c in ("id", "sample") if c in pq.read_schema(f).names])
        ids = t.column("id").fill_null("")
        samples = t.column("sample").fill_null(0) if "sample" in t.column_names else pa.array(
            np.zeros(t.num_rows, np.int32))
        input_ids = pc.if_else(pc.greater(samples, 0), pc.replace_substring_regex(ids, SAMPLE_SUFFIX, ""), ids)
        sample_np = np.asarray(pc.cast(samples, pa.int64()).to_numpy(zero_copy_only=False), np.uint64)
        keys.append(np.column_stack([hash_ids(input_ids), sample_np]))
        by_sample.update({int(k): int(v) for k, v in zip(*np.unique(sample_np, return_counts=True), strict=True)})
    if not keys:
        return SampleCounts({}, 0, 0)
    pairs = np.unique(np.concatenate(keys), axis=0)  # (input, sample) once each
    _, per_input = np.unique(pairs[:, 0], return_counts=True)
    complete = int(np.count_nonzero(per_input >= samples_per_input))
    return SampleCounts(dict(sorted(by_sample.items())), len(per_input), complete)
