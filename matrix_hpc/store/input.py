"""Input: JSONL (optionally .zst) and Parquet files matched by a glob, or a
Hugging Face dataset (by hub name, or a ``save_to_disk`` directory), streamed
row by row. A row that cannot be read becomes an :class:`InputItem` with an
error (naming file and line) instead of stopping the run; so does a row whose
id is null or empty, and a file that cannot be read at all (truncated Parquet,
bad compression, a non-data file matched by the glob): its rows read before
the damage stay, and one failed item with the id ``__input_error__:<path>``
stands for the rest. Duplicate ids are marked (``duplicate_of``).

Path mistakes (no such file, a glob matching nothing, a plain directory, a
hub dataset neither reachable nor cached) are config errors: :func:`check_input`
raises :class:`InputPathError` for them before anything starts."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class HFDatasetConf:
    """A dataset on the Hugging Face Hub, read through ``datasets`` (docs/datasets.md)."""

    name: str | None = None  # hub dataset id (e.g. TIGER-Lab/MMLU-Pro); set it instead of dataset.path
    config: str | None = None  # the dataset's configuration (subset); null: its default
    split: str = "train"  # which split to read
    revision: str | None = None  # branch, tag or commit; null: main (offline: the cached copy)
    streaming: bool = False  # read rows as they download (no prepared copy in the cache); for huge inputs


@dataclass
class DatasetConf:
    path: str | None = None  # file or glob of .jsonl / .jsonl.zst / .parquet files, or a saved HF dataset dir
    split: str | None = None  # HF dataset dir holding several splits: which one
    format: str = "auto"  # auto | jsonl | parquet (auto: by file extension)
    id_column: str | None = "id"  # column holding the task id; null: a stable hash of the row
    required_columns: list[str] = field(default_factory=list)  # rows missing one fail with a clear error
    limit: int | None = None  # process at most this many input rows (first N)
    hf: HFDatasetConf = field(default_factory=HFDatasetConf)  # a hub dataset by name (instead of path)


@dataclass
class InputItem:
    id: str
    row: dict[str, Any] | None  # None when the row could not be read
    error: str | None = None  # what was wrong and where (file:line)
    raw: str | None = None  # the unparseable text, kept in the failed row
    where: str = ""  # file:line (or file:row N) for error messages
    duplicate_of: str | None = None  # this id was seen before, at this file:line (the driver reports it)
    sample: int = 0  # which of run.samples_per_input draws of the row this task is (set by the runtime)
    seed: int | None = None  # that draw's seed (None: one draw per row, no per-task seed)


INPUT_ERROR_ID_PREFIX = "__input_error__:"  # id of the failed item that stands for an unreadable file
FORMATS = ("auto", "jsonl", "parquet")


class InputError(ValueError):
    """The dataset config points at nothing usable."""


class InputPathError(InputError):
    """dataset.path names no file, a glob matching nothing, or a plain directory."""


def check_input(conf: DatasetConf) -> None:
    """Raise :class:`InputPathError` (one line, names the setting) when
    ``dataset.path`` cannot be read; cheap, so a run calls it before Ray starts.

    >>> check_input(DatasetConf(path="/nowhere/*.jsonl"))  # doctest: +SKIP
    InputPathError: dataset.path='/nowhere/*.jsonl' matches no file
    """
    if conf.format not in FORMATS:
        raise InputPathError(f"dataset.format={conf.format!r}; valid choices: {', '.join(FORMATS)}")
    if conf.hf.name:
        if _path_set(conf):
            raise InputPathError(f"dataset.path={conf.path!r} and dataset.hf.name={conf.hf.name!r} are both set; "
                                 "keep one (dataset.path=null, or dataset=hf on the command line)")
        from matrix_hpc.store.hf_input import check_hf_dataset

        check_hf_dataset(conf.hf)
        return
    files = input_files(conf)
    named = Path(str(conf.path)).expanduser()
    if conf.format == "auto" and files == [named] and named.is_file():  # one file named outright
        try:
            _format_of(named)
        except ValueError as e:
            raise InputPathError(f"dataset.path={conf.path!r}: {e}") from None


def _path_set(conf: DatasetConf) -> bool:
    return conf.path not in (None, "", "???")


def input_files(conf: DatasetConf) -> list[Path]:
    from matrix_hpc.store.hf_input import is_hf_dataset_dir

    if not _path_set(conf):
        raise InputPathError("dataset.path is not set: give a JSONL/Parquet file or glob, a save_to_disk "
                             "directory, or a hub dataset with dataset.hf.name=<id>")
    assert conf.path is not None
    pattern = str(Path(conf.path).expanduser())
    if not glob.has_magic(pattern):
        path = Path(pattern)
        if not path.exists():
            raise InputPathError(f"dataset.path={conf.path!r}: no such file")
        if path.is_dir() and not is_hf_dataset_dir(path):
            raise InputPathError(f"dataset.path={conf.path!r} is a directory; give a file or a glob such as "
                                 f"'{conf.path.rstrip('/')}/*.jsonl' (or a dir written by save_to_disk)")
        return [path]
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    files = [f for f in paths if f.is_file() or is_hf_dataset_dir(f)]
    if not files:
        dirs = f" (only directories: {', '.join(map(str, paths[:3]))})" if paths else ""
        raise InputPathError(f"dataset.path={conf.path!r} matches no file{dirs}")
    return files


def iter_input(conf: DatasetConf) -> Iterator[InputItem]:
    """Every input row of every file, in order, each with its task id.

    A second row with an id already seen gets ``duplicate_of`` = where the
    first was (see :class:`SeenIds` for the memory this takes).
    """
    count = 0
    seen = SeenIds()
    for item in _iter_sources(conf):
        if item.row is not None:
            item.duplicate_of = seen.first_place(item.id, item.where)
        yield item
        count += 1
        if conf.limit is not None and count >= conf.limit:
            return


def _iter_sources(conf: DatasetConf) -> Iterator[InputItem]:
    if conf.hf.name:
        from matrix_hpc.store.hf_input import hf_source

        yield from _iter_safely(_iter_hf(conf), hf_source(conf.hf))
        return
    for path in input_files(conf):
        yield from _iter_safely(_iter_file(path, conf), str(path))


def _iter_hf(conf: DatasetConf) -> Iterator[InputItem]:
    from matrix_hpc.store.hf_input import hf_source, iter_hf_batches, load_hf_split

    # Loaded inside the generator: a damaged cache fails like a damaged file (one failed item).
    yield from _rows_of_batches(iter_hf_batches(load_hf_split(conf.hf)), conf, hf_source(conf.hf),
                                f"{conf.hf.name}:row")


EXACT_INPUT_IDS_ENV = "MATRIX_HPC_INPUT_EXACT_IDS"


class SeenIds:
    """The input ids seen so far, to mark repeats.

    Exact (a dict id -> where, ~100 bytes an id) up to ``exact_limit`` ids
    (``MATRIX_HPC_INPUT_EXACT_IDS``, default 10,000,000, about 1 GB); past
    that the ids are kept as 64-bit hashes (8 bytes an id), repeats of ids
    seen before the switch still name their first place, and a warning gives
    the bound on a unique id being taken for a repeat (ids^2 / 2^65).
    """

    def __init__(self, exact_limit: int | None = None) -> None:
        self.exact_limit = exact_limit if exact_limit is not None else int(
            os.environ.get(EXACT_INPUT_IDS_ENV, "10000000"))
        self._exact: dict[str, str] = {}
        self._hashes: Any = None  # a GrowingHashSet once past the limit

    def first_place(self, task_id: str, where: str) -> str | None:
        """Where ``task_id`` was seen first (None: first time; records it)."""
        first = self._exact.get(task_id)
        if first is not None:
            return first
        if self._hashes is None:
            self._exact[task_id] = where
            if len(self._exact) >= self.exact_limit:
                self._switch_to_hashes()
            return None
        if self._hashes.maybe_contains(task_id):
            return "an earlier row (not recorded: more input ids than the exact limit)"
        self._hashes.add_many([task_id])
        return None

    def _switch_to_hashes(self) -> None:
        import pyarrow as pa

        from matrix_hpc.store.ids import GrowingHashSet, hash_ids

        self._hashes = GrowingHashSet(hash_ids(pa.array(list(self._exact), pa.string())))
        log.warning("input: more than %d ids; later repeats are found by 64-bit hash (a unique id is taken for a "
                    "repeat with probability below ids^2 / 2^65). Raise %s to stay exact.", self.exact_limit,
                    EXACT_INPUT_IDS_ENV)


def _iter_safely(items: Iterator[InputItem], source: str) -> Iterator[InputItem]:
    """The rows of one file (or hub dataset); if it breaks off, the rows read so
    far and one failed item naming it and the point where reading stopped."""
    rows = 0
    try:
        for item in items:
            rows += 1
            yield item
    except InputPathError:
        raise
    except Exception as e:  # any reader error: the rest of the input goes on
        yield unreadable_file_item(source, rows, e)


def unreadable_file_item(path: Path | str, rows_read: int, error: BaseException) -> InputItem:
    where = f"{path}" if rows_read == 0 else f"{path} after {rows_read} row(s)"
    message = (f"{where}: input file unreadable ({type(error).__name__}: {str(error)[:300]}); "
               f"{'no row' if rows_read == 0 else 'no further row'} of it was read. Fix or remove the file and "
               "rerun with run.retry=failed.")
    return InputItem(f"{INPUT_ERROR_ID_PREFIX}{path}", None, message, None, str(path))


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
        raise InputPathError(f"dataset.format={fmt!r} for {path}; valid choices: {', '.join(FORMATS)}")


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.zst", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"cannot tell the format of {path.name} by its extension (not .jsonl, .jsonl.zst, .json, "
                     ".ndjson or .parquet); narrow dataset.path's glob or set dataset.format")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        return io.TextIOWrapper(io.BufferedReader(_ZstdFrames(path)), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a .zst file (any number of frames). Unlike
    zstandard's stream_reader it raises at the end of a truncated file
    instead of ending quietly, so a cut-off input is reported."""

    def __init__(self, path: Path) -> None:
        import zstandard  # lazy: only for compressed input

        self._path = path
        self._zstd = zstandard
        self._file = open(path, "rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._file.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError(f"{self._path}: compressed data ends inside a frame (file truncated?)")
                return 0
            self._decompress(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> None:
        while data:
            self._in_frame = True
            self._pending += self._frame.decompress(data)
            if not self._frame.eof:
                return
            self._in_frame = False
            data = self._frame.unused_data
            self._frame = self._zstd.ZstdDecompressor().decompressobj()

    def close(self) -> None:
        self._file.close()
        super().close()


def _iter_jsonl(path: Path, conf: DatasetConf) -> Iterator[InputItem]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield InputItem(where, None, f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})",
                                line[:4096], where)
                continue
            if not isinstance(row, dict):
                yield InputItem(where, None, f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}",
                                line[:4096], where)
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
    from matrix_hpc.store.hf_input import iter_hf_batches, load_hf_dataset

    yield from _rows_of_batches(iter_hf_batches(load_hf_dataset(path, conf.split)), conf, str(path),
                                f"{path.name}:row")


