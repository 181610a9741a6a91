"""N samples per input row: task ids and seeds, the resume identity (N may
grow, not shrink), the end-of-run check expecting N ids a row, the seed in
every LLM request of a sample, and the rows' ``sample`` / ``seed`` columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from matrix_hpc.runtime.conf import RunConf
from matrix_hpc.runtime.identity import GROWABLE_IDENTITY_KEYS, resume_identity
from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.samples import expand_samples, sample_seed
from matrix_hpc.runtime.verify import missing_input
from matrix_hpc.store.input import DatasetConf, HFDatasetConf, InputItem
from matrix_hpc.store.layout import META_DIR
from matrix_hpc.store.resume import ResumeRefused, check_and_record_config
from matrix_hpc.store.rows import output_schema, tasks_to_table
from matrix_hpc.workflows.overhead import OverheadConf


def _items(n: int) -> list[InputItem]:
    return [InputItem(f"q{i}", {"question": f"Q{i}"}, where=f"in.jsonl:{i + 1}") for i in range(n)]


def test_each_row_becomes_n_tasks_with_distinct_seeds_the_same_on_a_rerun() -> None:
    tasks = list(expand_samples(_items(50), 3, run_seed=7))
    assert [t.id for t in tasks[:4]] == ["q0", "q0#s1", "q0#s2", "q1"]
    assert [t.sample for t in tasks[:4]] == [0, 1, 2, 0]
    assert len({t.id for t in tasks}) == 150
    for i in range(50):
        seeds = [t.seed for t in tasks[3 * i:3 * i + 3]]
        assert len(set(seeds)) == 3 and all(s is not None and 0 <= s < 2 ** 31 for s in seeds)
    assert [t.seed for t in expand_samples(_items(50), 3, run_seed=7)] == [t.seed for t in tasks]
    assert sample_seed(8, "q0", 0) != sample_seed(7, "q0", 0)  # the run's seed changes every draw
    assert all(t.row == {"question": f"Q{int(t.id[1:].split('#')[0])}"} for t in tasks)


def test_one_sample_per_row_keeps_the_input_ids_and_sends_no_seed() -> None:
    items = _items(5)
    tasks = list(expand_samples(items, 1, run_seed=7))
    assert tasks == items and all(t.sample == 0 and t.seed is None for t in tasks)


def test_an_unreadable_row_fails_once_per_sample_and_a_repeat_repeats_every_sample() -> None:
    bad = InputItem("in.jsonl:3", None, "in.jsonl:3: not valid JSON", "{", "in.jsonl:3")
    again = InputItem("q0", {"question": "Q0"}, where="in.jsonl:4", duplicate_of="in.jsonl:1")
    tasks = list(expand_samples([bad, again], 2, run_seed=0))
    assert [(t.id, t.row, t.error) for t in tasks[:2]] == [("in.jsonl:3", None, bad.error),
                                                          ("in.jsonl:3#s1", None, bad.error)]
    assert [(t.id, t.duplicate_of) for t in tasks[2:]] == [("q0", "in.jsonl:1"), ("q0#s1", "in.jsonl:1")]


def _identity(samples: int, **dataset: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return resume_identity(OverheadConf(), DatasetConf(**dataset), RunConf(samples_per_input=samples))


def _check(out: Path, samples: int, **dataset: Any) -> bool:
    identity, defaults = _identity(samples, **dataset)
    return check_and_record_config(out, identity, defaults, "", force=False, growable=GROWABLE_IDENTITY_KEYS)


def test_samples_per_input_may_grow_on_resume_and_is_recorded_but_not_shrink(tmp_path: Path) -> None:
    assert _check(tmp_path, 1, path="in.jsonl") is False
    assert _check(tmp_path, 3, path="in.jsonl") is True  # more samples: the run adds them
    recorded = json.loads((tmp_path / META_DIR / "identity.json").read_text())
    assert recorded["run"] == {"samples_per_input": 3}
    with pytest.raises(ResumeRefused) as e:
        _check(tmp_path, 2, path="in.jsonl")
    assert "run.samples_per_input: recorded 3 -> now 2  (it may grow, not shrink" in str(e.value)
    assert _check(tmp_path, 3, path="in.jsonl") is True


def test_an_output_recorded_before_samples_existed_resumes_with_more(tmp_path: Path) -> None:
    identity, defaults = resume_identity(OverheadConf(), DatasetConf(path="in.jsonl"))  # no run part, as before
    check_and_record_config(tmp_path, identity, defaults, "", force=False)
    assert _check(tmp_path, 1, path="in.jsonl") is True
    assert _check(tmp_path, 2, path="in.jsonl") is True


def test_the_hub_dataset_name_config_split_and_revision_are_identity(tmp_path: Path) -> None:
    def hf(**kw: Any) -> dict[str, Any]:
        return {"path": None, "hf": HFDatasetConf(**{"name": "org/set", "config": "main", "split": "test", **kw})}

    assert _check(tmp_path, 1, **hf()) is False
    assert _check(tmp_path, 1, **hf(streaming=True)) is True  # how it is read is not what it is
    for change, line in [({"name": "org/other"}, "dataset.hf.name: recorded 'org/set' -> now 'org/other'"),
                         ({"config": "all"}, "dataset.hf.config: recorded 'main' -> now 'all'"),
                         ({"split": "train"}, "dataset.hf.split: recorded 'test' -> now 'train'"),
                         ({"revision": "v2"}, "dataset.hf.revision: recorded None -> now 'v2'")]:
        with pytest.raises(ResumeRefused) as e:
            _check(tmp_path, 1, **hf(**change))
        assert f"{line}  (dataset identity changed" in str(e.value)


def test_a_file_output_resumes_after_the_hf_keys_were_added(tmp_path: Path) -> None:
    identity, defaults = _identity(1, path="in.jsonl")
    del identity["dataset"]["hf"], identity["run"]  # what a release without them recorded
    check_and_record_config(tmp_path, identity, defaults, "", force=False)
    assert _check(tmp_path, 1, path="in.jsonl") is True


def _write_output(out: Path, ids: list[str], samples: list[int] | None = None) -> Path:
    import pyarrow.parquet as pq

    shard = out / "shard=00000"
    shard.mkdir(parents=True)
    tasks = []
    for task_id, sample in zip(ids, samples or [0] * len(ids), strict=True):
        task = TaskState(task_id, {}, "", sample=sample)
        task.finish("ok")
        tasks.append(task)
    pq.write_table(tasks_to_table(tasks, "r1", output_schema()), shard / "part-00000.parquet")
    return shard / "part-00000.parquet"


def test_inspect_counts_rows_per_sample_and_inputs_with_all_their_samples(tmp_path: Path) -> None:
    from matrix_hpc.store.verify import count_samples

    # "x#s5" is an input id of its own (sample 0): only a sample's suffix is stripped
    part = _write_output(tmp_path, ["q0", "q0#s1", "q0#s2", "q1", "q1#s2", "x#s5", "x#s5#s1", "x#s5#s2"],
                         [0, 1, 2, 0, 2, 0, 1, 2])
    counts = count_samples([part], 3)
    assert (counts.by_sample, counts.inputs, counts.complete) == ({0: 3, 1: 2, 2: 3}, 3, 2)
    assert count_samples([part], 2).complete == 3


def test_the_end_check_expects_every_sample_of_every_row(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}"}) + "\n" for i in range(4)))
    _write_output(tmp_path / "out", ["q0", "q0#s1", "q0#s2", "q1", "q1#s2", "q2#s1", "q3", "q3#s1", "q3#s2"])
    missing = missing_input(tmp_path / "out", DatasetConf(path=str(data)), samples_per_input=3, run_seed=0)
    assert [(m.id, m.sample) for m in missing.items] == [("q1#s1", 1), ("q2", 0), ("q2#s2", 2)]
    assert missing.items[0].seed == sample_seed(0, "q1", 1)
    assert len(missing_input(tmp_path / "out", DatasetConf(path=str(data)))) == 1  # one sample a row: q2


def test_rows_carry_their_sample_and_seed() -> None:
    task = TaskState("q1#s2", {"q": 1}, "", sample=2, seed=12345)
    task.finish("ok")
    plain = TaskState("q1", {"q": 1}, "")
    plain.finish("ok")
    table = tasks_to_table([task, plain], "r1", output_schema())
    assert table.schema.field("sample").type == pa.int32() and table.schema.field("seed").type == pa.int64()
    assert table.select(["id", "sample", "seed"]).to_pylist() == [
        {"id": "q1#s2", "sample": 2, "seed": 12345}, {"id": "q1", "sample": 0, "seed": None}]


def test_a_workflow_column_named_like_an_own_column_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"result column\(s\) \['sample', 'seed'\] reuse names"):
        output_schema({"seed": pa.int64(), "sample": pa.string(), "score": pa.float64()})


class _RecordingLLM:
    def __init__(self) -> None:
        self.params: list[dict[str, Any]] = []

    async def chat(self, messages: list[dict[str, Any]], sticky_key: str, **params: Any) -> Any:
        from types import SimpleNamespace

        self.params.append(params)
        return SimpleNamespace(content="(A)", usage=SimpleNamespace(prompt_tokens=1, completion_tokens=1))


async def test_a_sample_sends_its_seed_with_every_llm_request_and_a_single_draw_sends_none() -> None:
    from matrix_hpc.runtime.workflow import AgentContext
    from matrix_hpc.workflows.llm_steps import chat

    llm = _RecordingLLM()
    ctx = AgentContext(0, {"llm": llm})
    await chat(ctx, TaskState("q1#s1", {}, "", sample=1, seed=99), "teacher", [], temperature=0.7)
    await chat(ctx, TaskState("q1", {}, ""), "teacher", [], temperature=0.7)
    assert llm.params == [{"temperature": 0.7, "seed": 99}, {"temperature": 0.7}]
