"""Resume: which ids the output already holds, and whether this run may add
to it (same workflow config, same dataset).

:func:`scan_output` is the one entry point a run calls (holding the output
lock, see :mod:`matrix_hpc.store.lock`): it tidies what killed writers left
behind, quarantines unreadable part files, optionally moves failed rows aside
for ``run.retry=failed``, and returns the committed ids as a compact
:class:`~matrix_hpc.store.ids.IdSet`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from matrix_hpc.store.ids import IdSet, contains_nul, hash_ids, longest_utf8_bytes
from matrix_hpc.store.layout import (
    HISTORY_DIR,
    META_DIR,
    QUARANTINE_DIR,
    data_files,
    fsync_dir,
    read_columns,
    remove_temp_files,
    repair_compactions,
    temp_path,
    write_table_atomic,
    write_temp,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
IDENTITY_FILE = "identity.json"
LEGACY_WORKFLOW_FILE = "workflow.yaml"
DATASET_IDENTITY_KEYS = ("path", "id_column", "hf.name", "hf.config", "hf.split", "hf.revision")

__all__ = ["IdSet", "OutputScan", "ResumeRefused", "check_and_record_config", "scan_output"]


class ResumeRefused(RuntimeError):
    """The output directory was written with a different workflow config or dataset."""


@dataclass
class OutputScan:
    done: IdSet  # ids whose row is final (skipped by this run)
    retried: int = 0  # failed rows moved aside because retry_failed=True
    quarantined: list[Path] = field(default_factory=list)  # corrupt part files moved to _matrix/quarantine/
    duplicates: int = 0  # ids present more than once (should be 0)


def scan_output(out_dir: Path, retry_failed: bool = False, repair: bool = True) -> OutputScan:
    """Call only while holding OutputLock: removes temp files, finishes interrupted compactions,
    quarantines unreadable part files (their ids re-run unless another readable file holds them),
    with ``retry_failed`` moves rows whose status is 'failed' aside to _matrix/history/ (atomically:
    readers never see an id twice, and a crash at any point leaves either the old state or the new one),
    then returns the committed ids.

    ``repair=False`` only reads (for a check while sinks still live): no
    temp file, compaction or unreadable file is touched; unreadable files
    are skipped (logged) and ``retry_failed`` must be False.

    Memory: 8 bytes per committed id (sorted 64-bit hashes) plus one file's id column at a time.

    >>> scan = scan_output(Path("out/run1"))          # doctest: +SKIP
    >>> "task-17" in scan.done, len(scan.done)         # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if retry_failed and not repair:
        raise ValueError("scan_output(retry_failed=True) rewrites files; it cannot be combined with repair=False")
    if not out_dir.exists():
        return OutputScan(IdSet.empty())
    set_aside = _quarantiner(out_dir) if repair else _skipper
    if repair:
        _tidy(out_dir)
    rows_of, quarantined = _readable_files(out_dir, set_aside)
    retried = sum(supersede_failed_rows(out_dir, f) for f in list(rows_of)) if retry_failed else 0
    if retried:
        rows_of, _ = _readable_files(out_dir, set_aside)  # row counts changed
    hashes, files, more_quarantined, longest, has_nul = _hash_all(rows_of, set_aside)
    quarantined += more_quarantined
    hashes.sort()
    duplicates = int(np.count_nonzero(hashes[1:] == hashes[:-1])) if len(hashes) > 1 else 0
    if duplicates:
        log.error("%s holds %d id(s) more than once; `matrix-hpc inspect %s` lists examples", out_dir,
                  duplicates, out_dir)
    done = IdSet(hashes, _id_loader(files), longest, has_nul)
    return OutputScan(done, retried, quarantined, duplicates)


def _tidy(out_dir: Path) -> None:
    """What killed writers left: temp files, compactions whose sources remain."""
    remove_temp_files(out_dir)
    repaired = repair_compactions(out_dir)
    if repaired:
        log.warning("finished %d interrupted compaction(s) in %s (deleted merged sources)", len(repaired), out_dir)


# -- reading, quarantine ---------------------------------------------------------
SetAside = Callable[[Path, BaseException], "Path | None"]


def _quarantiner(out_dir: Path) -> SetAside:
    return lambda path, error: quarantine(out_dir, path, error)


def _skipper(path: Path, error: BaseException) -> Path | None:
    log.error("part file %s is unreadable (%s: %s); not counted (the next run quarantines it)", path,
              type(error).__name__, str(error)[:200])
    return None


def _readable_files(out_dir: Path, set_aside: SetAside) -> tuple[dict[Path, int], list[Path]]:
    """Rows of each data file whose footer reads; the others are set aside."""
    good: dict[Path, int] = {}
    bad: list[Path] = []
    for f in data_files(out_dir):
        try:
            good[f] = pq.read_metadata(f).num_rows
        except (OSError, pa.ArrowException) as e:
            moved = set_aside(f, e)
            bad += [moved] if moved is not None else []
    return good, bad


