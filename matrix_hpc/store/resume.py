"""Resume: which ids the output already holds, and whether this run may add
to it (same workflow config)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from matrix_hpc.store.layout import META_DIR, data_files, remove_temp_files

CONFIG_FILE = "config.yaml"


class ResumeRefused(RuntimeError):
    """The output directory was written with a different workflow config."""


def completed_ids(out_dir: Path) -> set[str]:
    """Ids of every committed row (reads only the ``id`` column)."""
    remove_temp_files(out_dir)
    chunks: list[pa.Array] = []
    for path in data_files(out_dir):
        chunks.extend(pq.read_table(path, columns=["id"]).column("id").chunks)
    if not chunks:
        return set()
    return set(pa.chunked_array(chunks, type=pa.string()).to_pylist())


def check_and_record_config(out_dir: Path, workflow_yaml: str, full_yaml: str, force: bool) -> bool:
    """Refuse a resume whose workflow config differs (unless ``force``).

    Returns True when the directory already had a run (this is a resume).
    """
    meta = out_dir / META_DIR
    recorded = meta / "workflow.yaml"
    if recorded.exists():
        before = recorded.read_text()
        if before != workflow_yaml and not force:
            diff = "".join(difflib.unified_diff(
                before.splitlines(True), workflow_yaml.splitlines(True), "recorded", "this run"))
            raise ResumeRefused(
                f"{out_dir} holds output of a different workflow config:\n{diff}\n"
                "Use a new output.dir, or pass run.resume=force to add to it anyway."
            )
        return True
    meta.mkdir(parents=True, exist_ok=True)
    (meta / CONFIG_FILE).write_text(full_yaml)
    recorded.write_text(workflow_yaml)
    return False
