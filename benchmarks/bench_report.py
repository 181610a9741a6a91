"""``matrix-hpc report`` (and ``inspect``, for scale) on a synthetic output of
N rows: wall time, CPU time and peak RSS of each command.

    .venv/bin/python benchmarks/bench_report.py --rows 1000000

The output is Coral-shaped (6 messages of ~300 bytes a row, input and
result JSON, Coral's result columns, 94% ok / 3% filtered / 3% failed),
written with the store's own layout and writer (``output_schema``,
``shard_dir``, ``part_file_name``, ``write_table_atomic``) and built from
Arrow buffers, not Python rows. Each command runs in a fresh child process
so its peak RSS is its own; the load average is printed before and after,
since the machine is shared (on a loaded machine wall time is mostly
waiting for a core; CPU seconds are the steadier figure).
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
import pyarrow.compute as pc

from matrix_hpc.store.layout import META_DIR, part_file_name, shard_dir, write_table_atomic
from matrix_hpc.store.rows import MESSAGE_TYPE, output_schema

REPO = Path(__file__).resolve().parents[1]
CORAL = {"answer_key": pa.string(), "agreed": pa.bool_(), "agreed_answer": pa.string(), "correct": pa.bool_(),
         "turns": pa.int32(), "stop_reason": pa.string()}
MESSAGES_PER_ROW = 6
AGENTS = ["student", "teacher", "extractor", "student", "extractor", "teacher"]
RUN_S = 3600.0  # the synthetic run's length


def _pool(rng: np.random.Generator, n: int, size: int) -> pa.Array:
    words = np.array("the answer is because energy which therefore option we consider force mass".split())
    return pa.array([" ".join(rng.choice(words, size // 6)) for _ in range(n)])


def _ids(start: int, count: int) -> pa.Array:
    return pc.binary_join_element_wise("t", pc.utf8_lpad(pc.cast(pa.array(np.arange(start, start + count)),
                                                                 pa.string()), 11, "0"), "")


def synthetic_table(start: int, n: int, rng: np.random.Generator, text: pa.Array) -> pa.Table:
    """``n`` Coral-shaped rows from Arrow buffers (ids ``t00000000042`` ...)."""
    u = rng.random(n)
    status = np.where(u < 0.94, "ok", np.where(u < 0.97, "filtered", "failed"))
    failed, filtered = status == "failed", status == "filtered"
    admitted = rng.uniform(0, RUN_S, n) + 1.8e9
    duration = rng.lognormal(1.5, 0.6, n)
    m = n * MESSAGES_PER_ROW
    step = np.repeat(duration / MESSAGES_PER_ROW, MESSAGES_PER_ROW) * rng.uniform(0.5, 1.5, m)
    t_start = np.repeat(admitted, MESSAGES_PER_ROW) + np.tile(np.arange(MESSAGES_PER_ROW), n) * np.repeat(
        duration / MESSAGES_PER_ROW, MESSAGES_PER_ROW)
    prompt_m, completion_m = rng.integers(100, 600, m), rng.integers(1, 80, m)
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(0, m + 1, MESSAGES_PER_ROW, dtype=np.int32)),
        pa.StructArray.from_arrays(
            [pa.array(np.tile(AGENTS, n)), pa.array(np.full(m, "assistant")),
             text.take(pa.array(rng.integers(0, len(text), m))), pa.array(t_start), pa.array(t_start + step),
             pa.array(prompt_m), pa.array(completion_m)], fields=list(MESSAGE_TYPE)))
    agreed = rng.random(n) < 0.8
    columns = {
        "id": _ids(start, n), "status": pa.array(status),
        "error_type": pa.array(np.where(failed, np.where(rng.random(n) < 0.5, "LLMRejected", "TimeoutError"), None)),
        "error": pa.array(np.where(failed, "400: maximum context length is 4096 tokens", None)),
        "reason": pa.array(np.where(filtered, "question has no options", None)),
        "input": text.take(pa.array(rng.integers(0, len(text), n))),
        "messages": messages,
        "result": pa.array(np.full(n, json.dumps({"agreed": True, "turns": 3, "stop_reason": "agreed"}))),
        "attempts": pa.array(np.where(rng.random(n) < 0.02, 2, 1).astype(np.int32)),
        "prompt_tokens": pa.array(prompt_m.reshape(n, -1).sum(1)),
        "completion_tokens": pa.array(completion_m.reshape(n, -1).sum(1)),
        "t_admitted": pa.array(admitted), "t_finished": pa.array(admitted + duration),
        "duration_s": pa.array(duration), "run_id": pa.array(np.full(n, "bench")),
        "answer_key": pa.array(rng.choice(list("ABCD"), n)), "agreed": pa.array(agreed),
        "agreed_answer": pa.array(np.where(agreed, "B", None)), "correct": pa.array(agreed & (rng.random(n) < 0.6)),
        "turns": pa.array(rng.integers(1, 21, n).astype(np.int32)),
        "stop_reason": pa.array(np.where(agreed, "agreed", "max_turns")),
    }
    schema = output_schema(CORAL)
    return pa.Table.from_arrays([pc.cast(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
                                 for f in schema], schema=schema)


def build_output(out: Path, rows: int, rows_per_file: int, shards: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    text = _pool(rng, 2000, 300)
    files = 0
    for start in range(0, rows, rows_per_file):
        table = synthetic_table(start, min(rows_per_file, rows - start), rng, text)
        path = shard_dir(out, files % shards) / part_file_name("bench", files % shards, "0000beef", files)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table_atomic(table, path)
        files += 1
    (out / META_DIR).mkdir(exist_ok=True)
    (out / META_DIR / "workflow.yaml").write_text("name: coral\nmax_turns: 20\n")
    return files


def timed(args: list[str]) -> dict[str, float]:
    """Wall and CPU seconds and peak RSS (MB) of ``matrix-hpc ARGS`` in a fresh process (wait4: its own)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli.main", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"matrix-hpc {' '.join(args)} failed:\n{err.decode()[-2000:]}")
    return {"wall_s": wall_s, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rows-per-file", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--keep", type=Path, help="write the output here and keep it (default: a temp dir)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-report-")) if args.keep is None else args.keep
    out = root / "out"
    try:
        t0 = time.perf_counter()
        files = build_output(out, args.rows, args.rows_per_file, args.shards)
        size_mb = sum(f.stat().st_size for f in out.rglob("*.parquet")) / 1e6
        print(f"synthetic output: {args.rows:,} rows in {files} files, {size_mb:,.0f} MB "
              f"(written in {time.perf_counter() - t0:.1f} s)")
        print(f"loadavg before: {loadavg()}")
        report = timed(["report", str(out), "--out", str(root / "report.html")])
        inspect = timed(["inspect", str(out)])
        print(f"loadavg after:  {loadavg()}")
        html_mb = (root / "report.html").stat().st_size / 1e6
        for name, r in (("report", report), ("inspect", inspect)):
            print(f"{name:8s} {args.rows:,} rows: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MB" + (f", {html_mb:.2f} MB of HTML" if name == "report" else ""))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
