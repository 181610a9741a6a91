"""Near-duplicate dedup at scale: ``curate dedup`` over N rows of ~500 characters.

    .venv/bin/python benchmarks/bench_curate.py --rows 1000000 --num-cpus 2

Target (issue 15, on the 2-core dev machine): 1,000,000 rows in <= 10 min and
<= 4 GB. The synthetic output (written first, not timed) holds ``--rows``
rows whose ``result.answer`` is ~80 random words (~500 characters), 5% of
them exact copies (case and punctuation changed) and 5% near copies (one word
changed) of the first file's rows. The dedup runs on a local Ray of ``--num-cpus``;
peak memory is the largest sum of RSS over the process tree (driver, Ray's
daemons and workers; shared pages such as the object store are counted once
per process, so it overstates), sampled every 0.2 s. The load average is
printed before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrix_hpc.store.layout import part_file_name, shard_dir, write_table_atomic  # noqa: E402
from matrix_hpc.store.rows import output_schema  # noqa: E402

VOCAB = 20_000
WORDS_PER_ROW = 80


def make_texts(rng: np.random.Generator, n: int) -> list[str]:
    words = rng.integers(0, VOCAB, (n, WORDS_PER_ROW))
    return [" ".join(f"w{w}" for w in row) for row in words.tolist()]


def plant(rng: np.random.Generator, texts: list[str], pool: list[str], fraction: float) -> None:
    """Overwrite a ``fraction`` of ``texts`` with exact copies (upper case, "!") and as many with near
    copies (one word changed) of rows in ``pool`` (earlier rows)."""
    k = int(len(texts) * fraction)
    targets = rng.choice(len(texts), 2 * k, replace=False)
    for j, t in enumerate(targets):
        source = pool[int(rng.integers(0, len(pool)))]
        if j < k:
            texts[t] = source.upper() + "!"
        else:
            words = source.split()
            words[int(rng.integers(0, len(words)))] = "changed"
            texts[t] = " ".join(words)


def build_output(out: Path, rows: int, rows_per_file: int, seed: int = 0) -> None:
    """Written file by file (memory stays small); copies are planted from the first file's rows."""
    rng = np.random.default_rng(seed)
    schema = output_schema()
    pool: list[str] = []
    for n, start in enumerate(range(0, rows, rows_per_file)):
        part = make_texts(rng, min(rows_per_file, rows - start))
        if pool:
            plant(rng, part, pool, 0.05)
        else:
            pool = list(part)
        ids = [f"t{i:09d}" for i in range(start, start + len(part))]
        table = pa.table({
            "id": ids, "status": ["ok"] * len(part),
            "result": [json.dumps({"answer": t}) for t in part],
            "prompt_tokens": pa.array(np.full(len(part), 100), pa.int64()),
            "completion_tokens": pa.array(np.full(len(part), 120), pa.int64()),
        })
        table = pa.table({f.name: table.column(f.name) if f.name in table.column_names
                          else pa.nulls(len(part), f.type) for f in schema}, schema=schema)
        path = shard_dir(out, n % 64) / part_file_name("bench", n % 8, "0000beef", n)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table_atomic(table, path)


class PeakRss:
    """The largest RSS sum over this process and its descendants, sampled in a thread; ``peak_anon``
    counts anonymous memory only (RssAnon: not the pages of memory-mapped files, which the kernel can drop)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self.proc, self.interval_s, self.peak, self.peak_anon = psutil.Process(), interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        import psutil

        total, anon = 0, 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                anon += _rss_anon(p.pid)
            except (psutil.Error, OSError):
                pass
        return total, anon

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            total, anon = self._sample()
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rows-per-file", type=int, default=20_000)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed afterwards")
    p.add_argument("--what", default="dedup", help="comma-separated: dedup, export (hf and jsonl)")
    p.add_argument("--keep-output", action="store_true", help="reuse WORKDIR/out when it exists")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_curate-"))
    try:
        if not (args.keep_output and (work / "out").is_dir()):
            t = time.perf_counter()
            build_output(work / "out", args.rows, args.rows_per_file)
            print(f"built {args.rows:,} rows in {time.perf_counter() - t:.1f} s")
        for what in args.what.split(","):
            {"dedup": run, "export": run_export}[what](work, args.rows, args.num_cpus)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, rows: int, num_cpus: int) -> None:
    import ray

    from matrix_hpc.data.dedup import DedupConf, dedup

    print(f"loadavg before: {loadavg()}")
    with PeakRss() as peak:
        t0 = time.perf_counter()
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
        t1 = time.perf_counter()
        result = dedup(work / "out", work / "dedup", DedupConf(("result.answer",)), force=True)
        t2 = time.perf_counter()
        ray.shutdown()
    print(f"loadavg after:  {loadavg()}")
    dedup_s = t2 - t1
    print(f"rows {rows:,}: dedup {dedup_s:.1f} s (+ Ray start {t1 - t0:.1f} s), peak RSS of the process tree "
          f"{peak.peak / 2**30:.2f} GiB (anonymous {peak.peak_anon / 2**30:.2f}), {rows / dedup_s:,.0f} rows/s, "
          f"{rows / dedup_s / num_cpus:,.0f} rows/s per core ({num_cpus} cores)")
    print(f"kept {result.kept:,}, dropped {result.dropped_exact:,} exact + {result.dropped_near:,} near "
          f"({result.clusters:,} clusters, b={result.bands[0]} r={result.bands[1]}); stages (s): {result.stage_s}")


def run_export(work: Path, rows: int, num_cpus: int) -> None:
    from matrix_hpc.data.export import export_hf, export_jsonl

    for name, export, dest in (("hf", export_hf, work / "export_hf"), ("jsonl", export_jsonl, work / "rows.jsonl")):
        print(f"loadavg before: {loadavg()}")
        with PeakRss() as peak:
            t = time.perf_counter()
            result = export(work / "out", dest, force=True)
            elapsed = time.perf_counter() - t
        print(f"loadavg after:  {loadavg()}")
        print(f"export {name}: {result.rows:,} rows in {elapsed:.1f} s ({result.rows / elapsed:,.0f} rows/s), "
              f"peak RSS {peak.peak / 2**30:.2f} GiB (anonymous {peak.peak_anon / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
