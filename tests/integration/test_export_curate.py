"""Export and curation against real libraries: datasets, DuckDB, Ray Data (one local Ray for the module).

The output directories are written with the store's own commit functions
(tests/data_out_support.py); every check reads the results back from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from matrix_hpc.cli.main import main
from matrix_hpc.store.layout import data_files
from tests.data_out_support import output_row, random_text, write_output

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray")]
REPO = Path(__file__).resolve().parents[2]


def tree_digest(root: Path) -> str:
    """Every file's path, size, mtime and content under ``root``: any change to the output shows."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def output_table(out: Path, status: str | None = "ok") -> pa.Table:
    t = pa.concat_tables(pq.read_table(f) for f in data_files(out))
    return t if status is None else t.filter(pc.equal(t["status"], status))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    if started:
        ray.shutdown()


# -- export ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(1)
    statuses = ["ok"] * 7 + ["failed", "filtered", "ok"]
    rows = [output_row(f"t{i:04d}", random_text(rng, 30), statuses[i % 10], tokens=i % 13) for i in range(500)]
    out = tmp_path_factory.mktemp("mixed") / "out"
    write_output(out, rows, rejected=True)  # failed/filtered rows under _rejected/, as output.keep=ok writes them
    return out


def test_export_hf_reads_back_with_datasets(mixed_output: Path, tmp_path: Path) -> None:
    import datasets

    before = tree_digest(mixed_output)
    assert main(["export", "hf", str(mixed_output), str(tmp_path / "hf")]) == 0
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    ok = output_table(mixed_output).sort_by("id")
    got = ds.with_format("arrow")[:].sort_by("id")
    assert got.num_rows == ok.num_rows > 0
    for column in ("id", "result", "prompt_tokens", "completion_tokens", "messages"):
        assert got[column].to_pylist() == ok[column].to_pylist(), column
    card = (tmp_path / "hf" / "README.md").read_text()
    tokens = pc.sum(ok["prompt_tokens"]).as_py() + pc.sum(ok["completion_tokens"]).as_py()
    counts = dict(zip(*[output_table(mixed_output, None)["status"].value_counts().field(k).to_pylist()
                        for k in ("values", "counts")], strict=True))
    assert f"{ok.num_rows:,} rows (ok)" in card and f"total {tokens:,}" in card
    assert all(f"| {s} | {n:,} |" in card for s, n in counts.items())
    assert '"api_key": "***"' in card and '"name": "coral"' in card  # the recorded identity, secrets masked
    assert tree_digest(mixed_output) == before


def test_export_jsonl_matches_the_output_in_duckdb(mixed_output: Path, tmp_path: Path) -> None:
    import duckdb

    before = tree_digest(mixed_output)
    dest = tmp_path / "rows.jsonl"
    assert main(["export", "jsonl", str(mixed_output), str(dest), "--status", "ok,failed"]) == 0
    parts = [str(f) for f in data_files(mixed_output)]
    con = duckdb.connect()
    truth = con.execute("SELECT id, result, prompt_tokens FROM read_parquet(?) WHERE status IN ('ok', 'failed')",
                        [parts]).fetchall()
    got = con.execute(f"SELECT id, result, prompt_tokens FROM read_json_auto('{dest}')").fetchall()
    assert sorted(got) == sorted(truth) and len(truth) > 0
    assert {r[0] for r in con.execute(f"SELECT DISTINCT status FROM read_json_auto('{dest}')").fetchall()} == \
        {"ok", "failed"}
    assert tree_digest(mixed_output) == before


