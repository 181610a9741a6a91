"""``matrix-hpc curate decontaminate``: drop rows that share a word n-gram run with a benchmark.

The benchmark files (JSONL, Parquet, or a ``save_to_disk`` directory) are
read on the driver: every string field of every row (or the fields named by
``bench_columns``), normalised like the rows (``text.normalise``), gives its
word ``ngram``-grams, hashed to 64 bits; the index keeps each hash once with
the first benchmark file and row that has it (sorted arrays: 16 bytes an
n-gram, ~16 MB for a million). It travels to the workers through Ray's
object store.

Per unit (Ray Data, on every node): each row's chosen columns give their
n-grams; a row any of whose n-gram hashes is in the index is dropped, and
the report records the first match (benchmark file, row, the n-gram) and how
many of the row's n-grams matched. A field shorter than ``ngram`` words has
no n-gram and can neither match nor be matched.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from matrix_hpc.data.dedup import _unit, check_columns, publish_replace, read_unit
from matrix_hpc.data.plan import REPORT_DIR, Plan, open_plan, run_stage
from matrix_hpc.data.source import OutputSource, SourceError
from matrix_hpc.data.text import column_texts, ngram_hashes, strings_in
from matrix_hpc.store.layout import read_columns, write_table_atomic

SCAN = "scan"
REPORT_FILE = "contaminated.parquet"


@dataclass(frozen=True)
class DecontaminateConf:
    columns: tuple[str, ...]
    against: tuple[str, ...]  # benchmark files
    ngram: int = 13  # words in a run that counts as overlap
    bench_columns: tuple[str, ...] = ()  # benchmark fields to index (default: every string field)
    statuses: tuple[str, ...] | None = ("ok",)

    def __post_init__(self) -> None:
        if not self.columns:
            raise SourceError("--column: name at least one column to check")
        if not self.against:
            raise SourceError("--against: name at least one benchmark file")
        if self.ngram < 1:
            raise SourceError(f"--ngram {self.ngram}: must be >= 1")

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["against"] = [str(Path(p).resolve()) for p in self.against]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class BenchIndex:
    hashes: np.ndarray  # sorted unique n-gram hashes
    file: np.ndarray  # index into files of the first row holding each
    row: np.ndarray  # that row's number in its file (0-based)
    files: list[str]


@dataclass
class DecontaminateResult:
    dest: Path
    rows: int = 0
    kept: int = 0
    dropped: int = 0
    benchmark_ngrams: int = 0
    by_benchmark: dict[str, int] = field(default_factory=dict)  # dropped rows by the benchmark file matched
    notes: list[str] = field(default_factory=list)


def decontaminate(out_dir: Path, dest: Path, conf: DecontaminateConf, force: bool = False) -> DecontaminateResult:
    """Drop the selected rows of ``out_dir`` that overlap a benchmark into ``dest`` (resumable)."""
    src = OutputSource.open(out_dir, conf.statuses)
    check_columns(src, conf.columns)
    index = build_index([Path(p) for p in conf.against], conf.ngram, conf.bench_columns)
    plan = open_plan(out_dir, dest, "decontaminate", conf.params(), force)
    notes = [n for n in [src.live_note()] if n]
    if (done := plan.finished()) is not None:
        return DecontaminateResult(**{**done, "dest": Path(dest), "notes": notes + ["already complete"]})
    import ray

    ref = ray.put(index)
    run_stage([asdict(u) for u in plan.pending(SCAN)],
              functools.partial(scan_unit, str(plan.out_dir), str(plan.dest), str(plan.work), conf, ref))
    report = _report(plan)
    result = DecontaminateResult(plan.dest, _rows(plan, report), 0, report.num_rows, len(index.hashes),
                                 _by_file(report))
    result.kept = result.rows - result.dropped
    plan.write_summary({k: v for k, v in asdict(result).items() if k not in ("dest", "notes")})
    result.notes = notes
    return result


# -- the benchmark index -----------------------------------------------------------
def build_index(paths: list[Path], ngram: int, bench_columns: tuple[str, ...] = ()) -> BenchIndex:
    hashes, files, rows = [], [], []
    for file_no, path in enumerate(paths):
        for row_no, row in enumerate(bench_rows(path)):
            fields = [row.get(c) for c in bench_columns] if bench_columns else list(row.values())
            for text in (s for f in fields for s in strings_in(f)):
                h, _ = ngram_hashes(text, ngram)
                hashes.append(h)
                files.append(np.full(len(h), file_no, np.int32))
                rows.append(np.full(len(h), row_no, np.int64))
    if not hashes:
        return BenchIndex(np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int64),
                          [str(p) for p in paths])
    all_h, all_f, all_r = np.concatenate(hashes), np.concatenate(files), np.concatenate(rows)
    unique, first = np.unique(all_h, return_index=True)  # first occurrence: the earliest file and row
    return BenchIndex(unique, all_f[first], all_r[first], [str(p) for p in paths])


def bench_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one benchmark file (JSONL, Parquet, a save_to_disk directory); a clear error otherwise."""
    from matrix_hpc.store.hf_input import is_hf_dataset_dir, load_hf_dataset_dir

    if not path.exists():
        raise SourceError(f"--against {path}: no such file")
    try:
        if is_hf_dataset_dir(path):
            return list(load_hf_dataset_dir(path).to_pylist())
        if path.suffix == ".parquet":
            return list(pq.read_table(path).to_pylist())
        if path.suffix in (".jsonl", ".json"):
            return [_json_row(path, n, line) for n, line in enumerate(path.read_text().splitlines(), 1)
                    if line.strip()]
    except (OSError, ValueError, pa.ArrowException) as e:
        raise SourceError(f"--against {path}: cannot read it ({type(e).__name__}: {str(e)[:200]})") from e
    raise SourceError(f"--against {path}: not a .jsonl, .json, .parquet file or a save_to_disk directory")


