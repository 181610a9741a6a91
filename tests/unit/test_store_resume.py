"""Resume decisions: the compact id set, the semantic config check, input faults."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matrix_hpc.store import ids as ids_module
from matrix_hpc.store.ids import IdSet, hash_id, hash_ids
from matrix_hpc.store.input import (
    INPUT_ERROR_ID_PREFIX,
    DatasetConf,
    InputPathError,
    check_input,
    iter_input,
)
from matrix_hpc.store.resume import ResumeRefused, check_and_record_config


# -- IdSet ---------------------------------------------------------------------------
def test_vectorised_and_scalar_hashes_agree_on_every_length_and_slice() -> None:
    ids = ["", "a", "abcdefg", "abcdefgh", "abcdefghi", "é" * 9, "x" * 100, "t000001", "\u4e2d\u6587"]
    arr = pa.array(ids)
    assert [int(h) for h in hash_ids(arr)] == [hash_id(i) for i in ids]
    assert [int(h) for h in hash_ids(arr.slice(3, 4))] == [hash_id(i) for i in ids[3:7]]
    assert [int(h) for h in hash_ids(pa.chunked_array([arr[:2], arr[2:]]))] == [hash_id(i) for i in ids]
    assert len(set(hash_ids(pa.array([f"t{i}" for i in range(100_000)])).tolist())) == 100_000


def test_idset_membership() -> None:
    s = IdSet.from_arrays([pa.array(["a", "b"]), pa.array(["c"])])
    assert len(s) == 3 and "a" in s and "c" in s and "d" not in s and "" not in s and None not in s


def test_idset_has_no_false_positive_when_hashes_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids_module, "hash_id", lambda s: 42)  # a hash where every id collides
    monkeypatch.setattr(ids_module, "hash_ids", lambda a: np.full(len(a), 42, np.uint64))
    s = IdSet.from_arrays([pa.array(["apple", "pear"])])
    assert "apple" in s and "pear" in s
    assert "plum" not in s and "appl" not in s and "apple\x00" not in s


def test_idset_above_the_exact_budget_says_so(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ids_module.EXACT_BUDGET_ENV, "0")
    s = IdSet.from_arrays([pa.array(["a", "b"])])
    with caplog.at_level(logging.WARNING):
        assert "a" in s and "zz" not in s
    assert any("64-bit hash" in r.message for r in caplog.records)


# -- the config check ------------------------------------------------------------------
DEFAULTS = {"workflow": {"max_turns": 20, "temperature": 0.7, "new_knob": "auto"},
            "dataset": {"id_column": "id", "split": None}}


def _identity(**workflow: object) -> dict:
    wf = {"name": "coral", "max_turns": 20, "temperature": 0.7}
    wf.update(workflow)
    return {"workflow": wf, "dataset": {"path": "/data/q.jsonl", "id_column": "id"}}


def test_a_new_key_at_its_default_is_compatible_and_values_compare_by_value(tmp_path: Path) -> None:
    assert check_and_record_config(tmp_path, _identity(), DEFAULTS, "full: yaml", force=False) is False
    assert check_and_record_config(tmp_path, _identity(new_knob="auto"), DEFAULTS, "", force=False) is True
    assert check_and_record_config(tmp_path, _identity(max_turns=20.0), DEFAULTS, "", force=False) is True


def test_a_changed_value_or_new_key_off_default_is_refused_naming_each_key(tmp_path: Path) -> None:
    check_and_record_config(tmp_path, _identity(), DEFAULTS, "", force=False)
    with pytest.raises(ResumeRefused) as e:
        check_and_record_config(tmp_path, _identity(max_turns=5, new_knob="on"), DEFAULTS, "", force=False)
    text = str(e.value)
    assert "workflow.max_turns: recorded 20 -> now 5" in text
    assert "workflow.new_knob: recorded (absent) -> now 'on'" in text
    assert "temperature" not in text and "run.resume=force" in text


def test_a_changed_dataset_path_or_id_column_is_named_as_such(tmp_path: Path) -> None:
    check_and_record_config(tmp_path, _identity(), DEFAULTS, "", force=False)
    moved = _identity()
    moved["dataset"] = {"path": "/data/other.jsonl", "id_column": "qid"}
    with pytest.raises(ResumeRefused) as e:
        check_and_record_config(tmp_path, moved, DEFAULTS, "", force=False)
    assert ("dataset.path: recorded '/data/q.jsonl' -> now '/data/other.jsonl'  (dataset identity changed"
            in str(e.value))
    assert "dataset.id_column: recorded 'id' -> now 'qid'" in str(e.value)


def test_an_old_output_with_only_workflow_yaml_is_compared_semantically(tmp_path: Path) -> None:
    (tmp_path / "_matrix").mkdir()
    (tmp_path / "_matrix" / "workflow.yaml").write_text("name: coral\nmax_turns: 20\ntemperature: 0.7\n")
    assert check_and_record_config(tmp_path, _identity(new_knob="auto"), DEFAULTS, "", force=False) is True
    assert (tmp_path / "_matrix" / "identity.json").exists()  # recorded from now on
    with pytest.raises(ResumeRefused, match="workflow.temperature: recorded 0.7 -> now 0.2"):
        check_and_record_config(tmp_path, _identity(temperature=0.2), DEFAULTS, "", force=False)


# -- input faults ----------------------------------------------------------------------
def test_null_and_empty_ids_become_failed_items_naming_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": "a"}\n{"id": null}\n{"id": ""}\n{"id": "None"}\n{"id": null}\n')
    items = list(iter_input(DatasetConf(path=str(f))))
    assert [i.id for i in items if i.error is None] == ["a", "None"]
    errors = [i.error for i in items if i.error]
    assert f"{f}:2: the id column 'id' is null" in errors[0]
    assert f"{f}:3: the id column 'id' is empty" in errors[1]
    assert f"{f}:5: the id column 'id' is null" in errors[2]
    assert len({i.id for i in items}) == 5  # failed rows keep distinct ids (never the string "None" twice)


def test_duplicate_input_ids_say_where_the_first_was(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n')
    items = list(iter_input(DatasetConf(path=str(f))))
    assert [i.duplicate_of for i in items] == [None, None, f"{f}:1"]
    assert items[2].where == f"{f}:3"


def test_a_truncated_parquet_file_and_a_stray_file_fail_alone(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "1.parquet")
    whole = pa.table({"id": [f"x{i}" for i in range(1000)]})
    pq.write_table(whole, tmp_path / "2.parquet")
    data = (tmp_path / "2.parquet").read_bytes()
    (tmp_path / "2.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "3.parquet").write_bytes(b"")
    pq.write_table(pa.table({"id": ["c"]}), tmp_path / "4.parquet")
    (tmp_path / "README").write_text("not data")

    items = list(iter_input(DatasetConf(path=str(tmp_path / "*"))))
    assert [i.id for i in items if i.error is None] == ["a", "b", "c"]
    failed = {i.id: i.error for i in items if i.error}
    assert set(failed) == {f"{INPUT_ERROR_ID_PREFIX}{tmp_path / n}" for n in ("2.parquet", "3.parquet", "README")}
    assert all(str(tmp_path) in e and "unreadable" in e for e in failed.values())  # type: ignore[operator]


def test_a_compressed_file_cut_short_keeps_the_rows_before_the_damage(tmp_path: Path) -> None:
    import zstandard

    lines = "".join(f'{{"id": "r{i}", "pad": "{"x" * 50}"}}\n' for i in range(5000)).encode()
    blob = zstandard.ZstdCompressor().compress(lines)
    f = tmp_path / "in.jsonl.zst"
    f.write_bytes(blob[: len(blob) * 3 // 4])
    items = list(iter_input(DatasetConf(path=str(f))))
    ok = [i.id for i in items if i.error is None]
    assert ok and ok == [f"r{i}" for i in range(len(ok))] and len(ok) < 5000
    assert items[-1].id == f"{INPUT_ERROR_ID_PREFIX}{f}" and "after" in (items[-1].error or "")


def test_check_input_names_path_mistakes_in_one_line(tmp_path: Path) -> None:
    cases = {str(tmp_path / "nope.jsonl"): "no such file", str(tmp_path / "*.jsonl"): "matches no file",
             str(tmp_path): "is a directory"}
    for path, what in cases.items():
        with pytest.raises(InputPathError, match=what) as e:
            check_input(DatasetConf(path=path))
        assert "\n" not in str(e.value) and "dataset.path=" in str(e.value)
    with pytest.raises(InputPathError, match="valid choices"):
        check_input(DatasetConf(path=str(tmp_path), format="csv"))
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n')
    check_input(DatasetConf(path=str(tmp_path / "*.jsonl")))
    (tmp_path / "a.csv").write_text("id\n1\n")
    with pytest.raises(InputPathError, match="cannot tell the format of a.csv"):
        check_input(DatasetConf(path=str(tmp_path / "a.csv")))
    check_input(DatasetConf(path=str(tmp_path / "a.csv"), format="jsonl"))


def test_repeats_past_the_exact_limit_are_still_found() -> None:
    from matrix_hpc.store.input import SeenIds

    seen = SeenIds(exact_limit=3)
    assert [seen.first_place(i, f"f:{n}") for n, i in enumerate(["a", "b", "c", "d", "e"])] == [None] * 5
    assert seen.first_place("b", "f:9") == "f:1"  # seen before the switch: its place is known
    assert seen.first_place("e", "f:10") is not None  # after it: found by hash
    assert seen.first_place("z", "f:11") is None


def test_an_idset_whose_files_changed_falls_back_to_the_hash(caplog: pytest.LogCaptureFixture) -> None:
    arr = pa.array(["a", "b"])
    s = IdSet(np.sort(hash_ids(arr)), lambda: iter([pa.array(["a", "x"])]), 1)
    with caplog.at_level(logging.ERROR):
        assert "a" in s and "c" not in s
    assert any("exact check" in r.message for r in caplog.records)
