"""workflow=coral against a scripted LLM: dialogue order, extraction, matching, stops, errors, output types."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from matrix_hpc.runtime.message import FAILED, OK
from matrix_hpc.services.llm.contract import LLMRequestError, LLMUnavailableError
from matrix_hpc.store.rows import output_schema, tasks_to_table
from matrix_hpc.workflows.coral import NOT_SURE, Coral, CoralConf, parse_choice, question_message, summarize
from matrix_hpc.workflows.llm_steps import RoleLLMConf
from tests.unit.workflow_harness import ScriptedLLM, run_task

ROW = {"question_id": 7, "question": "What is 6 times 7?", "options": ["36", "42", "48", "54"], "answer": "B"}


def speakers(teacher: list[str], student: list[str]) -> Any:
    """A scripted LLM: speakers say their next line; the extractor reads "(X)" out of the message."""
    lines = {"teacher": iter(teacher), "student": iter(student)}

    def reply(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        if "choice" in params:
            found = re.findall(r"\(([A-Z])\)", messages[-1]["content"].split("Message by the")[1])
            return f"({found[-1]})" if found and f"({found[-1]})" in params["choice"] else NOT_SURE
        who = "teacher" if messages[0]["content"].startswith("You are a teacher") else "student"
        return next(lines[who])

    return reply


def test_opening_message_asks_the_question_with_lettered_options() -> None:
    text = question_message("What is 6 times 7?", ["36", "42"])
    assert text.splitlines()[:4] == ["What is 6 times 7?", "", "(A) 36", "(B) 42"]


@pytest.mark.parametrize("text,expected", [
    ("(B)", "B"), (" (D) ", "D"), (NOT_SURE, None), ("I think (A), no wait (C).", "C"),
    ("(E)", None),  # not an option of a 4-option question
    ("zq!!", None),
])
def test_parse_choice(text: str, expected: str | None) -> None:
    assert parse_choice(text, "ABCD") == expected


def test_agreement_stops_the_dialogue_and_scores_it() -> None:
    llm = ScriptedLLM(speakers(teacher=["Six sevens are 42, so (B)."], student=["Yes, 42: (B)."]))
    task = run_task(Coral(CoralConf()), ROW, llm)
    assert task.status == OK
    assert [m["agent"] for m in task.history] == ["student", "teacher", "extractor", "student", "extractor"]
    assert task.history[0]["content"].startswith("What is 6 times 7?") and "(B) 42" in task.history[0]["content"]
    r = task.result
    assert (r["agreed"], r["agreed_answer"], r["correct"], r["turns"], r["stop_reason"]) == (True, "B", True, 2, "agreed")
    assert r["answers"] == [{"turn": 1, "agent": "teacher", "answer": "B"}, {"turn": 2, "agent": "student", "answer": "B"}]
    assert task.history[2]["completion_tokens"] is not None  # usage recorded per LLM message


def test_agreement_on_a_wrong_answer_is_not_correct() -> None:
    llm = ScriptedLLM(speakers(teacher=["(C)"], student=["(C) too"]))
    r = run_task(Coral(CoralConf()), ROW, llm).result
    assert (r["agreed"], r["agreed_answer"], r["correct"], r["answer_key"]) == (True, "C", False, "B")


def test_disagreement_runs_to_max_turns() -> None:
    llm = ScriptedLLM(speakers(teacher=["(A)"] * 10, student=["(B)"] * 10))
    task = run_task(Coral(CoralConf(max_turns=5)), ROW, llm)
    r = task.result
    assert task.status == OK
    assert (r["agreed"], r["agreed_answer"], r["correct"], r["turns"], r["stop_reason"]) == (False, None, False, 5, "max_turns")
    assert sum(m["agent"] in ("teacher", "student") for m in task.history) == 1 + 5
    assert (r["teacher_answer"], r["student_answer"]) == ("A", "B")


def test_not_sure_keeps_the_latest_valid_answer() -> None:
    llm = ScriptedLLM(speakers(teacher=["(A)", "hmm", "(D)"], student=["let me think", "(A)"]))
    r = run_task(Coral(CoralConf()), ROW, llm).result
    # teacher A, student ?, teacher ?, student A -> teacher's latest valid is still A: agreed.
    assert [a["answer"] for a in r["answers"]] == ["A", None, None, "A"]
    assert (r["agreed"], r["agreed_answer"], r["turns"]) == (True, "A", 4)


def test_requests_are_structured_and_views_alternate() -> None:
    llm = ScriptedLLM(speakers(teacher=["(A)", "(B)"], student=["(B)", "(B)"]))
    run_task(Coral(CoralConf(speaker_temperature=0.3, speaker_max_tokens=99)), ROW, llm)
    extractor_calls = [c for c in llm.calls if "choice" in c]
    assert extractor_calls and all(c["choice"] == ["(A)", "(B)", "(C)", "(D)", NOT_SURE] for c in extractor_calls)
    assert all(c["temperature"] == 0.0 and c["max_tokens"] <= 16 for c in extractor_calls)
    speaker_calls = [c for c in llm.calls if "choice" not in c]
    assert all(c["temperature"] == 0.3 and c["max_tokens"] == 99 and c["sticky_key"] == "t1" for c in speaker_calls)
    for call in speaker_calls:
        roles = [m["role"] for m in call["messages"]]
        assert roles[0] == "system" and roles[1] == "user"
        assert all(a != b for a, b in zip(roles[1:], roles[2:], strict=False)), roles  # user/assistant alternate
    student_call = next(c for c in speaker_calls if c["messages"][0]["content"].startswith("You are a student"))
    assert "What is 6 times 7?" in student_call["messages"][0]["content"]


def test_role_model_override_goes_into_the_request() -> None:
    conf = CoralConf(teacher_llm=RoleLLMConf(model="big-teacher"))
    llm = ScriptedLLM(speakers(teacher=["(B)"], student=["(B)"]))
    run_task(Coral(conf), ROW, llm)
    models = [c.get("model") for c in llm.calls]
    assert models.count("big-teacher") == 1 and models.count(None) == len(models) - 1


def test_rejected_request_fails_the_row_without_retry() -> None:
    def reply(messages: list[dict[str, Any]], params: dict[str, Any]) -> Any:
        return LLMRequestError(400, "maximum context length is 1024 tokens", "http://r1")

    llm = ScriptedLLM(reply)
    task = run_task(Coral(CoralConf()), ROW, llm)
    assert task.status == FAILED and task.error_type == "LLMRejected"
    assert "maximum context length" in (task.error or "") and len(llm.calls) == 1


def test_unavailable_llm_is_retried_and_then_fails_the_row() -> None:
    calls = iter([LLMUnavailableError("down"), "(B)", "(B)"])
    flaky = ScriptedLLM(lambda m, p: next(calls) if "choice" not in p else "(B)")
    task = run_task(Coral(CoralConf()), ROW, flaky)
    assert task.status == OK and task.attempts == 2 and task.result["agreed"]
    down = ScriptedLLM(lambda m, p: LLMUnavailableError("all replicas down"))
    task = run_task(Coral(CoralConf()), ROW, down, max_attempts=3)
    assert task.status == FAILED and task.error_type == "LLMUnavailableError" and len(down.calls) == 3


@pytest.mark.parametrize("row,message", [
    ({"question": "q", "options": ["a", "b"]}, "'answer' is missing"),
    ({"question": "q", "options": "a,b", "answer": "A"}, "must be a list"),
    ({"question": "q", "options": ["a", "b"], "answer": "C"}, "not one of the 2 option letters AB"),
])
def test_bad_input_rows_are_refused_with_the_reason(row: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Coral(CoralConf()).validate_input(row)


def test_column_names_and_index_answers_are_configurable() -> None:
    conf = CoralConf(question_column="prompt", options_column="choices", answer_column="label")
    row = {"prompt": "2+2?", "choices": ["3", "4", "5"], "label": 1}
    task = run_task(Coral(conf), row, ScriptedLLM(speakers(teacher=["(B)"], student=["(B)"])))
    assert task.result["answer_key"] == "B" and task.result["correct"]


def test_rows_fit_the_typed_output_schema_and_summarize() -> None:
    wf = Coral(CoralConf(max_turns=3))
    agreed = run_task(wf, ROW, ScriptedLLM(speakers(["(B)"], ["(B)"])), task_id="a")
    wrong = run_task(wf, ROW, ScriptedLLM(speakers(["(C)"], ["(C)"])), task_id="b")
    stuck = run_task(wf, ROW, ScriptedLLM(speakers(["(A)"] * 3, ["(D)"] * 3)), task_id="c")
    failed = run_task(wf, ROW, ScriptedLLM(lambda m, p: LLMRequestError(400, "bad", "r")), task_id="d")
    table = tasks_to_table([agreed, wrong, stuck, failed], "run", output_schema(wf.result_columns()))
    assert table.schema.field("answers").type.value_type == pa.struct(
        [("turn", pa.int32()), ("agent", pa.string()), ("answer", pa.string())])
    assert table.column("turns").to_pylist() == [2, 2, 3, None]
    s = summarize(table)
    assert s["by_status"] == {"ok": 3, "failed": 1} and s["dialogues"] == 3
    assert s["agreement_rate"] == pytest.approx(2 / 3) and s["agreement_correctness"] == pytest.approx(1 / 2)
    assert s["accuracy"] == pytest.approx(1 / 3) and s["mean_turns"] == pytest.approx(7 / 3)


def test_hydra_config_composes_and_refuses_bad_values(repo_root: Any) -> None:
    from matrix_hpc.cli.config_check import ConfigError, compose

    conf_dir = str(repo_root / "conf")
    cfg = compose(["workflow=coral", "dataset=mmlu_pro_sample", "llm=sim", "output.dir=/tmp/x",
                   "workflow.teacher_llm.model=m1"], conf_dir)
    assert cfg.workflow.max_turns == 20 and cfg.workflow.teacher_llm.model == "m1"
    assert cfg.dataset.id_column == "question_id"
    with pytest.raises(ConfigError, match="max_turns"):
        compose(["workflow=coral", "dataset=mmlu_pro_sample", "output.dir=/tmp/x", "workflow.max_turns=0"], conf_dir)


def _save_with_datasets(path: Path, rows: list[dict[str, Any]], split: str) -> None:
    """A DatasetDict written by the real ``datasets`` (``save_to_disk``)."""
    import datasets

    datasets.DatasetDict({split: datasets.Dataset.from_list(rows)}).save_to_disk(str(path))


def test_a_saved_hugging_face_dataset_exports_to_parquet_input(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from matrix_hpc.store.hf_input import export_to_parquet, load_hf_dataset_dir
    from matrix_hpc.store.input import DatasetConf, iter_input

    rows = [dict(ROW, question_id=i) for i in range(5)]
    _save_with_datasets(tmp_path / "mmlu", rows, "test")
    assert load_hf_dataset_dir(tmp_path / "mmlu").to_pylist() == rows  # the only split is chosen
    with pytest.raises(ValueError, match="split 'train' not in"):
        load_hf_dataset_dir(tmp_path / "mmlu", "train")
    assert export_to_parquet(tmp_path / "mmlu", tmp_path / "mmlu.parquet", "test") == 5
    assert pq.read_table(tmp_path / "mmlu.parquet").num_rows == 5
    items = list(iter_input(DatasetConf(path=str(tmp_path / "mmlu.parquet"), id_column="question_id")))
    wf = Coral(CoralConf())
    for item in items:
        assert item.row is not None
        wf.validate_input(item.row)
    with pytest.raises(ValueError, match="not a Hugging Face dataset directory"):
        load_hf_dataset_dir(tmp_path)
    # dataset.path may also name the saved directory itself
    direct = list(iter_input(DatasetConf(path=str(tmp_path / "mmlu"), id_column="question_id", split="test")))
    assert [i.id for i in direct] == [str(i) for i in range(5)] and all(i.error is None for i in direct)


async def test_a_role_endpoint_gets_its_own_client_kept_for_closing() -> None:
    from matrix_hpc.runtime.workflow import AgentContext
    from matrix_hpc.services.llm.client import LLMClient
    from matrix_hpc.workflows.llm_steps import role_client

    shared = ScriptedLLM(lambda m, p: "x")
    ctx = AgentContext(0, {"llm": shared})
    assert role_client(ctx, RoleLLMConf(model="m")) is shared  # a model alone stays on the run's service
    role = RoleLLMConf(model="judge-model", base_url="http://127.0.0.1:9/v1")
    client = role_client(ctx, role)
    assert isinstance(client, LLMClient) and client.model == "judge-model"
    assert role_client(ctx, role) is client and ctx.services["llm@http://127.0.0.1:9/v1"] is client
    await client.close()