def _json_row(path: Path, line_no: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as e:
        raise SourceError(f"--against {path}:{line_no}: not JSON ({e})") from e
    return value if isinstance(value, dict) else {"text": value}


# -- per unit ------------------------------------------------------------------------
_index_cache: dict[str, BenchIndex] = {}


def _index(ref: Any) -> BenchIndex:
    """The index, fetched once per worker process."""
    import ray

    key = ref.hex()
    if key not in _index_cache:
        _index_cache.clear()
        _index_cache[key] = ray.get(ref)
    return _index_cache[key]


def scan_unit(out_dir: str, dest: str, work: str, conf: DecontaminateConf, ref: Any,
              unit_row: dict[str, Any]) -> dict[str, Any]:
    """Write the unit's clean rows, then its matches (the completion marker)."""
    unit = _unit(unit_row)
    index = _index(ref)
    table = read_unit(Path(out_dir), unit, None, conf.statuses)
    texts = column_texts(table, conf.columns)
    hits = [match(t, index, conf.ngram) if t else None for t in texts]
    keep = np.array([h is None for h in hits], bool)
    publish_replace(table.filter(pa.array(keep)), unit.data_path(Path(dest)))
    ids = table.column("id").to_pylist()
    found = [(ids[i], h) for i, h in enumerate(hits) if h is not None]
    report = pa.table({
        "id": pa.array([i for i, _ in found], pa.string()),
        "benchmark_file": pa.array([index.files[h["file"]] for _, h in found], pa.string()),
        "benchmark_row": pa.array([h["row"] for _, h in found], pa.int64()),
        "ngram": pa.array([h["ngram"] for _, h in found], pa.string()),
        "matches": pa.array([h["matches"] for _, h in found], pa.int64()),
        "file": pa.array([unit.file] * len(found), pa.string()),
    })
    meta = {b"rows": str(table.num_rows).encode()}
    write_table_atomic(report.replace_schema_metadata(meta), Path(work) / SCAN / f"{unit.name}.parquet", "zstd",
                       "scan")
    return {"unit": unit.index, "rows": table.num_rows}


def match(text: str, index: BenchIndex, ngram: int) -> dict[str, Any] | None:
    """The first benchmark n-gram ``text`` shares (file, row, the n-gram, how many matched), or None."""
    hashes, grams = ngram_hashes(text, ngram)
    if not len(hashes) or not len(index.hashes):
        return None
    at = np.minimum(np.searchsorted(index.hashes, hashes), len(index.hashes) - 1)
    found = np.flatnonzero(index.hashes[at] == hashes)
    if not len(found):
        return None
    first = int(found[0])
    return {"file": int(index.file[at[first]]), "row": int(index.row[at[first]]), "ngram": grams[first],
            "matches": len(found)}


def _report(plan: Plan) -> pa.Table:
    tables = [read_columns(plan.marker(SCAN, u)) for u in plan.units]
    report = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]) if tables else pa.table({})
    path = plan.dest / REPORT_DIR / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    publish_replace(report, path)
    return report


def _rows(plan: Plan, report: pa.Table) -> int:
    return sum(int((pq.read_schema(plan.marker(SCAN, u)).metadata or {}).get(b"rows", b"0")) for u in plan.units)


def _by_file(report: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in report.column("benchmark_file").to_pylist() if report.num_rows else []:
        out[f] = out.get(f, 0) + 1
    return out
