"""workflow=natural_reasoning against a scripted LLM: each stage's early exit, schemas, output types."""

from __future__ import annotations

import json
from typing import Any

import pytest

from matrix_hpc.runtime.message import FILTERED, OK
from matrix_hpc.store.rows import output_schema, tasks_to_table
from matrix_hpc.workflows.natural_reasoning import (
    NaturalReasoning,
    NaturalReasoningConf,
    boxed_answer,
    identify_language,
    question_schema,
    rubric_schema,
    summarize,
)
from tests.unit.workflow_harness import ScriptedLLM, run_task

DOC = {"id": "d1", "text": "A train leaves at 3 pm at 60 km/h; a second one leaves at 4 pm at 90 km/h on the same "
                           "track. The second catches up when 60 t = 90 (t - 1), so t = 3 hours, at 6 pm, 180 km out."}
GERMAN = {"id": "d2", "text": "Die Ableitung der Funktion f(x) = x^2 ist f'(x) = 2x. Daraus folgt, dass die Steigung "
                              "der Parabel an der Stelle x = 3 genau 6 beträgt."}
GOOD_SCORES = {"problem_completeness": 5, "problem_complexity": 4, "technical_correctness": 5, "reasoning_quality": 3}
GOOD_QUESTION = {"question": "When does the second train catch up?", "category": "mathematics",
                 "reference_answer": "6 pm", "independent_answer": "60t = 90(t-1) gives t = 3, so \\boxed{6\\text{ pm}}"}


def pipeline(worth: str = "yes", scores: Any = GOOD_SCORES, question: Any = GOOD_QUESTION) -> ScriptedLLM:
    """Answers each stage by the kind of request: choice -> filter, rubric schema -> score, else question."""
    def reply(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        if "choice" in params:
            return worth
        value = scores if "problem_complexity" in params["json_schema"]["properties"] else question
        value = next(value) if hasattr(value, "__next__") else value
        return value if isinstance(value, str) else json.dumps(value)

    return ScriptedLLM(reply)


def test_language_identification_is_offline_and_right() -> None:
    assert identify_language(DOC["text"])[0] == "en"
    lang, prob = identify_language(GERMAN["text"])
    assert lang == "de" and prob > 0.9


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}.", "42"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("\\boxed{1} then \\boxed{2}", "2"),
    ("no box", None), ("\\boxed{}", None), ("\\boxed{unclosed", None),
])
def test_boxed_answer(text: str, expected: str | None) -> None:
    assert boxed_answer(text) == expected


def test_a_good_document_becomes_a_question() -> None:
    llm = pipeline()
    task = run_task(NaturalReasoning(NaturalReasoningConf()), DOC, llm)
    assert task.status == OK, task.reason
    r = task.result
    assert (r["language"], r["worth_question"], r["scores"]) == ("en", True, GOOD_SCORES)
    assert (r["question"], r["category"], r["reference_answer"]) == (GOOD_QUESTION["question"], "mathematics", "6 pm")
    assert r["final_answer"] == "6\\text{ pm}" and "dropped_at" not in r
    assert [m["agent"] for m in task.history] == ["filter", "score", "question"]
    filter_call, score_call, question_call = llm.calls
    assert filter_call["choice"] == ["yes", "no"] and filter_call["temperature"] == 0.0
    assert score_call["json_schema"] == rubric_schema(NaturalReasoningConf())
    assert question_call["json_schema"]["properties"]["category"]["enum"][0] == "mathematics"


def test_other_languages_and_empty_documents_are_dropped_without_an_llm_call() -> None:
    llm = pipeline()
    german = run_task(NaturalReasoning(NaturalReasoningConf()), GERMAN, llm)
    assert german.status == FILTERED and german.result["dropped_at"] == "filter"
    assert german.reason is not None and german.reason.startswith("filter: language de")
    empty = run_task(NaturalReasoning(NaturalReasoningConf()), {"id": "e", "text": "  "}, llm)
    assert empty.status == FILTERED and empty.reason == "filter: empty document"
    assert llm.calls == []
    kept = run_task(NaturalReasoning(NaturalReasoningConf(languages=["en", "de"])), GERMAN, llm)
    assert kept.status == OK and kept.result["language"] == "de"


def test_no_reasoning_is_dropped_at_the_filter() -> None:
    task = run_task(NaturalReasoning(NaturalReasoningConf()), DOC, pipeline(worth="no"))
    assert task.status == FILTERED and task.result["dropped_at"] == "filter"
    assert task.result["worth_question"] is False and "'no'" in (task.reason or "")


def test_scores_below_threshold_drop_at_score_naming_the_criterion() -> None:
    low = {**GOOD_SCORES, "problem_complexity": 1}
    task = run_task(NaturalReasoning(NaturalReasoningConf()), DOC, pipeline(scores=low))
    assert task.status == FILTERED and task.result["dropped_at"] == "score"
    assert task.reason == "score: below threshold: problem_complexity 1 < 3"
    lenient = NaturalReasoningConf(min_scores={"problem_complexity": 1})
    assert run_task(NaturalReasoning(lenient), DOC, pipeline(scores=low)).status == OK