def quarantine(out_dir: Path, path: Path, error: BaseException) -> Path:
    """Move an unreadable part file out of the dataset, into _matrix/quarantine/
    (same relative path). Its ids count as not written, so they run again."""
    rel = path.relative_to(out_dir)
    target = out_dir / META_DIR / QUARANTINE_DIR / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{target.stem}-{uuid.uuid4().hex[:8]}{target.suffix}")
    os.rename(path, target)
    fsync_dir(path.parent)
    log.error("part file %s is unreadable (%s: %s, %d bytes); moved to %s. Its ids run again unless another "
              "file holds them.", path, type(error).__name__, str(error)[:200], target.stat().st_size, target)
    return target


def _hash_all(rows_of: dict[Path, int], set_aside: SetAside) -> tuple[np.ndarray, list[Path], list[Path], int, bool]:
    """Hashes of every id, in one preallocated array (no list of per-file copies)."""
    files = list(rows_of)
    hashes = np.empty(sum(rows_of.values()), np.uint64)
    filled, longest, has_nul = 0, 0, False
    kept: list[Path] = []
    quarantined: list[Path] = []
    for f in files:
        try:
            ids = read_columns(f, ["id"]).column("id")
        except (OSError, pa.ArrowException, KeyError) as e:
            moved = set_aside(f, e)
            quarantined += [moved] if moved is not None else []
            continue
        ids = ids.filter(pc.is_valid(ids)) if ids.null_count else ids
        hashes[filled:filled + len(ids)] = hash_ids(ids)
        filled += len(ids)
        longest = max(longest, longest_utf8_bytes(ids))
        has_nul = has_nul or contains_nul(ids)
        kept.append(f)
    return hashes[:filled], kept, quarantined, longest, has_nul


def _id_loader(files: list[Path]) -> Callable[[], Iterator[pa.Array]]:
    def load() -> Iterator[pa.Array]:
        for f in files:
            ids = read_columns(f, ["id"]).column("id")
            yield (ids.filter(pc.is_valid(ids)) if ids.null_count else ids).combine_chunks()

    return load


# -- run.retry=failed ----------------------------------------------------------
def supersede_failed_rows(out_dir: Path, path: Path) -> int:
    """Move the ``failed`` rows of one part file to _matrix/history/ so their
    ids run again; returns how many rows moved.

    Steps, each leaving a consistent output if the process dies after it:
    1. the failed rows are written (durably) to a new history file: outside
       the dataset, so readers never see them twice;
    2. the remaining rows are written to a temp file beside ``path``;
    3. ``os.replace`` swaps it in (or ``path`` is unlinked when nothing
       remains): readers see the old file or the new one, never both.
    A crash before 3 leaves the old file (its failed rows are moved again next
    time; history may then hold a copy twice, which no reader counts).
    """
    status = read_columns(path, ["status"]).column("status")
    failed = pc.fill_null(pc.equal(status, "failed"), False)
    moved = int(pc.sum(failed).as_py() or 0)
    if moved == 0:
        return 0
    table = read_columns(path)
    failed = pc.fill_null(pc.equal(table.column("status"), "failed"), False)
    history = out_dir / META_DIR / HISTORY_DIR / path.parent.relative_to(out_dir) / (
        f"{path.stem}-retried-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.parquet")
    write_table_atomic(table.filter(failed), history, "zstd", "retry")
    rest = table.filter(pc.invert(failed))
    if rest.num_rows:
        tmp = temp_path(path, "retry")
        write_temp(rest, tmp, "zstd")
        os.replace(tmp, path)  # the one deliberate replacement: the same rows less the failed ones
    else:
        path.unlink()
    fsync_dir(path.parent)
    log.info("retry=failed: %d failed row(s) of %s moved to %s", moved, path, history)
    return moved


