"""``matrix-hpc export hf|jsonl``: an output's rows in the formats trainers read.

Both stream: part files are read a row group at a time (``source``), so
memory stays flat on any number of rows.

- ``export_hf`` writes the selected rows as one Arrow stream into a staging
  directory beside ``dest``, opens it memory-mapped with
  ``datasets.Dataset.from_file`` and lets ``save_to_disk`` lay out the
  shards (the library owns its on-disk format), adds a dataset card
  (README.md: the run's config, counts by status, token totals) and renames
  the staging directory to ``dest``. Disk: twice the dataset while it runs.
- ``export_jsonl`` writes one JSON object per row to a temp file and renames it.

    result = export_hf(Path("out/run1"), Path("exports/run1_hf"))
    datasets.load_from_disk("exports/run1_hf")
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from matrix_hpc.data.source import OutputSource, SourceError, check_destination
from matrix_hpc.store.layout import META_DIR
from matrix_hpc.store.resume import IDENTITY_FILE
from matrix_hpc.store.verify import summarize_output

SHARD_SIZE = "500MB"  # save_to_disk's shard size


@dataclass
class ExportResult:
    dest: Path
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    notes: list[str] = field(default_factory=list)  # lines for the user (e.g. a run in progress)


def export_jsonl(out_dir: Path, dest: Path, statuses: tuple[str, ...] | None = ("ok",),
                 force: bool = False) -> ExportResult:
    """The selected rows of ``out_dir`` as JSON Lines at ``dest`` (replaced only complete)."""
    src = OutputSource.open(out_dir, statuses)
    check_destination(out_dir, dest, force)
    result = ExportResult(Path(dest), notes=_notes(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for batch in _stream(src, result):
                f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in batch.to_pylist())
            f.flush()
            os.fsync(f.fileno())
        _refuse_empty(src, result)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def export_hf(out_dir: Path, dest: Path, statuses: tuple[str, ...] | None = ("ok",),
              force: bool = False) -> ExportResult:
    """The selected rows of ``out_dir`` as a ``datasets.load_from_disk`` directory at ``dest``."""
    src = OutputSource.open(out_dir, statuses)
    check_destination(out_dir, dest, force)
    schema = src.schema().remove_metadata()
    result = ExportResult(Path(dest), notes=_notes(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir()
        stream = staging / "rows.arrow"
        with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in _stream(src, result, schema):
                writer.write_batch(batch)
        _refuse_empty(src, result)  # datasets cannot load a saved dataset of no shards
        _save_to_disk(stream, staging / "dataset")
        card = dataset_card(src, result, schema)
        (staging / "dataset" / "README.md").write_text(card, encoding="utf-8")
        _replace_dir(staging / "dataset", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _notes(src: OutputSource) -> list[str]:
    note = src.live_note()
    return [note] if note else []


def _refuse_empty(src: OutputSource, result: ExportResult) -> None:
    if result.rows == 0:
        picked = "any status" if src.statuses is None else ", ".join(src.statuses)
        raise SourceError(f"{src.out_dir} holds no rows with status {picked} (`matrix-hpc inspect {src.out_dir}` "
                          "counts them); nothing exported. Choose others with --status or --all")


def _stream(src: OutputSource, result: ExportResult, schema: pa.Schema | None = None) -> Iterator[pa.RecordBatch]:
    for path in src.files:
        for batch in src.batches(path, schema=schema):
            if batch.num_rows == 0:
                continue
            result.rows += batch.num_rows
            result.prompt_tokens += _sum(batch, "prompt_tokens")
            result.completion_tokens += _sum(batch, "completion_tokens")
            yield batch


def _sum(batch: pa.RecordBatch, column: str) -> int:
    if column not in batch.schema.names:
        return 0
    return int(pc.sum(batch.column(column)).as_py() or 0)


def _save_to_disk(stream: Path, target: Path) -> None:
    try:
        import datasets
    except ImportError as e:  # a runtime dependency; a broken install says so
        raise RuntimeError("export hf needs the `datasets` package: pip install datasets") from e
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_file(str(stream), in_memory=False)  # memory-mapped: no copy in RAM
    ds.save_to_disk(str(target), max_shard_size=SHARD_SIZE)


def _replace_dir(ready: Path, dest: Path) -> None:
    """``ready`` becomes ``dest``; an old ``dest`` (``--force``) is moved away first, deleted after."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
    os.rename(ready, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


# -- the dataset card ------------------------------------------------------------
def dataset_card(src: OutputSource, result: ExportResult, schema: pa.Schema) -> str:
    """README.md for the exported dataset: what it holds and the config that made it."""
    summary = summarize_output(src.out_dir)
    identity = _identity(src.out_dir)
    picked = "all statuses" if src.statuses is None else ", ".join(src.statuses)
    total = sum(summary.by_status.values())
    lines = [
        "---",
        "tags: [synthetic, matrix-hpc]",
        "---",
        f"# {src.out_dir.name}",
        "",
        f"Synthetic data generated with matrix-hpc, exported from `{src.out_dir}` on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
        "",
        "```python",
        "import datasets",
        f"ds = datasets.load_from_disk({str(result.dest)!r})",
        "```",
        "",
        "## Rows",
        "",
        f"This dataset: {result.rows:,} rows ({picked}); tokens: prompt {result.prompt_tokens:,}, "
        f"completion {result.completion_tokens:,}, total {result.prompt_tokens + result.completion_tokens:,}.",
        "",
        f"The output holds {total:,} rows ({summary.tokens:,} tokens):",
        "",
        "| status | rows |",
        "|---|---|",
        *[f"| {k} | {v:,} |" for k, v in sorted(summary.by_status.items())],
        "",
    ]
    lines += _warnings(src, summary.duplicate_ids)
    lines += ["## Columns", "", "| column | type |", "|---|---|",
              *[f"| {f.name} | {f.type} |" for f in schema], "",
              "`input` is the input row and `result` the workflow's fields, both as JSON text; `messages` holds "
              "each agent step with its token counts.", "",
              "## Config", "",
              f"From `{src.out_dir / META_DIR / IDENTITY_FILE}` (secrets shown as `***`):", "",
              "```json", json.dumps(identity, indent=2, sort_keys=True, default=str) if identity else "(not recorded)",
              "```", ""]
    return "\n".join(lines)


def _warnings(src: OutputSource, duplicate_ids: int) -> list[str]:
    out = []
    if src.live_holder is not None:
        out.append("Exported while a run was writing the output: rows committed after the export began are not "
                   "included.")
    if duplicate_ids:
        out.append(f"Warning: {duplicate_ids} id(s) appear more than once in the output (`matrix-hpc inspect`).")
    return out + ([""] if out else [])


def _identity(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / META_DIR / IDENTITY_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


Exporter = Callable[..., ExportResult]
EXPORTERS: dict[str, Exporter] = {"hf": export_hf, "jsonl": export_jsonl}
