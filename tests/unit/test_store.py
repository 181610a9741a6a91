"""The store's commit and resume logic, without Ray."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from matrix_hpc.runtime.message import FAILED, OK, TaskState
from matrix_hpc.store.input import DatasetConf, iter_input, stable_row_hash
from matrix_hpc.store.layout import TMP_PREFIX, data_files, shard_dir, shard_of
from matrix_hpc.store.resume import ResumeRefused, check_and_record_config, scan_output
from matrix_hpc.store.rows import output_schema
from matrix_hpc.store.sink import DUPLICATE, ShardSink, SinkSettings


def _task(i: int, status: str = OK) -> TaskState:
    t = TaskState(f"t{i}", {"x": i}, "a")
    t.add_message("a", f"hello {i}", prompt_tokens=3, completion_tokens=5)
    t.finish(status, error_type="E" if status == FAILED else None, error="boom" if status == FAILED else None)
    return t


def completed_ids(out: Path) -> set[str]:
    return {i for f in data_files(out) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}


def _sink(tmp_path: Path, keep: str = "all", max_rows: int = 10_000) -> ShardSink:
    settings = SinkSettings(str(tmp_path), num_shards=4, run_id="r1", flush_interval_s=3600,
                            max_buffered_rows=max_rows, compression="zstd", keep=keep)
    return ShardSink(settings, output_schema(), 0)


def test_sink_commits_rows_into_their_shards_and_acks_each(tmp_path: Path) -> None:
    async def go() -> list:
        sink = _sink(tmp_path)
        await sink.write([_task(i) for i in range(50)])
        assert data_files(tmp_path) == []  # nothing visible before the commit
        await sink.flush()
        return await sink.wait_commits(0.1)

    acks = asyncio.run(go())
    assert sorted(a[0] for a in acks) == sorted(f"t{i}" for i in range(50))
    assert all(a[1] == OK and a[4] == 8 for a in acks)
    for f in data_files(tmp_path):
        shard = int(f.parent.name.split("=")[1])
        ids = pq.read_table(f).column("id").to_pylist()
        assert all(shard_of(i, 4) == shard for i in ids)
    assert completed_ids(tmp_path) == {f"t{i}" for i in range(50)}


def test_sink_writes_a_task_once_and_acks_the_repeat_as_duplicate(tmp_path: Path) -> None:
    async def go() -> list:
        sink = _sink(tmp_path)
        await sink.write([_task(1), _task(2)])
        await sink.flush()
        await sink.write([_task(1)])
        await sink.flush()
        return await sink.wait_commits(0.1)

    acks = asyncio.run(go())
    assert [a[1] for a in acks].count(DUPLICATE) == 1
    rows = [r for f in data_files(tmp_path) for r in pq.read_table(f).column("id").to_pylist()]
    assert sorted(rows) == ["t1", "t2"]


def test_keep_ok_moves_other_rows_aside_but_resume_still_sees_them(tmp_path: Path) -> None:
    async def go() -> None:
        sink = _sink(tmp_path, keep="ok")
        await sink.write([_task(1), _task(2, FAILED)])
        await sink.flush()

    asyncio.run(go())
    main = [f for f in data_files(tmp_path, include_rejected=False)]
    assert [pq.read_table(f).column("id").to_pylist() for f in main] == [["t1"]]
    assert completed_ids(tmp_path) == {"t1", "t2"}


def test_row_carries_status_error_history_and_tokens(tmp_path: Path) -> None:
    async def go() -> None:
        sink = _sink(tmp_path)
        await sink.write([_task(7, FAILED)])
        await sink.flush()

    asyncio.run(go())
    row = pq.read_table(data_files(tmp_path)[0]).to_pylist()[0]
    assert row["id"] == "t7" and row["status"] == FAILED
    assert row["error_type"] == "E" and row["error"] == "boom"
    assert json.loads(row["input"]) == {"x": 7}
    assert row["messages"][0]["content"] == "hello 7" and row["messages"][0]["completion_tokens"] == 5
    assert row["prompt_tokens"] == 3 and row["attempts"] == 1


def test_scan_output_ignores_and_removes_temp_files(tmp_path: Path) -> None:
    d = shard_dir(tmp_path, 0)
    d.mkdir(parents=True)
    (d / f"{TMP_PREFIX}part-x.parquet").write_bytes(b"half a file")
    assert len(scan_output(tmp_path).done) == 0
    assert list(d.iterdir()) == []


def test_resume_with_a_different_workflow_config_is_refused_unless_forced(tmp_path: Path) -> None:
    def ident(x: int) -> dict:
        return {"workflow": {"name": "a", "x": x}, "dataset": {"path": "in.jsonl", "id_column": "id"}}

    defaults = {"workflow": {"x": 0}, "dataset": {"id_column": "id"}}
    assert check_and_record_config(tmp_path, ident(1), defaults, "full", force=False) is False
    assert check_and_record_config(tmp_path, ident(1), defaults, "full", force=False) is True
    with pytest.raises(ResumeRefused, match=r"run.resume=force") as e:
        check_and_record_config(tmp_path, ident(2), defaults, "full", force=False)
    assert "workflow.x: recorded 1 -> now 2" in str(e.value)
    assert check_and_record_config(tmp_path, ident(2), defaults, "full", force=True) is True


def test_input_bad_lines_become_errors_naming_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": "a", "q": 1}\n{not json\n\n[1, 2]\n{"q": 3}\n{"id": "b", "q": 4}\n')
    items = list(iter_input(DatasetConf(path=str(f), required_columns=["q"])))
    assert [i.id for i in items if i.error is None] == ["a", "b"]
    errors = [i.error for i in items if i.error]
    assert f"{f}:2: not valid JSON" in errors[0]
    assert f"{f}:4: expected a JSON object" in errors[1]
    assert f"{f}:5: missing required column(s) ['id']" in errors[2]
    assert len({i.id for i in items}) == len(items)  # failed rows still get distinct stable ids


def test_input_without_id_column_uses_a_stable_row_hash(tmp_path: Path) -> None:
    import pyarrow as pa

    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"q": [1, 2, 2]}), f)
    items = list(iter_input(DatasetConf(path=str(tmp_path / "*.parquet"), id_column=None)))
    assert [i.id for i in items] == [stable_row_hash({"q": 1}), stable_row_hash({"q": 2}), stable_row_hash({"q": 2})]


def test_input_glob_matching_nothing_is_a_clear_error(tmp_path: Path) -> None:
    from matrix_hpc.store.input import InputError

    with pytest.raises(InputError, match="matches no file"):
        list(iter_input(DatasetConf(path=str(tmp_path / "*.jsonl"))))


def test_many_small_commits_are_compacted_without_losing_or_doubling_rows(tmp_path: Path) -> None:
    async def go() -> ShardSink:
        settings = SinkSettings(str(tmp_path), num_shards=1, run_id="r1", flush_interval_s=3600,
                                max_buffered_rows=10_000, compression="zstd", compact_min_files=4)
        sink = ShardSink(settings, output_schema(), 0)
        for i in range(10):
            await sink.write([_task(i)])
            await sink.flush()
        await sink.close()
        return sink

    sink = asyncio.run(go())
    files = data_files(tmp_path)
    assert len(files) <= 2 and sink.files_compacted >= 8
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert sorted(ids) == sorted(f"t{i}" for i in range(10))


def test_a_crash_between_compaction_rename_and_delete_is_repaired(tmp_path: Path) -> None:
    import shutil

    from matrix_hpc.store.layout import compact_files, write_table_atomic
    from matrix_hpc.store.rows import tasks_to_table

    d = shard_dir(tmp_path, 0)
    sources = []
    for i in range(3):
        p = d / f"part-r1-000-{i:06d}.parquet"
        write_table_atomic(tasks_to_table([_task(i)], "r1", output_schema()), p)
        sources.append(p)
    backup = tmp_path / "backup"
    backup.mkdir()
    for p in sources:
        shutil.copy(p, backup / p.name)
    compact_files(sources, d / "part-r1-000-c000009.parquet", "zstd")
    for p in sources[:2]:  # as if the process died before deleting these two
        shutil.copy(backup / p.name, p)
    scan = scan_output(tmp_path)
    assert len(scan.done) == 3 and all(f"t{i}" in scan.done for i in range(3)) and scan.duplicates == 0
    ids = [i for f in data_files(tmp_path) for i in pq.read_table(f).column("id").to_pylist()]
    assert sorted(ids) == ["t0", "t1", "t2"]


def test_output_reads_as_one_dataset_with_pyarrow_and_duckdb(tmp_path: Path) -> None:
    import duckdb
    import pyarrow.dataset as ds

    async def go() -> None:
        sink = _sink(tmp_path)
        await sink.write([_task(i) for i in range(20)])
        await sink.flush()

    asyncio.run(go())
    (tmp_path / "_matrix").mkdir()
    (tmp_path / "_matrix" / "config.yaml").write_text("not parquet")
    table = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(f"t{i}" for i in range(20))
    n = duckdb.sql(f"select count(distinct id) from read_parquet('{tmp_path}/shard=*/*.parquet')").fetchall()
    assert n == [(20,)]


def test_the_number_of_sinks_is_one_on_a_small_machine_two_elsewhere_unless_set() -> None:
    from matrix_hpc.store.conf import OutputConf, resolved_num_sinks

    assert OutputConf(dir="x").num_sinks is None  # chosen by the run
    assert [resolved_num_sinks(OutputConf(dir="x"), cpus) for cpus in (1, 2, 4, 5, 64)] == [1, 1, 1, 2, 2]
    assert resolved_num_sinks(OutputConf(dir="x", num_shards=1), 64) == 1  # a sink owns whole shards
    assert resolved_num_sinks(OutputConf(dir="x", num_sinks=3), 2) == 3  # set: taken as it is
    with pytest.raises(ValueError, match=r"output.num_sinks=0: must be >= 1"):
        OutputConf(dir="x", num_sinks=0)
    with pytest.raises(ValueError, match=r"output.num_sinks=5 > output.num_shards=4"):
        OutputConf(dir="x", num_sinks=5)


def test_the_sink_runs_inside_the_worker_on_a_small_machine_with_one_worker_unless_set() -> None:
    from matrix_hpc.store.conf import OutputConf, sinks_in_workers

    auto = OutputConf(dir="x")
    assert auto.sink_host == "auto"
    # (cluster CPUs, sinks, worker processes): only the small machine's one worker and one sink share a process
    cases = [(2, 1, 1), (4, 1, 1), (5, 1, 1), (2, 1, 2), (2, 2, 2), (64, 2, 8)]
    assert [sinks_in_workers(auto, *c) for c in cases] == [True, True, False, False, False, False]
    assert not sinks_in_workers(OutputConf(dir="x", sink_host="actors"), 2, 1, 1)
    assert sinks_in_workers(OutputConf(dir="x", sink_host="workers"), 64, 2, 8)
    with pytest.raises(ValueError, match=r"sink_host=workers needs a worker process per sink: 3 sinks, 2 worker"):
        sinks_in_workers(OutputConf(dir="x", sink_host="workers"), 64, 3, 2)
    with pytest.raises(ValueError, match=r"output.sink_host='worker'; valid choices: auto, actors, workers"):
        OutputConf(dir="x", sink_host="worker")
