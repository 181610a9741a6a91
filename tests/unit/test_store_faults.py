"""The store under single faults: restarted sinks, failed commits, bad values,
damaged output, concurrent runs, retries of failed rows. No Ray."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matrix_hpc.runtime.message import FAILED, OK, TaskState
from matrix_hpc.store.layout import (
    COMPACTED_FROM,
    META_DIR,
    QUARANTINE_DIR,
    TMP_PREFIX,
    data_files,
    parse_part_name,
    repair_compactions,
    shard_dir,
    write_table_atomic,
)
from matrix_hpc.store.resume import scan_output
from matrix_hpc.store.rows import ENCODING_ERROR, output_schema, tasks_to_table
from matrix_hpc.store.sink import DUPLICATE, FAULT_COMMIT_FAIL_ENV, ShardSink, SinkSettings


def _task(i: int, status: str = OK, **result: object) -> TaskState:
    t = TaskState(f"t{i}", {"x": i}, "a")
    t.add_message("a", f"hello {i}", prompt_tokens=3, completion_tokens=5)
    t.result = dict(result)
    t.finish(status, error_type="E" if status == FAILED else None, error="boom" if status == FAILED else None)
    return t


def _settings(out: Path, **kw: object) -> SinkSettings:
    base: dict = dict(num_shards=2, run_id="r1", flush_interval_s=3600, max_buffered_rows=10_000,
                      compression="zstd")
    base.update(kw)
    return SinkSettings(str(out), **base)


def _ids_on_disk(out: Path) -> list[str]:
    return sorted(i for f in data_files(out) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


async def _write_and_flush(sink: ShardSink, tasks: list[TaskState]) -> list:
    await sink.write(tasks)
    await sink.flush()
    return await sink.wait_commits(0.05)


# -- the commit protocol ---------------------------------------------------------
def test_a_restarted_sink_neither_overwrites_nor_forgets_what_its_run_committed(tmp_path: Path) -> None:
    first = ShardSink(_settings(tmp_path), output_schema(), 0)
    asyncio.run(_write_and_flush(first, [_task(i) for i in range(20)]))
    files_before = {f: f.read_bytes() for f in data_files(tmp_path)}

    restarted = ShardSink(_settings(tmp_path), output_schema(), 0)  # same run, same index: Ray restarted it
    assert asyncio.run(restarted.incarnation()) != asyncio.run(first.incarnation())
    acks = asyncio.run(_write_and_flush(restarted, [_task(i) for i in range(15, 30)]))

    assert {f: f.read_bytes() for f in files_before} == files_before  # nothing replaced
    assert _ids_on_disk(tmp_path) == sorted(f"t{i}" for i in range(30))  # each once
    assert sorted(a[0] for a in acks if a[1] == DUPLICATE) == sorted(f"t{i}" for i in range(15, 20))


def test_publication_refuses_to_replace_a_committed_file(tmp_path: Path) -> None:
    path = shard_dir(tmp_path, 0) / "part-r1-000-0000abcd-p000000.parquet"
    write_table_atomic(tasks_to_table([_task(1)], "r1", output_schema()), path)
    with pytest.raises(FileExistsError):
        write_table_atomic(tasks_to_table([_task(2)], "r1", output_schema()), path)
    assert pq.read_table(path).column("id").to_pylist() == ["t1"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left behind


def test_a_failed_commit_keeps_its_rows_logs_and_succeeds_on_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(FAULT_COMMIT_FAIL_ENV, "2")

    async def go() -> tuple[list, dict, dict, list]:
        sink = ShardSink(_settings(tmp_path, num_shards=1), output_schema(), 0)
        await sink.write([_task(i) for i in range(10)])
        await sink.flush()
        await sink.flush()
        failing = await sink.health()
        none_yet = await sink.wait_commits(0.05)
        await sink.flush()
        return none_yet, failing, await sink.health(), await sink.wait_commits(0.05)

    with caplog.at_level(logging.ERROR):
        none_yet, failing, healthy, acks = asyncio.run(go())
    assert none_yet == []  # no ack before the rows are on disk
    assert failing["commit_failures"] == 2 and failing["rows_buffered"] == 10
    assert "No space left" in failing["last_error"] and FAULT_COMMIT_FAIL_ENV in failing["last_error"]
    assert any("commit failed" in r.message and "shard 0" in r.message for r in caplog.records)
    assert healthy["commit_failures"] == 0 and healthy["rows_buffered"] == 0
    assert sorted(a[0] for a in acks) == sorted(f"t{i}" for i in range(10))
    assert _ids_on_disk(tmp_path) == sorted(f"t{i}" for i in range(10))


def test_a_wrong_typed_value_becomes_a_failed_row_naming_the_column(tmp_path: Path) -> None:
    schema = output_schema({"answer": pa.string()})
    sink = ShardSink(_settings(tmp_path, num_shards=1), schema, 0)
    tasks = [_task(1, answer="B"), _task(2, answer=7), _task(3, answer="C")]
    acks = asyncio.run(_write_and_flush(sink, tasks))

    rows = {r["id"]: r for f in data_files(tmp_path) for r in pq.read_table(f).to_pylist()}
    assert sorted(rows) == ["t1", "t2", "t3"]
    assert rows["t1"]["status"] == OK and rows["t3"]["answer"] == "C"
    bad = rows["t2"]
    assert bad["status"] == FAILED and bad["error_type"] == ENCODING_ERROR
    assert "'answer'" in bad["error"] and "int" in bad["error"] and "string" in bad["error"]
    assert {a[0]: a[1] for a in acks}["t2"] == FAILED


def test_the_periodic_flusher_survives_a_crash_and_is_logged(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    sink = ShardSink(_settings(tmp_path, flush_interval_s=0.02), output_schema(), 0)
    real_flush = sink.flush
    calls = {"n": 0}

    async def flaky_flush() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("flusher bug")
        await real_flush()

    sink.flush = flaky_flush  # type: ignore[method-assign]

    async def go() -> list:
        await sink.write([_task(1)])
        for _ in range(100):
            acks = await sink.wait_commits(0.05)
            if acks:
                return acks
        return []

    with caplog.at_level(logging.ERROR):
        acks = asyncio.run(go())
    assert [a[0] for a in acks] == ["t1"]
    assert any("flusher" in r.message and "flusher bug" in r.message for r in caplog.records)


def test_a_re_admitted_copy_is_written_when_only_its_hash_collides(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from matrix_hpc.store import ids

    monkeypatch.setattr(ids, "hash_id", lambda s: 7)  # every id collides
    monkeypatch.setattr(ids, "hash_ids", lambda a: np.full(len(a), 7, np.uint64))
    sink = ShardSink(_settings(tmp_path, num_shards=1), output_schema(), 0)
    asyncio.run(_write_and_flush(sink, [_task(1)]))
    acks = asyncio.run(_write_and_flush(sink, [_task(1), _task(2)]))
    assert sorted((a[0], a[1]) for a in acks) == [("t1", DUPLICATE), ("t2", OK)]
    assert _ids_on_disk(tmp_path) == ["t1", "t2"]


def test_a_late_copy_arriving_during_the_final_compaction_is_not_written_again(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """CI, 2026-11-30: the driver closes the sinks while the workers still live, so a re-admitted
    task's second copy can reach a sink during close(). Its check against the files listed the
    small files, the final compaction merged and deleted them before they were read, the copy
    counted as new and the flusher wrote it again (an id twice). Here the compaction is made to
    run exactly between that listing and that read, if the sink lets it."""
    import threading

    from matrix_hpc.store import sink as sink_module

    reading, compacted = threading.Event(), threading.Event()
    real_read_ids, real_compact = sink_module._read_ids, sink_module.compact_files

    def read_ids(path: Path):  # the check has listed the files and reads the first one
        reading.set()
        compacted.wait(2.0)
        return real_read_ids(path)

    def compact(*args: object, **kwargs: object) -> Path:
        reading.wait(2.0)  # a sink that checks while it compacts lets the check list first
        try:
            return real_compact(*args, **kwargs)
        finally:
            compacted.set()

    sink = ShardSink(_settings(tmp_path, num_shards=1), output_schema(), 0)
    for i in range(4):
        asyncio.run(_write_and_flush(sink, [_task(i)]))  # four small files
    monkeypatch.setattr(sink_module, "_read_ids", read_ids)
    monkeypatch.setattr(sink_module, "compact_files", compact)

    async def close_while_a_copy_arrives() -> list:
        await asyncio.gather(sink.close(), sink.write([_task(1)]))
        await sink.flush()  # what the periodic flusher would do next
        return await sink.wait_commits(0.05)

    acks = asyncio.run(close_while_a_copy_arrives())
    assert compacted.is_set() and sink.files_compacted == 4
    assert _ids_on_disk(tmp_path) == ["t0", "t1", "t2", "t3"]
    assert [(a[0], a[1]) for a in acks] == [("t1", DUPLICATE)]


def test_a_sink_restarted_after_a_kill_mid_compaction_deletes_the_merged_sources(tmp_path: Path) -> None:
    """Killed between publishing a compaction and deleting its sources, a sink leaves those rows
    on disk twice; its next incarnation finishes the deletion, not just the next run."""
    import shutil

    from matrix_hpc.store.verify import summarize_output

    first = ShardSink(_settings(tmp_path, num_shards=1, compact_min_files=64), output_schema(), 0)
    for i in range(4):
        asyncio.run(_write_and_flush(first, [_task(i)]))
    small = data_files(tmp_path)
    backup = tmp_path.parent / f"{tmp_path.name}-backup"
    backup.mkdir()
    for f in small:
        shutil.copy(f, backup / f.name)
    asyncio.run(first.close())  # compacts the four
    for f in small[:3]:  # as if killed after publishing the merged file, before deleting these
        shutil.copy(backup / f.name, f)
    assert summarize_output(tmp_path).duplicate_ids == 3

    restarted = ShardSink(_settings(tmp_path, num_shards=1), output_schema(), 0)
    assert summarize_output(tmp_path).duplicate_ids == 0
    assert _ids_on_disk(tmp_path) == ["t0", "t1", "t2", "t3"]
    acks = asyncio.run(_write_and_flush(restarted, [_task(2), _task(4)]))
    assert sorted((a[0], a[1]) for a in acks) == [("t2", DUPLICATE), ("t4", OK)]


# -- names -----------------------------------------------------------------------
def test_part_names_parse_strictly_and_a_user_corrupt_file_is_not_a_compaction(tmp_path: Path) -> None:
    assert parse_part_name("part-20261129-152000-abc123-001-0a1b2c3d-c000042.parquet").compacted  # type: ignore[union-attr]
    p = parse_part_name("part-20261129-152000-abc123-001-0a1b2c3d-p000042.parquet")
    assert p is not None and (p.run_id, p.sink, p.incarnation, p.compacted, p.seq) == \
        ("20261129-152000-abc123", 1, "0a1b2c3d", False, 42)
    assert parse_part_name("part-r1-000-c000009.parquet").compacted  # type: ignore[union-attr]  # older outputs
    assert parse_part_name("data-corrupt.parquet") is None
    assert parse_part_name("part-r1-000-corrupt.parquet") is None

    d = shard_dir(tmp_path, 0)
    keep = d / "part-r1-000-000001.parquet"
    write_table_atomic(tasks_to_table([_task(1)], "r1", output_schema()), keep)
    table = tasks_to_table([_task(2)], "r1", output_schema())
    meta = {COMPACTED_FROM: json.dumps([keep.name]).encode()}
    write_table_atomic(table.replace_schema_metadata(meta), d / "part-r1-000-corrupt.parquet")
    assert repair_compactions(tmp_path) == []
    assert keep.exists()


# -- damaged output ----------------------------------------------------------------
def _committed(out: Path, ids: range, name: str = "part-r0-000-0000abcd-p{:06d}.parquet") -> list[Path]:
    paths = []
    for i in ids:
        p = shard_dir(out, 0) / name.format(i)
        write_table_atomic(tasks_to_table([_task(i)], "r0", output_schema()), p)
        paths.append(p)
    return paths


def test_scan_quarantines_corrupt_and_empty_part_files_and_their_ids_run_again(tmp_path: Path) -> None:
    good = _committed(tmp_path, range(3))
    corrupt = good[1]
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # cut short: no footer
    empty = shard_dir(tmp_path, 0) / "part-r0-000-0000abcd-p000099.parquet"
    empty.write_bytes(b"")
    also_held = _committed(tmp_path, range(2, 3), "part-r0-001-0000abcd-p{:06d}.parquet")  # t2 held twice...
    good[2].write_bytes(b"garbage")  # ...and one copy is unreadable

    scan = scan_output(tmp_path)
    assert sorted(p.name for p in scan.quarantined) == sorted([corrupt.name, empty.name, good[2].name])
    assert all(p.parent.parent.name == QUARANTINE_DIR and p.exists() for p in scan.quarantined)
    assert "t0" in scan.done and "t2" in scan.done  # t2: another readable file holds it
    assert "t1" not in scan.done  # re-run
    assert set(data_files(tmp_path)) == {good[0], also_held[0]}


def test_retry_failed_moves_failed_rows_to_history_and_readers_see_each_id_once(tmp_path: Path) -> None:
    p = shard_dir(tmp_path, 0) / "part-r0-000-0000abcd-p000000.parquet"
    write_table_atomic(tasks_to_table([_task(1), _task(2, FAILED), _task(3, FAILED)], "r0", output_schema()), p)
    only_failed = shard_dir(tmp_path, 0) / "part-r0-000-0000abcd-p000001.parquet"
    write_table_atomic(tasks_to_table([_task(4, FAILED)], "r0", output_schema()), only_failed)

    assert "t2" in scan_output(tmp_path).done  # without retry, failed rows are final
    scan = scan_output(tmp_path, retry_failed=True)
    assert scan.retried == 3
    assert "t1" in scan.done and not any(f"t{i}" in scan.done for i in (2, 3, 4))
    assert _ids_on_disk(tmp_path) == ["t1"] and not only_failed.exists()
    history = sorted((tmp_path / META_DIR / "history").rglob("*.parquet"))
    assert sorted(i for h in history for i in pq.read_table(h).column("id").to_pylist()) == ["t2", "t3", "t4"]


def test_retry_failed_interrupted_before_the_swap_leaves_the_old_state(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_hpc.store import resume

    p = shard_dir(tmp_path, 0) / "part-r0-000-0000abcd-p000000.parquet"
    write_table_atomic(tasks_to_table([_task(1), _task(2, FAILED)], "r0", output_schema()), p)
    before = p.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise KeyboardInterrupt("killed between steps")

    monkeypatch.setattr(resume.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        scan_output(tmp_path, retry_failed=True)
    assert p.read_bytes() == before  # readers still see the old file, each id once
    assert _ids_on_disk(tmp_path) == ["t1", "t2"]
    monkeypatch.undo()

    scan = scan_output(tmp_path, retry_failed=True)  # the rerun finishes the job and drops the temp file
    assert scan.retried == 1 and "t2" not in scan.done
    assert _ids_on_disk(tmp_path) == ["t1"]
    assert not list(shard_dir(tmp_path, 0).glob(f"{TMP_PREFIX}*"))


def test_scan_counts_duplicates(tmp_path: Path) -> None:
    _committed(tmp_path, range(3))
    _committed(tmp_path, range(1, 2), "part-r9-000-0000abcd-p{:06d}.parquet")
    scan = scan_output(tmp_path)
    assert scan.duplicates == 1 and len(scan.done) == 4


def test_inspect_flags_duplicates_and_repairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.cli.inspect_cmd import inspect_command

    _committed(tmp_path, range(3))
    assert inspect_command([str(tmp_path)]) == 0
    _committed(tmp_path, range(1, 3), "part-r9-000-0000abcd-p{:06d}.parquet")
    broken = shard_dir(tmp_path, 0) / "part-r9-000-0000abcd-p000077.parquet"
    broken.write_bytes(b"PAR1 not really")
    capsys.readouterr()
    assert inspect_command([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "DUPLICATE IDS: 2 id(s)" in err and "t1" in err and "t2" in err
    assert "quarantined" in out and not broken.exists()


def test_summarize_output_counts_the_disk(tmp_path: Path) -> None:
    from matrix_hpc.store.verify import summarize_output

    write_table_atomic(tasks_to_table([_task(1), _task(2, FAILED)], "r1", output_schema()),
                       shard_dir(tmp_path, 0) / "part-r1-000-0000abcd-p000000.parquet")
    write_table_atomic(tasks_to_table([_task(2)], "r2", output_schema()),
                       shard_dir(tmp_path, 1) / "part-r2-000-0000abcd-p000000.parquet")
    s = summarize_output(tmp_path, run_id="r1")
    assert s.by_status == {OK: 1, FAILED: 1} and s.tokens == 16
    assert (s.rows, s.distinct_ids, s.duplicate_ids, s.duplicate_examples) == (3, 2, 1, ["t2"])
    assert summarize_output(tmp_path).by_status == {OK: 2, FAILED: 1}


def test_early_flushes_of_a_big_batch_keep_every_row(tmp_path: Path) -> None:
    sink = ShardSink(_settings(tmp_path, max_buffered_rows=100), output_schema(), 1)
    acks = asyncio.run(_write_and_flush(sink, [_task(i) for i in range(250)]))
    assert len(acks) == 250 and _ids_on_disk(tmp_path) == sorted(f"t{i}" for i in range(250))


def test_inspect_touches_nothing_while_a_run_holds_the_output(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.cli.inspect_cmd import inspect_command
    from matrix_hpc.store.lock import OutputLock

    _committed(tmp_path, range(2))
    live_temp = shard_dir(tmp_path, 0) / f"{TMP_PREFIX}0badf00d-part-r1-000-0badf00d-p000000.parquet"
    live_temp.write_bytes(b"being written")
    with OutputLock(tmp_path, "run-live"):
        assert inspect_command([str(tmp_path)]) == 0
    assert live_temp.exists()
    assert "not repaired" in capsys.readouterr().out
    assert inspect_command([str(tmp_path)]) == 0  # once the run is gone, inspect tidies up
    assert not live_temp.exists()


def test_a_read_only_scan_touches_nothing(tmp_path: Path) -> None:
    good = _committed(tmp_path, range(2))
    good[1].write_bytes(b"broken")
    temp = shard_dir(tmp_path, 0) / f"{TMP_PREFIX}0badf00d-part-x.parquet"
    temp.write_bytes(b"a live sink's temp")
    scan = scan_output(tmp_path, repair=False)
    assert "t0" in scan.done and "t1" not in scan.done and scan.quarantined == []
    assert temp.exists() and good[1].exists()
    with pytest.raises(ValueError, match="repair=False"):
        scan_output(tmp_path, retry_failed=True, repair=False)


def test_a_commit_failing_halfway_with_keep_ok_writes_each_row_once(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_hpc.store import sink as sink_module

    real = sink_module.write_table_atomic
    calls = {"n": 0}

    def second_write_fails(*args: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the _rejected/ file, after the main one was published
            raise OSError(28, "No space left on device")
        real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sink_module, "write_table_atomic", second_write_fails)
    sink = ShardSink(_settings(tmp_path, num_shards=1, keep="ok"), output_schema(), 0)

    async def go() -> list:
        await sink.write([_task(1), _task(2, FAILED)])
        await sink.flush()  # main file published, rejected file fails
        await sink.flush()  # retry: only the failed row is left to write
        return await sink.wait_commits(0.05)

    acks = asyncio.run(go())
    assert sorted(a[0] for a in acks) == ["t1", "t2"]
    assert _ids_on_disk(tmp_path) == ["t1", "t2"]


def test_inspect_reports_counts_tokens_errors_and_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.cli.inspect_cmd import inspect_command
    from matrix_hpc.runtime.message import FILTERED

    dropped = _task(3)
    dropped.finish(FILTERED, reason="too short")
    write_table_atomic(tasks_to_table([_task(1), _task(2, FAILED), dropped], "r1", output_schema()),
                       shard_dir(tmp_path, 0) / "part-r1-000-0000abcd-p000000.parquet")
    assert inspect_command([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 rows in 1 files (3 distinct ids)" in out
    assert "ok 1 (33.3%)" in out and "failed 1 (33.3%)" in out and "filtered 1 (33.3%)" in out
    assert "tokens: prompt 9, completion 15, total 24" in out
    assert "error E x1, e.g. [t2] boom" in out and "filtered x1: too short" in out
