"""``matrix-hpc curate dedup|decontaminate OUTPUT_DIR ...``: Ray Data curation (docs/datasets_out.md).

    matrix-hpc curate dedup out/run1 --column result.answer --dest curated/run1_dedup --threshold 0.8
    matrix-hpc curate decontaminate out/run1 --column result --against mmlu_pro_test.jsonl --dest curated/run1_clean

Rerun the same command to continue after an interruption. Ray: the cluster
named by ``--address`` / ``$MATRIX_RAY_ADDRESS`` / ``$RAY_ADDRESS``, else a
local Ray on this machine's cores (``--num-cpus``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from matrix_hpc.cli.export_cmd import add_selection
from matrix_hpc.cli.main import fail


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matrix-hpc curate", description="Curate an output directory with Ray Data.")
    sub = p.add_subparsers(dest="kind", required=True)
    d = sub.add_parser("dedup", help="drop exact and near duplicates (MinHash + LSH)")
    _common(d)
    d.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates (0.8)")
    d.add_argument("--ngram", type=int, default=5, help="words per shingle (5)")
    d.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (128)")
    c = sub.add_parser("decontaminate", help="drop rows sharing an n-gram run with a benchmark")
    _common(c)
    c.add_argument("--against", nargs="+", required=True, type=Path, help="benchmark files (.jsonl, .parquet, "
                   "save_to_disk dirs)")
    c.add_argument("--ngram", type=int, default=13, help="words in an overlapping run (13)")
    c.add_argument("--bench-column", action="append", default=[], help="benchmark fields to index (default: all "
                   "string fields); repeatable")
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", type=Path, help="the run's output.dir (read only)")
    p.add_argument("--column", action="append", required=True, help="column to compare (COL or COL.json.path); "
                   "repeatable, joined by newlines")
    p.add_argument("--dest", type=Path, required=True, help="where the curated dataset and its report go")
    add_selection(p)
    p.add_argument("--force", action="store_true", help="start over, replacing DEST")
    p.add_argument("--address", default=None, help="Ray address to attach to (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")


def curate_command(args: list[str]) -> int:
    opts = parser().parse_args(args)
    from matrix_hpc.data.source import SourceError, parse_statuses

    try:
        statuses = parse_statuses(opts.status, opts.all_rows)
        conf = _conf(opts, statuses)
        _check_before_ray(opts, conf)
        started = _init_ray(opts.address, opts.num_cpus)
        try:
            result = _run(opts, conf)
        finally:
            if started:
                import ray

                ray.shutdown()
    except SourceError as e:
        return fail(str(e))
    for note in result.notes:
        print(note)
    print(_describe(result))
    return 0


def _conf(opts: argparse.Namespace, statuses: tuple[str, ...] | None) -> Any:
    if opts.kind == "dedup":
        from matrix_hpc.data.dedup import DedupConf

        return DedupConf(tuple(opts.column), opts.threshold, opts.ngram, opts.num_perm, statuses)
    from matrix_hpc.data.decontaminate import DecontaminateConf

    return DecontaminateConf(tuple(opts.column), tuple(str(p) for p in opts.against), opts.ngram,
                             tuple(opts.bench_column), statuses)


def _check_before_ray(opts: argparse.Namespace, conf: Any) -> None:
    """A wrong directory, column or benchmark path is reported before Ray starts (seconds)."""
    from matrix_hpc.data.dedup import check_columns
    from matrix_hpc.data.source import OutputSource, SourceError, check_destination

    check_columns(OutputSource.open(opts.output_dir, conf.statuses), conf.columns)
    check_destination(opts.output_dir, opts.dest, force=True)
    for bench in getattr(conf, "against", ()):
        if not Path(bench).exists():
            raise SourceError(f"--against {bench}: no such file")


def _run(opts: argparse.Namespace, conf: Any) -> Any:
    if opts.kind == "dedup":
        from matrix_hpc.data.dedup import dedup

        return dedup(opts.output_dir, opts.dest, conf, opts.force)
    from matrix_hpc.data.decontaminate import decontaminate

    return decontaminate(opts.output_dir, opts.dest, conf, opts.force)


def _describe(result: Any) -> str:
    if hasattr(result, "dropped_exact"):
        return (f"{result.rows:,} rows compared: kept {result.kept:,}, dropped {result.dropped_exact:,} exact and "
                f"{result.dropped_near:,} near duplicates ({result.clusters:,} clusters; LSH bands b={result.bands[0]}"
                f" r={result.bands[1]}); {result.no_text:,} rows without text kept -> {result.dest}")
    return (f"{result.rows:,} rows checked against {result.benchmark_ngrams:,} benchmark n-grams: kept "
            f"{result.kept:,}, dropped {result.dropped:,} -> {result.dest}")


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Attach to a cluster or start a local Ray; True when we started (and must stop) it."""
    address = address or os.environ.get("MATRIX_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return True
    from matrix_hpc.cluster.local_ray import start_local_ray

    start_local_ray(num_cpus, log_to_driver=False)
    return True