def test_export_refuses_the_output_dir_and_existing_dest(mixed_output: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "jsonl", str(mixed_output), str(mixed_output / "x.jsonl")]) == 2
    assert "overlaps the output directory" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text("old\n")
    assert main(["export", "jsonl", str(mixed_output), str(tmp_path / "x.jsonl")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", "jsonl", str(mixed_output), str(tmp_path / "x.jsonl"), "--all", "--force"]) == 0
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == output_table(mixed_output, None).num_rows
    assert main(["export", "jsonl", str(mixed_output), str(tmp_path / "y.jsonl"), "--status", "done"]) == 2
    assert "unknown status" in capsys.readouterr().err


def test_export_of_an_output_with_a_live_run_says_so(mixed_output: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from matrix_hpc.store.lock import OutputLock\n"
        f"lock = OutputLock(Path({str(mixed_output)!r}), 'live-run'); lock.acquire(); print('held', flush=True)\n"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["export", "jsonl", str(mixed_output), str(tmp_path / "live.jsonl")]) == 0
        assert "being written by run live-run" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert main(["export", "jsonl", str(mixed_output), str(tmp_path / "after.jsonl")]) == 0
    assert "being written" not in capsys.readouterr().out  # a dead holder's lock is gone with it


# -- dedup ----------------------------------------------------------------------------
N_ROWS, N_EXACT, N_NEAR, N_FAR = 600, 30, 40, 20


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, str], set[str]]:
    """Unique rows plus planted copies: exact (case, punctuation, spacing changed), near (one word changed:
    Jaccard of 5-word shingles ~0.88 > 0.8) and far (8 words changed: ~0.4, must stay). Copies get higher ids
    than their sources, so the kept row is the source."""
    rng = random.Random(7)
    texts = [random_text(rng, 80) for _ in range(N_ROWS)]
    exact, near, far = {}, {}, set()
    sources = rng.sample(range(N_ROWS), N_EXACT + N_NEAR + N_FAR)
    extra = []
    for k, src in enumerate(sources):
        words = texts[src].split()
        if k < N_EXACT:
            copy, kind = "  " + texts[src].upper().replace(" ", ",  ") + "!", exact
        elif k < N_EXACT + N_NEAR:
            words[rng.randrange(len(words))] = "changed"
            copy, kind = " ".join(words), near
        else:
            for j in rng.sample(range(len(words)), 8):
                words[j] = f"other{j}"
            copy, kind = " ".join(words), None
        copy_id = f"t{N_ROWS + k:04d}"
        extra.append(copy)
        if kind is None:
            far.add(copy_id)
        else:
            kind[copy_id] = f"t{src:04d}"
    rows = [output_row(f"t{i:04d}", t) for i, t in enumerate(texts + extra)]
    rng.shuffle(rows)  # file order is not id order: the keep rule must not depend on it
    out = tmp_path_factory.mktemp("planted") / "out"
    write_output(out, rows, num_shards=4, files_per_shard=3)
    return out, exact, near, far


def dropped_rows(dest: Path) -> dict[str, tuple[str, str]]:
    report = pq.read_table(dest / "report" / "dropped.parquet").to_pylist()
    return {r["id"]: (r["reason"], r["kept_id"]) for r in report}


DEDUP_ARGS = ["--column", "result.answer"]


