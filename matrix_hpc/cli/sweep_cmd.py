"""A summary table of a Hydra multirun sweep (e.g. on Slurm through the
submitit launcher): one line per point, with what varied and what came out.

    matrix-hpc sweep multirun/2026-11-25/01-45-27

It reads each point's output, so it lives with the commands (the cluster
package below knows nothing of outputs).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SweepPoint:
    num: str  # the job's number in the sweep (its subdir)
    varied: str  # the overrides that differ between points
    output_dir: str  # the point's output.dir
    ok: int  # rows by status
    filtered: int
    failed: int
    wall_s: float  # first admission to last finish


def sweep_points(sweep_dir: Path) -> list[SweepPoint]:
    from omegaconf import OmegaConf

    subdirs = sorted((p for p in Path(sweep_dir).iterdir() if (p / ".hydra" / "config.yaml").exists()),
                     key=lambda p: int(p.name) if p.name.isdigit() else p.name)
    overrides = {p: list(OmegaConf.load(p / ".hydra" / "overrides.yaml")) for p in subdirs}
    common = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    points = []
    for p in subdirs:
        out = Path(str(OmegaConf.load(p / ".hydra" / "config.yaml").output.dir))
        counts, wall_s = _outcome(out)
        varied = " ".join(o for o in overrides[p] if o not in common)
        points.append(SweepPoint(p.name, varied, str(out), counts.get("ok", 0), counts.get("filtered", 0),
                                 counts.get("failed", 0), wall_s))
    return points


def _outcome(out_dir: Path) -> tuple[dict[str, int], float]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from matrix_hpc.store.layout import data_files

    files = data_files(out_dir)
    if not files:
        return {}, 0.0
    table = pq.ParquetDataset([str(f) for f in files]).read(columns=["status", "t_admitted", "t_finished"])
    counts = {str(r["values"]): int(r["counts"]) for r in pc.value_counts(table["status"]).to_pylist()}
    wall_s = float(pc.max(table["t_finished"]).as_py() - pc.min(table["t_admitted"]).as_py())
    return counts, wall_s


def format_sweep(points: list[SweepPoint]) -> str:
    header = ("job", "varied", "ok", "filtered", "failed", "wall_s", "output")
    rows = [(p.num, p.varied, str(p.ok), str(p.filtered), str(p.failed), f"{p.wall_s:.1f}", p.output_dir)
            for p in points]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def sweep_command(args: list[str]) -> int:
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: matrix-hpc sweep SWEEP_DIR  (a Hydra multirun dir, e.g. multirun/<date>/<time>)",
              file=sys.stderr)
        return 2
    print(format_sweep(sweep_points(Path(args[0]))))
    return 0
