"""Resume at scale: how long ``scan_output`` takes, and how much memory, for
an output of N committed ids (a synthetic output holding ids only).

    .venv/bin/python benchmarks/bench_resume.py --ids 1000000,10000000,100000000

Targets (issue 9, on the 2-core dev machine): 1,000,000 ids in <= 1 s;
100,000,000 in <= 60 s and <= 1.5 GB peak RSS. Each scan runs in a fresh
child process so its peak RSS is its own; the load average is printed
before and after, since the machine is shared, and CPU seconds next to wall seconds (on a loaded
machine wall time is mostly waiting for a core). A second figure times
membership lookups (half present, half absent), including the one-off load
of the exact id check on the first hit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ID_WIDTH = 12  # "t" + 11 digits


def synthetic_ids(start: int, count: int) -> pa.Array:
    """Ids ``t00000000042`` ... built from buffers (no Python string per id)."""
    n = np.arange(start, start + count, dtype=np.int64)
    chars = np.empty((count, ID_WIDTH), np.uint8)
    chars[:, 0] = ord("t")
    for k in range(ID_WIDTH - 1):
        chars[:, ID_WIDTH - 1 - k] = (n // 10**k) % 10 + ord("0")
    offsets = np.arange(0, (count + 1) * ID_WIDTH, ID_WIDTH, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())])


def build_output(out: Path, ids: int, rows_per_file: int, shards: int) -> int:
    """Write ``ids`` ids in files of ``rows_per_file`` rows, spread over shard dirs."""
    files = 0
    for start in range(0, ids, rows_per_file):
        count = min(rows_per_file, ids - start)
        d = out / f"shard={files % shards:05d}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": synthetic_ids(start, count)}),
                       d / f"part-bench-{files % 1000:03d}-0000beef-p{files:06d}.parquet", compression="zstd")
        files += 1
    return files


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from matrix_hpc.store.resume import scan_output
out, ids, lookups = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0, c0 = time.perf_counter(), cpu_s()
scan = scan_output(out)
scan_s, scan_cpu_s = time.perf_counter() - t0, cpu_s() - c0
scan_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(scan.done) == ids, (len(scan.done), ids)
t0, c0 = time.perf_counter(), cpu_s()
step = max(1, ids // max(1, lookups // 2))
hits = sum(f"t{i:011d}" in scan.done for i in range(0, ids, step))
misses = sum(f"u{i:011d}" in scan.done for i in range(0, ids, step))
lookup_s, lookup_cpu_s = time.perf_counter() - t0, cpu_s() - c0
assert misses == 0 and hits == len(range(0, ids, step))
print(json.dumps({"scan_s": scan_s, "scan_cpu_s": scan_cpu_s, "lookup_cpu_s": lookup_cpu_s,
                  "scan_peak_rss_mb": scan_rss / 1024, "import_rss_mb": rss0 / 1024,
                  "lookups": 2 * hits, "lookup_s": lookup_s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(out: Path, ids: int, lookups: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), str(ids), str(lookups)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"scan of {out} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", default="1000000,10000000", help="comma-separated output sizes")
    parser.add_argument("--rows-per-file", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--lookups", type=int, default=200_000, help="membership tests after the scan")
    parser.add_argument("--tmp", default=None, help="where the synthetic outputs go (default: system temp)")
    args = parser.parse_args(argv)
    for ids in (int(x) for x in args.ids.split(",")):
        out = Path(tempfile.mkdtemp(prefix=f"bench-resume-{ids}-", dir=args.tmp))
        try:
            t0 = time.perf_counter()
            files = build_output(out, ids, args.rows_per_file, args.shards)
            build_s = time.perf_counter() - t0
            load_before = os.getloadavg()
            r = measure(out, ids, args.lookups)
            load_after = os.getloadavg()
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"{ids:>12,} ids in {files} files (built in {build_s:.0f} s): scan {r['scan_s']:.2f} s "
              f"(CPU {r['scan_cpu_s']:.2f} s), peak RSS {r['scan_peak_rss_mb']:.0f} MB (imports "
              f"{r['import_rss_mb']:.0f} MB); {r['lookups']:,} lookups {r['lookup_s']:.2f} s (CPU "
              f"{r['lookup_cpu_s']:.2f} s, incl. loading the exact check), peak RSS after lookups "
              f"{r['peak_rss_mb']:.0f} MB; "
              f"load avg before {load_before[0]:.2f} after {load_after[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
