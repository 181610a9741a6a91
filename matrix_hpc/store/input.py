"""Input: JSONL (optionally .zst) and Parquet files matched by a glob, streamed
row by row. A row that cannot be read becomes an :class:`InputItem` with an
error (naming file and line) instead of stopping the run."""

from __future__ import annotations

import glob
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class DatasetConf:
    path: str = "???"  # file or glob of .jsonl / .jsonl.zst / .parquet files, or a saved HF dataset dir
    split: str | None = None  # HF dataset dir holding several splits: which one
    format: str = "auto"  # auto | jsonl | parquet (auto: by file extension)
    id_column: str | None = "id"  # column holding the task id; null: a stable hash of the row
    required_columns: list[str] = field(default_factory=list)  # rows missing one fail with a clear error
    limit: int | None = None  # process at most this many input rows (first N)


@dataclass
class InputItem:
    id: str
    row: dict[str, Any] | None  # None when the row could not be read
    error: str | None = None  # what was wrong and where (file:line)
    raw: str | None = None  # the unparseable text, kept in the failed row
    where: str = ""  # file:line (or file:row N) for error messages


class InputError(ValueError):
    """The dataset config points at nothing usable."""


def input_files(conf: DatasetConf) -> list[Path]:
    from matrix_hpc.store.hf_input import is_hf_dataset_dir

    paths = sorted(Path(p) for p in glob.glob(str(Path(conf.path).expanduser()), recursive=True))
    files = [f for f in paths if f.is_file() or is_hf_dataset_dir(f)]
    if not files:
        raise InputError(f"dataset.path={conf.path!r} matches no file")
    return files


def iter_input(conf: DatasetConf) -> Iterator[InputItem]:
    """Every input row of every file, in order, each with its task id."""
    count = 0
    for path in input_files(conf):
        for item in _iter_file(path, conf):
            yield item
            count += 1
            if conf.limit is not None and count >= conf.limit:
                return


def _iter_file(path: Path, conf: DatasetConf) -> Iterator[InputItem]:
    if path.is_dir():  # a Hugging Face dataset saved with save_to_disk
        yield from _iter_hf_dir(path, conf)
        return
    fmt = conf.format if conf.format != "auto" else _format_of(path)
    if fmt == "jsonl":
        yield from _iter_jsonl(path, conf)
    elif fmt == "parquet":
        yield from _iter_parquet(path, conf)
    else:
        raise InputError(f"dataset.format={fmt!r} for {path}; valid choices: auto, jsonl, parquet")


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.zst", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise InputError(f"cannot tell the format of {path}; set dataset.format=jsonl or parquet")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        import zstandard  # lazy: only for compressed input

        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _iter_jsonl(path: Path, conf: DatasetConf) -> Iterator[InputItem]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield InputItem(where, None, f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})", line[:4096], where)
                continue
            if not isinstance(row, dict):
                yield InputItem(where, None, f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}", line[:4096], where)
                continue
            yield _item(row, conf, f"{path}:{lineno}", where)


def _iter_parquet(path: Path, conf: DatasetConf) -> Iterator[InputItem]:
    import pyarrow.parquet as pq

    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for i, row in enumerate(batch.to_pylist()):
            yield _item(row, conf, f"{path}:row {offset + i}", f"{path.name}:row{offset + i}")
        offset += batch.num_rows


def _iter_hf_dir(path: Path, conf: DatasetConf) -> Iterator[InputItem]:
    from matrix_hpc.store.hf_input import load_hf_dataset_dir

    offset = 0
    for batch in load_hf_dataset_dir(path, conf.split).to_batches(max_chunksize=4096):
        for i, row in enumerate(batch.to_pylist(), offset):
            yield _item(row, conf, f"{path}:row {i}", f"{path.name}:row{i}")
        offset += batch.num_rows


def _item(row: dict[str, Any], conf: DatasetConf, where: str, fallback_id: str) -> InputItem:
    missing = [c for c in conf.required_columns if c not in row]
    if conf.id_column and conf.id_column not in row:
        missing.insert(0, conf.id_column)
    if missing:
        return InputItem(fallback_id, None, f"{where}: missing required column(s) {missing}",
                         json.dumps(row, default=str)[:4096], where)
    task_id = str(row[conf.id_column]) if conf.id_column else stable_row_hash(row)
    return InputItem(task_id, row, where=where)


def stable_row_hash(row: dict[str, Any]) -> str:
    """An id for rows without one: the same row always gets the same id."""
    blob = json.dumps(row, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha1(blob).hexdigest()[:20]


def count_input_rows(conf: DatasetConf) -> int:
    """Rows in the input (for the ETA): lines of JSONL, metadata of Parquet."""
    total = 0
    for path in input_files(conf):
        if path.is_dir():
            from matrix_hpc.store.hf_input import load_hf_dataset_dir

            total += load_hf_dataset_dir(path, conf.split).num_rows
        elif (conf.format if conf.format != "auto" else _format_of(path)) == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with _open_text(path) as f:
                total += sum(1 for line in f if line.strip())
    return min(total, conf.limit) if conf.limit is not None else total