def _rows_of_batches(batches: Iterator[Any], conf: DatasetConf, source: str, fallback: str) -> Iterator[InputItem]:
    """Items of Arrow record batches / tables, each row named ``source:row N``."""
    offset = 0
    for batch in batches:
        for i, row in enumerate(batch.to_pylist(), offset):
            yield _item(row, conf, f"{source}:row {i}", f"{fallback}{i}")
        offset += batch.num_rows


def _item(row: dict[str, Any], conf: DatasetConf, where: str, fallback_id: str) -> InputItem:
    missing = [c for c in conf.required_columns if c not in row]
    if conf.id_column and conf.id_column not in row:
        missing.insert(0, conf.id_column)
    if missing:
        return InputItem(fallback_id, None, f"{where}: missing required column(s) {missing}",
                         json.dumps(row, default=str)[:4096], where)
    if not conf.id_column:
        return InputItem(stable_row_hash(row), row, where=where)
    raw_id = row[conf.id_column]
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        what = "null" if raw_id is None else "empty"
        return InputItem(fallback_id, None, f"{where}: the id column {conf.id_column!r} is {what}; give every row "
                         "an id, or set dataset.id_column=null to use a hash of the row",
                         json.dumps(row, default=str)[:4096], where)
    return InputItem(str(raw_id), row, where=where)


def stable_row_hash(row: dict[str, Any]) -> str:
    """An id for rows without one: the same row always gets the same id."""
    blob = json.dumps(row, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha1(blob).hexdigest()[:20]


def count_input_rows(conf: DatasetConf) -> int:
    """Rows in the input (for the ETA): lines of JSONL, metadata of Parquet,
    the split's size recorded with a Hugging Face dataset."""
    if conf.hf.name:
        from matrix_hpc.store.hf_input import count_hf_rows

        total = count_hf_rows(conf.hf)
        return min(total, conf.limit) if conf.limit is not None else total
    total = 0
    for path in input_files(conf):
        try:
            total += _count_rows(path, conf)
        except Exception:  # an unreadable file ends as one failed item
            total += 1
    return min(total, conf.limit) if conf.limit is not None else total


def _count_rows(path: Path, conf: DatasetConf) -> int:
    if path.is_dir():
        from matrix_hpc.store.hf_input import load_hf_dataset

        return int(load_hf_dataset(path, conf.split).num_rows)
    if (conf.format if conf.format != "auto" else _format_of(path)) == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with _open_text(path) as f:
        return sum(1 for line in f if line.strip())