def test_unusable_json_is_asked_again_then_dropped() -> None:
    flaky = iter(['{"problem_completeness": 5', GOOD_SCORES])  # cut short, then valid
    llm = pipeline(scores=flaky)
    task = run_task(NaturalReasoning(NaturalReasoningConf()), DOC, llm)
    assert task.status == OK and [m["agent"] for m in task.history] == ["filter", "score", "score", "question"]
    assert llm.calls[2]["temperature"] == 0.7  # the re-ask samples
    out_of_range = {**GOOD_SCORES, "technical_correctness": 9}
    task = run_task(NaturalReasoning(NaturalReasoningConf()), DOC, pipeline(scores=out_of_range))
    assert task.status == FILTERED and task.reason is not None and task.reason.startswith("score: the model's JSON is unusable")
    garbage = run_task(NaturalReasoning(NaturalReasoningConf(malformed_retries=0)), DOC,
                       pipeline(question="zzq ~~ \u00ff not json"))
    assert garbage.status == FILTERED and garbage.result["dropped_at"] == "question"


def test_questions_without_a_boxed_answer_are_dropped_unless_allowed() -> None:
    unboxed = {**GOOD_QUESTION, "independent_answer": "It is 6 pm.", "reference_answer": ""}
    task = run_task(NaturalReasoning(NaturalReasoningConf()), DOC, pipeline(question=unboxed))
    assert task.status == FILTERED and task.result["dropped_at"] == "question" and "boxed" in (task.reason or "")
    task = run_task(NaturalReasoning(NaturalReasoningConf(require_boxed=False)), DOC, pipeline(question=unboxed))
    assert task.status == OK and task.result["final_answer"] is None and task.result["reference_answer"] is None


def test_category_outside_the_list_is_unusable() -> None:
    odd = {**GOOD_QUESTION, "category": "astrology"}
    task = run_task(NaturalReasoning(NaturalReasoningConf(malformed_retries=0)), DOC, pipeline(question=odd))
    assert task.status == FILTERED and task.result["dropped_at"] == "question"


def test_schemas_enforce_integers_and_fields() -> None:
    conf = NaturalReasoningConf(rubric={"a": "x", "b": "y"}, max_score=10)
    schema = rubric_schema(conf)
    assert schema["required"] == ["a", "b"] and schema["additionalProperties"] is False
    assert schema["properties"]["a"] == {"type": "integer", "minimum": 0, "maximum": 10}
    q = question_schema(conf)
    assert set(q["required"]) == {"question", "category", "reference_answer", "independent_answer"}


def test_bad_config_and_input_are_refused() -> None:
    with pytest.raises(ValueError, match="min_scores names criteria not in workflow.rubric: \\['nope'\\]"):
        NaturalReasoningConf(min_scores={"nope": 2})
    with pytest.raises(ValueError, match="'text' is missing"):
        NaturalReasoning(NaturalReasoningConf()).validate_input({"body": "x"})


def test_rows_fit_the_typed_output_schema_and_summarize() -> None:
    wf = NaturalReasoning(NaturalReasoningConf())
    tasks = [run_task(wf, DOC, pipeline(), task_id="ok"),
             run_task(wf, GERMAN, pipeline(), task_id="de"),
             run_task(wf, DOC, pipeline(worth="no"), task_id="no"),
             run_task(wf, DOC, pipeline(scores={**GOOD_SCORES, "reasoning_quality": 0}), task_id="low")]
    table = tasks_to_table(tasks, "run", output_schema(wf.result_columns()))
    assert table.column("dropped_at").to_pylist() == [None, "filter", "filter", "score"]
    assert dict(table.column("scores").to_pylist()[0]) == GOOD_SCORES
    s = summarize(table)
    assert s["by_status"] == {"ok": 1, "filtered": 3} and s["dropped_at"] == {"filter": 2, "score": 1, "question": 0}
    assert s["questions"] == 1 and s["with_boxed_answer"] == 1 and s["languages"] == {"en": 3, "de": 1}


def test_hydra_config_composes(repo_root: Any) -> None:
    from matrix_hpc.cli.config_check import ConfigError, compose

    conf_dir = str(repo_root / "conf")
    cfg = compose(["workflow=natural_reasoning", "dataset=web_docs_sample", "llm=sim", "output.dir=/tmp/x",
                   "workflow.languages=[en,fr]", "+workflow.min_scores.problem_complexity=2"], conf_dir)
    assert list(cfg.workflow.languages) == ["en", "fr"] and cfg.workflow.min_scores.problem_complexity == 2
    with pytest.raises(ConfigError, match="min_scores"):
        compose(["workflow=natural_reasoning", "dataset=web_docs_sample", "output.dir=/tmp/x",
                 "+workflow.min_scores.typo=2"], conf_dir)


def test_zstd_compressed_jsonl_documents_are_read(tmp_path: Any) -> None:
    import zstandard

    from matrix_hpc.store.input import DatasetConf, iter_input

    lines = "".join(json.dumps(d) + "\n" for d in (DOC, GERMAN)).encode()
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    items = list(iter_input(DatasetConf(path=str(tmp_path / "*.jsonl.zst"), required_columns=["text"])))
    assert [i.id for i in items] == ["d1", "d2"]
    wf = NaturalReasoning(NaturalReasoningConf())
    statuses = [run_task(wf, i.row, pipeline(), task_id=i.id).status for i in items if i.row is not None]
    assert statuses == [OK, FILTERED]
