"""Loading tau2 retail tasks and turning them into workflow input rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from matrix_hpc.workflows.retail.db import DATA_DIR_ENV, default_data_dir
from matrix_hpc.workflows.retail.tasks import (
    RetailTask,
    RetailTasksConf,
    iter_task_rows,
    load_policy,
    load_tasks,
    task_to_row,
    write_rows_jsonl,
)
from tests.conftest import require_component


@pytest.fixture(scope="module", autouse=True)
def _data() -> None:
    require_component((default_data_dir() / "tasks.json").exists(), "tau2-bench retail data",
                      f"put tasks.json in ../shared/data/tau2_retail or set ${DATA_DIR_ENV}")


def test_splits() -> None:
    base, train, test = load_tasks(), load_tasks(split="train"), load_tasks(split="test")
    assert (len(base), len(train), len(test)) == (114, 74, 40)
    ids = [t.id for t in base]
    assert len(set(ids)) == 114
    assert {t.id for t in train}.isdisjoint({t.id for t in test})
    assert {t.id for t in train} | {t.id for t in test} == set(ids)
    with pytest.raises(ValueError, match="unknown split 'dev'.*choose one of"):
        load_tasks(split="dev")


def test_task_fields() -> None:
    task = load_tasks()[0]
    assert task.id == "0"
    assert [a.name for a in task.actions] == ["find_user_id_by_name_zip", "get_order_details", "get_product_details",
                                             "get_product_details", "exchange_delivered_order_items"]
    assert task.actions[-1].arguments["new_item_ids"] == ["7706410293", "7747408585"]
    assert task.reward_basis == ("DB", "NL_ASSERTION") and task.communicate_info == ()
    assert "#W2378156" in task.user_scenario and "Yusuf Rossi in zip code 19122" in task.user_scenario
    assert "Unknown info:\n\tYou do not remember your email address." in task.user_scenario
    assert sum(1 for t in load_tasks() if t.communicate_info) == 36


def test_rows_round_trip_and_fit_parquet() -> None:
    tasks = load_tasks()
    rows = list(iter_task_rows())
    assert [r["id"] for r in rows] == [t.id for t in tasks]
    for task, row in zip(tasks, rows, strict=True):
        assert json.loads(json.dumps(row)) == row
        assert RetailTask.from_row(json.loads(json.dumps(row))) == task
    table = pa.Table.from_pylist(rows)  # one type per column, so sharded Parquet can hold them
    assert table.num_rows == 114 and table.schema.field("gold_actions").type.value_type.field("arguments").type == pa.string()


def test_conf_filters_and_checks() -> None:
    assert [r["id"] for r in RetailTasksConf(split="test", task_ids=["5", "9", "0"]).rows()] == ["5", "9"]
    assert len(list(RetailTasksConf().rows())) == 114
    with pytest.raises(ValueError, match="RetailTasksConf.split='val'; choose one of"):
        RetailTasksConf(split="val")


def test_missing_data_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV.replace("$", r"\$")):
        load_tasks(tmp_path)


def test_policy_and_free_text_instructions() -> None:
    assert load_policy().startswith("# Retail agent policy")
    task = RetailTask.from_tau2({"id": 7, "user_scenario": {"instructions": "Cancel my order."}})
    assert task.id == "7" and task.actions == () and task.reward_basis == ("DB", "COMMUNICATE")
    assert task_to_row(task)["user_scenario"] == "Domain: retail\nReason for call:\n\tCancel my order."


def test_rows_jsonl_feeds_the_input_reader(tmp_path: Path) -> None:
    out = tmp_path / "retail_test.jsonl"
    assert write_rows_jsonl(out, split="test") == 40
    from matrix_hpc.store.input import DatasetConf, iter_input  # the runtime's reader of dataset.path

    items = list(iter_input(DatasetConf(path=str(out))))
    assert [i.id for i in items] == [t.id for t in load_tasks(split="test")]
    assert all(i.error is None and i.row is not None for i in items)
    assert RetailTask.from_row(items[0].row or {}) == load_tasks(split="test")[0]


def test_cli_writes_rows(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "train.jsonl"
    done = subprocess.run([sys.executable, "-m", "matrix_hpc.workflows.retail", "--split", "train", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote 74 retail task rows (train)" in done.stderr
    assert len(out.read_text().splitlines()) == 74
