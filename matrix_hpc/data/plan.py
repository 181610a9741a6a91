"""A curation's destination, its unit of work, and the Ray Data stage that runs the pending units.

    DEST/data/shard=00003/part-...-rg0000.parquet   the kept rows (one file per unit; a dataset for any reader)
    DEST/report/...                                  what was dropped, why, what matched
    DEST/summary.json                                counts and parameters, written last: the curation is complete
    DEST/_work/plan.json                             the command, its parameters and the units (recorded once)
    DEST/_work/<stage>/<unit>.parquet                a finished unit of a stage (its completion marker)

The unit is one row group of one committed part file: small enough to spread
over the cluster's cores, and a file name to mark it done. The plan is
recorded at the first run and reused by every rerun, so a rerun after a
kill continues with the same units (a run still writing the output cannot
change what the curation reads) and gives the same result. A rerun with other
parameters is refused unless ``force`` (which starts over).

Each stage is ``ray.data.from_items(pending units).map_batches(fn)``: Ray Data
schedules the units as tasks on every node's cores, ``fn`` reads its row
group from the shared filesystem, does the per-row work and publishes its
file atomically. Units already marked are not scheduled again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from matrix_hpc.data.source import OutputSource, SourceError, check_destination

PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
WORK_DIR = "_work"
DATA_DIR = "data"
REPORT_DIR = "report"


@dataclass(frozen=True)
class Unit:
    index: int
    file: str  # relative to the output directory
    row_group: int
    rows: int  # rows in the row group, before the status selection

    @property
    def name(self) -> str:
        return f"{self.index:06d}"

    def data_path(self, dest: Path) -> Path:
        rel = Path(self.file)
        return dest / DATA_DIR / rel.parent / f"{rel.stem}-rg{self.row_group:04d}.parquet"


@dataclass
class Plan:
    out_dir: Path
    dest: Path
    command: str
    params: dict[str, Any]  # everything that decides the result (columns, statuses, thresholds, ...)
    units: list[Unit]
    files: dict[str, int]  # part file -> size in bytes when planned

    @property
    def work(self) -> Path:
        return self.dest / WORK_DIR

    def marker(self, stage: str, unit: Unit) -> Path:
        return self.work / stage / f"{unit.name}.parquet"

    def pending(self, stage: str) -> list[Unit]:
        return [u for u in self.units if not self.marker(stage, u).exists()]

    def source(self) -> OutputSource:
        statuses = self.params.get("statuses")
        return OutputSource(self.out_dir, [self.out_dir / f for f in self.files], tuple(statuses)
                            if statuses is not None else None, None)

    def summary_path(self) -> Path:
        return self.dest / SUMMARY_FILE

    def finished(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.summary_path().read_text()))
        except (OSError, ValueError):
            return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path(), summary)


def open_plan(out_dir: Path, dest: Path, command: str, params: dict[str, Any], force: bool) -> Plan:
    """The recorded plan of ``dest`` (a resume), or a new one over the output's committed files."""
    out_dir, dest = Path(out_dir), Path(dest)
    check_destination(out_dir, dest, force=True)  # the overlap check; an existing dest is decided below
    recorded = dest / WORK_DIR / PLAN_FILE
    if dest.exists() and force:
        shutil.rmtree(dest)
    elif dest.exists() and not recorded.exists():
        raise SourceError(f"{dest} exists and is not a curation of this kind in progress; pass --force to "
                          "replace it, or choose another --dest")
    if recorded.exists():
        return _resume(recorded, out_dir, dest, command, params)
    src = OutputSource.open(out_dir, params.get("statuses"))
    plan = Plan(out_dir, dest, command, params, _units(src), {_rel(src, f): f.stat().st_size for f in src.files})
    write_json(recorded, {"out_dir": str(out_dir.resolve()), "command": command, "params": params,
                          "units": [asdict(u) for u in plan.units], "files": plan.files})
    return plan


def _units(src: OutputSource) -> list[Unit]:
    units: list[Unit] = []
    for f in src.files:
        meta = pq.read_metadata(f)
        for rg in range(meta.num_row_groups):
            units.append(Unit(len(units), _rel(src, f), rg, meta.row_group(rg).num_rows))
    return units


def _rel(src: OutputSource, f: Path) -> str:
    return str(f.relative_to(src.out_dir))


def _resume(recorded: Path, out_dir: Path, dest: Path, command: str, params: dict[str, Any]) -> Plan:
    saved = json.loads(recorded.read_text())
    now = {"out_dir": str(out_dir.resolve()), "command": command, "params": params}
    differ = [k for k in now if json.dumps(saved.get(k), sort_keys=True) != json.dumps(now[k], sort_keys=True)]
    if differ:
        lines = "; ".join(f"{k}: recorded {saved.get(k)!r} -> now {now[k]!r}" for k in differ)
        raise SourceError(f"{dest} holds a curation with other settings ({lines}); pass --force to start over "
                          "or choose another --dest")
    plan = Plan(out_dir, dest, command, params, [Unit(**u) for u in saved["units"]],
                {str(k): int(v) for k, v in saved["files"].items()})
    changed = [f for f, size in plan.files.items() if not _same_size(out_dir / f, size)]
    if changed:
        raise SourceError(f"{out_dir} changed since this curation began ({len(changed)} part file(s) gone or "
                          f"rewritten, e.g. {changed[0]}); pass --force to start over")
    return plan


def _same_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` only complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


# -- the Ray Data stage ------------------------------------------------------------
UnitFn = Callable[[dict[str, Any]], dict[str, Any]]
MAX_BLOCKS = 2_000


def run_stage(units: list[dict[str, Any]], fn: UnitFn) -> list[dict[str, Any]]:
    """``fn(unit)`` for every unit as Ray Data tasks (a connected Ray, or a local one); its stats rows."""
    if not units:
        return []
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # one line per stage is ours to print
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items(units, override_num_blocks=min(len(units), MAX_BLOCKS))
    out = ds.map_batches(_PerUnit(fn), batch_size=1, batch_format="pyarrow", num_cpus=1)
    return [dict(r) for r in out.take_all()]


class _PerUnit:
    """Applies ``fn`` to the one unit of each batch (a picklable function object for Ray Data)."""

    def __init__(self, fn: UnitFn) -> None:
        self.fn = fn

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch.to_pylist()
        results = [self.fn(r) for r in rows]
        return {k: [r[k] for r in results] for k in results[0]} if results else {}