# -- the config check ----------------------------------------------------------
def check_and_record_config(out_dir: Path, identity: dict[str, Any], defaults: dict[str, Any],
                            full_yaml: str, force: bool, growable: tuple[str, ...] = ()) -> bool:
    """Refuse a resume whose workflow config or dataset differs (unless ``force``).

    ``identity`` = {"workflow": {...resolved plain values...}, "dataset": {"path": ..., "id_column": ...}};
    ``defaults`` has the same shape with each field's default. Values are compared, not text: a key
    new in this run whose value equals its default is compatible, and so is a removed key that was
    at its default. A ``growable`` key (dotted, e.g. ``run.samples_per_input``) may grow: the run
    adds to the output, and the larger value is recorded; a smaller one is a difference.
    Returns True when the directory already had a run (this is a resume).

    >>> check_and_record_config(Path("out"), {"workflow": {"name": "coral", "max_turns": 20}},
    ...                         {"workflow": {"max_turns": 20}}, "...", force=False)  # doctest: +SKIP
    False
    """
    meta = Path(out_dir) / META_DIR
    recorded = _recorded_identity(meta)
    if recorded is None:
        _record(meta, identity, full_yaml)
        return False
    differences = compare_identity(recorded, identity, defaults, growable)
    if differences and not force:
        raise ResumeRefused(_refusal(out_dir, differences))
    if differences:
        log.warning("resuming %s with a different config (run.resume=force): %s", out_dir, "; ".join(differences))
    grown = _grown(recorded, identity, defaults, growable)
    if grown:
        log.info("resuming %s with %s: the run adds what the larger value asks for", out_dir,
                 ", ".join(f"{k} raised to {v}" for k, v in grown.items()))
    if grown or not (meta / IDENTITY_FILE).exists():
        _write_json(meta / IDENTITY_FILE, _with_values(_merge_missing(identity, recorded), grown))
    return True


def recorded_identity(out_dir: Path) -> dict[str, Any] | None:
    """What the output's runs recorded as its identity (None: no run yet)."""
    return _recorded_identity(Path(out_dir) / META_DIR)


def _recorded_identity(meta: Path) -> dict[str, Any] | None:
    path = meta / IDENTITY_FILE
    if path.exists():
        return dict(json.loads(path.read_text()))
    legacy = meta / LEGACY_WORKFLOW_FILE
    if legacy.exists():  # outputs written before identity.json: the workflow only
        import yaml

        return {"workflow": yaml.safe_load(legacy.read_text()) or {}}
    return None


def _record(meta: Path, identity: dict[str, Any], full_yaml: str) -> None:
    import yaml

    meta.mkdir(parents=True, exist_ok=True)
    (meta / CONFIG_FILE).write_text(full_yaml)
    (meta / LEGACY_WORKFLOW_FILE).write_text(yaml.safe_dump(identity.get("workflow", {}), sort_keys=False))
    _write_json(meta / IDENTITY_FILE, identity)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _merge_missing(identity: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """A legacy output gets its identity recorded: what it recorded wins."""
    return {**identity, **recorded}


_MISSING = object()


def compare_identity(recorded: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any],
                     growable: tuple[str, ...] = ()) -> list[str]:
    """Lines ``workflow.x: recorded 1 -> now 2`` for every incompatible difference."""
    before, after, default = _flatten(recorded), _flatten(now), _flatten(defaults)
    grown = _grown(recorded, now, defaults, growable)
    if "dataset" not in recorded:  # a legacy record: the dataset was not recorded, nothing to compare
        after = {k: v for k, v in after.items() if not k.startswith("dataset.")}
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, _MISSING), after.get(key, _MISSING)
        if _same(old, new):
            continue
        if old is _MISSING and _same(new, default.get(key, _MISSING)):
            continue  # a setting this release added, at its default
        if new is _MISSING and _same(old, default.get(key, _MISSING)):
            continue  # a setting this release removed, that was at its default
        if key in grown:
            continue
        lines.append(_difference(key, old, new)
                     + ("  (it may grow, not shrink: the output holds more)" if key in growable else ""))
    return lines


def _grown(recorded: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any],
           growable: tuple[str, ...]) -> dict[str, Any]:
    """The ``growable`` keys whose value is larger now than recorded (a missing record: its default)."""
    before, after, default = _flatten(recorded), _flatten(now), _flatten(defaults)
    grown = {}
    for key in growable:
        old, new = before.get(key, default.get(key)), after.get(key)
        if isinstance(old, int) and isinstance(new, int) and new > old:
            grown[key] = new
    return grown


def _with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` with the dotted keys of ``values`` set."""
    out = json.loads(json.dumps(tree, default=str))
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return dict(out)


def _same(a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING:
        return a is b
    if isinstance(a, bool) != isinstance(b, bool):  # True == 1 in Python, not in a config
        return False
    return bool(a == b)  # 1 == 1.0, lists and dicts by value


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)


def _difference(key: str, old: Any, new: Any) -> str:
    line = f"{key}: recorded {_show(old)} -> now {_show(new)}"
    if key.split(".")[0] == "dataset" and key.split(".", 1)[-1] in DATASET_IDENTITY_KEYS:
        line += "  (dataset identity changed: the output holds rows of another dataset or other ids)"
    return line


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _refusal(out_dir: Path, differences: list[str]) -> str:
    return (f"{out_dir} holds output of a different config; these settings differ:\n  "
            + "\n  ".join(differences)
            + "\nUse a new output.dir, set them back, or pass run.resume=force to add to it anyway.")