@pytest.fixture(scope="module")
def deduped(local_ray: None, planted: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One dedup of the planted output (the reference of the resume test too), and the output's digest before."""
    out = planted[0]
    before = tree_digest(out)
    dest = tmp_path_factory.mktemp("dedup") / "dest"
    assert main(["curate", "dedup", str(out), *DEDUP_ARGS, "--dest", str(dest)]) == 0
    return dest, before


def test_dedup_finds_planted_duplicates(planted: tuple, deduped: tuple[Path, str]) -> None:
    out, exact, near, far = planted
    dest, before = deduped
    dropped = dropped_rows(dest)
    # exact duplicates are found by their normalised hash: all of them, keeping the source (smaller id)
    assert {i: dropped.get(i) for i in exact} == {i: ("exact", src) for i, src in exact.items()}
    # near: LSH with b=9, r=13 finds a pair of Jaccard 0.88 with probability ~0.85; we require >= 75% recall
    found_near = {i for i in near if dropped.get(i) == ("near", near[i])}
    assert len(found_near) >= 0.75 * N_NEAR, f"near-duplicate recall {len(found_near)}/{N_NEAR}"
    # precision: nothing else is dropped (candidates are verified against the threshold)
    assert set(dropped) <= set(exact) | set(near) and not far & set(dropped)
    kept = pq.read_table(dest / "data").column("id").to_pylist()
    assert sorted(kept) == sorted(set(output_table(out)["id"].to_pylist()) - set(dropped))
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["dropped_exact"] == N_EXACT and summary["kept"] == len(kept)
    assert tree_digest(out) == before


def test_dedup_resumes_after_kill_9_with_the_same_result(planted: tuple, deduped: tuple[Path, str],
                                                         tmp_path: Path) -> None:
    import ray

    out, (reference, before) = planted[0], deduped
    dest = tmp_path / "resumed"
    args = ["curate", "dedup", str(out), *DEDUP_ARGS, "--dest", str(dest)]
    env = dict(os.environ, MATRIX_RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli.main", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((dest / "_work" / "sign").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # mid-way through the sign stage
    child.wait()
    assert not (dest / "summary.json").exists(), "the kill came too late to test a resume"
    assert main(args) == 0
    assert dropped_rows(dest) == dropped_rows(reference)
    assert pq.read_table(dest / "data").sort_by("id").equals(pq.read_table(reference / "data").sort_by("id"))
    assert main(args) == 0  # a finished curation: nothing to do, same summary
    assert main([*args, "--threshold", "0.9"]) == 2  # other settings into the same dest: refused
    assert tree_digest(out) == before


# -- decontamination ---------------------------------------------------------------------
def test_decontaminate_drops_planted_overlaps(local_ray: None, tmp_path: Path) -> None:
    rng = random.Random(3)
    bench = [{"question": random_text(rng, 40), "answer": "A"} for _ in range(30)]
    bench_file = tmp_path / "bench.jsonl"
    bench_file.write_text("".join(json.dumps(b) + "\n" for b in bench))
    texts = [random_text(rng, 60) for _ in range(200)]
    planted, short = {}, set()
    for n, row in enumerate(rng.sample(range(200), 25)):
        words = bench[n].get("question", "").split()
        run = 13 if n < 15 else 12  # 12 words: below the 13-gram, must stay
        start = rng.randrange(len(words) - run)
        copied = " ".join(words[start:start + run]).title()  # case differs: normalised away
        texts[row] = f"{random_text(rng, 10)} {copied}, {random_text(rng, 10)}"
        if run == 13:
            planted[f"t{row:04d}"] = n
        else:
            short.add(f"t{row:04d}")
    out = tmp_path / "out"
    write_output(out, [output_row(f"t{i:04d}", t) for i, t in enumerate(texts)])
    before = tree_digest(out)
    dest = tmp_path / "clean"
    assert main(["curate", "decontaminate", str(out), "--column", "result.answer", "--against", str(bench_file),
                 "--dest", str(dest)]) == 0
    report = {r["id"]: r for r in pq.read_table(dest / "report" / "contaminated.parquet").to_pylist()}
    assert {i: r["benchmark_row"] for i, r in report.items()} == planted
    assert all(r["benchmark_file"] == str(bench_file) for r in report.values())
    assert all(r["ngram"] in bench[r["benchmark_row"]]["question"].lower() for r in report.values())
    kept = set(pq.read_table(dest / "data").column("id").to_pylist())
    assert kept == {f"t{i:04d}" for i in range(200)} - set(planted) and short <= kept
    # an interruption after half the units: their markers stay, the rest (and the summary) are missing
    markers = sorted((dest / "_work" / "scan").glob("*.parquet"))
    kept_before = {m.name: m.stat().st_mtime_ns for m in markers[::2]}
    for m in markers[1::2]:
        m.unlink()
    (dest / "summary.json").unlink()
    assert main(["curate", "decontaminate", str(out), "--column", "result.answer", "--against", str(bench_file),
                 "--dest", str(dest)]) == 0
    assert {m.name: m.stat().st_mtime_ns for m in markers[::2]} == kept_before  # finished units not redone
    assert {r["id"]: r for r in pq.read_table(dest / "report" / "contaminated.parquet").to_pylist()} == report
    assert set(pq.read_table(dest / "data").column("id").to_pylist()) == kept
    assert tree_digest(out) == before
