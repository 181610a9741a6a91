"""``workflow=natural_reasoning``: reasoning questions from web documents.

filter -> score -> question, each stage able to drop the document:

- ``filter``: offline language identification (py3langid) keeps
  ``languages``; then an LLM answers "yes"/"no" (structured choice) to "does
  this document contain reasoning worth a question?".
- ``score``: an LLM rates the document on a rubric, one integer per
  criterion (JSON schema-enforced); every criterion must reach its minimum.
- ``question``: an LLM writes JSON with ``question``, ``category``,
  ``reference_answer`` (the document's own answer, if any) and
  ``independent_answer`` ending in ``\\boxed{...}``; no boxed answer -> dropped.

A dropped document ends as a ``filtered`` row whose ``reason`` starts with
the stage ("filter: ...", "score: ...", "question: ...") and whose
``dropped_at`` column names it; ``output.keep=ok`` moves those rows out of
the main dataset. :func:`summarize` gives pass rates per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.workflow import AgentContext, Filtered, Workflow, WorkflowConf, register_workflow
from matrix_hpc.workflows.llm_steps import RoleLLMConf, chat, parse_json_object

STAGES = ("filter", "score", "question")

FILTER_PROMPT = (
    "You screen web documents for a dataset of challenging reasoning questions. Answer 'yes' when the "
    "document contains reasoning worth turning into a question: a problem, derivation, argument or "
    "analysis that takes several steps of thought (mathematics, science, engineering, economics, law, ...). "
    "Answer 'no' for navigation pages, advertising, news without analysis, lists, or boilerplate."
)
SCORE_PROMPT = (
    "Rate the document on each criterion below with an integer from 0 (absent) to {max_score} (excellent).\n"
    "{criteria}\nAnswer with a JSON object holding one integer per criterion."
)
QUESTION_PROMPT = (
    "From the document, write one challenging, self-contained reasoning question that can be answered "
    "without seeing the document. Answer with a JSON object:\n"
    "- question: the question, with every number and definition it needs;\n"
    "- category: its subject;\n"
    "- reference_answer: the final answer the document itself gives, or '' if it gives none;\n"
    "- independent_answer: your own step-by-step solution, ending with the final answer in \\boxed{...}."
)
RUBRIC = {
    "problem_completeness": "the document holds a problem or argument with the information needed to work it out",
    "problem_complexity": "working it out takes several non-trivial steps of reasoning",
    "technical_correctness": "the content is technically accurate",
    "reasoning_quality": "the document shows or invites careful, explicit reasoning",
}
CATEGORIES = ["mathematics", "physics", "chemistry", "biology", "computer science", "engineering",
              "economics", "medicine", "law", "social science", "other"]


@dataclass
class NaturalReasoningConf(WorkflowConf):
    name: str = "natural_reasoning"
    text_column: str = "text"  # input column holding the document
    max_doc_chars: int = 8000  # the document is cut to this many characters in prompts
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes kept by the filter
    min_language_prob: float = 0.5  # the language's probability must reach this
    langid_chars: int = 2000  # characters of the document the language id reads
    filter_prompt: str = FILTER_PROMPT  # system prompt of the yes/no reasoning filter
    rubric: dict[str, str] = field(default_factory=lambda: dict(RUBRIC))  # criterion -> what it rates
    max_score: int = 5  # scores are integers in [0, max_score]
    min_score: int = 3  # a criterion passes at score >= this...
    min_scores: dict[str, int] = field(default_factory=dict)  # ...unless given here per criterion
    score_prompt: str = SCORE_PROMPT  # system prompt of the scorer ({max_score}, {criteria})
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))  # allowed question categories
    question_prompt: str = QUESTION_PROMPT  # system prompt of the question writer
    question_temperature: float = 0.7  # sampling temperature of the question writer
    question_max_tokens: int = 1536  # length cap of the question JSON, in tokens
    max_field_chars: int = 4000  # each string field of the question JSON is at most this long
    require_boxed: bool = True  # drop questions whose independent answer has no \boxed{...}
    malformed_retries: int = 1  # re-asks (at temperature 0.7) when the JSON is unusable; then dropped
    filter_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # filter's model/endpoint override
    score_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # scorer's model/endpoint override
    question_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # question writer's model/endpoint override

    def __post_init__(self) -> None:
        unknown = sorted(set(self.min_scores) - set(self.rubric))
        if unknown:
            raise ValueError(f"workflow.min_scores names criteria not in workflow.rubric: {unknown}; "
                             f"the rubric has {sorted(self.rubric)}")
        if not self.rubric:
            raise ValueError("workflow.rubric is empty; give at least one criterion")
        if not 0 <= self.min_score <= self.max_score:
            raise ValueError(f"workflow.min_score={self.min_score} must be within [0, max_score={self.max_score}]")


@lru_cache(maxsize=1)
def _language_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # lazy: numpy and the model load once

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of ``text``, offline."""
    lang, prob = _language_identifier().classify(text)
    return str(lang), float(prob)


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), else None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            answer = text[i:j].strip()
            return answer or None
    return None


def rubric_schema(conf: NaturalReasoningConf) -> dict[str, Any]:
    score = {"type": "integer", "minimum": 0, "maximum": conf.max_score}
    return {"type": "object", "properties": {k: score for k in conf.rubric},
            "required": list(conf.rubric), "additionalProperties": False}


def question_schema(conf: NaturalReasoningConf) -> dict[str, Any]:
    text = {"type": "string", "maxLength": conf.max_field_chars}
    return {
        "type": "object",
        "properties": {"question": {"type": "string", "minLength": 1, "maxLength": conf.max_field_chars},
                       "category": {"type": "string", "enum": list(conf.categories)},
                       "reference_answer": text,
                       "independent_answer": {"type": "string", "minLength": 1, "maxLength": conf.max_field_chars}},
        "required": ["question", "category", "reference_answer", "independent_answer"],
        "additionalProperties": False,
    }


@register_workflow("natural_reasoning", NaturalReasoningConf)
class NaturalReasoning(Workflow):
    roles = STAGES
    uses_llm = True
    conf: NaturalReasoningConf

    def validate_input(self, row: dict[str, Any]) -> None:
        if not isinstance(row.get(self.conf.text_column), str):
            raise ValueError(f"input column {self.conf.text_column!r} is missing or not a string "
                             f"(columns: {sorted(row)}); set workflow.text_column to the document column")

    def _document(self, task: TaskState) -> str:
        return str(task.input[self.conf.text_column])[: self.conf.max_doc_chars]

    def _drop(self, task: TaskState, stage: str, why: str) -> Filtered:
        task.result["dropped_at"] = stage
        return Filtered(f"{stage}: {why}")

    async def filter(self, task: TaskState, ctx: AgentContext) -> None:
        c, text = self.conf, self._document(task)
        if not text.strip():
            raise self._drop(task, "filter", "empty document")
        lang, prob = identify_language(text[: c.langid_chars])
        task.result.update(language=lang, language_prob=round(prob, 4))
        if lang not in c.languages or prob < c.min_language_prob:
            raise self._drop(task, "filter", f"language {lang} (p={prob:.2f}) not in {c.languages} "
                                             f"with p >= {c.min_language_prob}")
        messages = [{"role": "system", "content": c.filter_prompt},
                    {"role": "user", "content": f"Document:\n{text}\n\nDoes this document contain reasoning "
                                                "worth a question? Answer yes or no."}]
        answer = await chat(ctx, task, "filter", messages, role=c.filter_llm, choice=["yes", "no"],
                            temperature=0.0, max_tokens=8)  # constrained decoding may spell "yes" in 3 tokens
        worth = answer.strip().lower() == "yes"
        task.result["worth_question"] = worth
        if not worth:
            raise self._drop(task, "filter", f"the model answered {answer.strip()[:20]!r} to 'worth a question?'")

    async def score(self, task: TaskState, ctx: AgentContext) -> None:
        c = self.conf
        criteria = "\n".join(f"- {name}: {what}" for name, what in c.rubric.items())
        system = c.score_prompt.replace("{max_score}", str(c.max_score)).replace("{criteria}", criteria)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Document:\n{self._document(task)}"}]
        max_tokens = 16 + 12 * len(c.rubric) + sum(len(k) for k in c.rubric) // 2
        scores = await self._ask_json(task, ctx, "score", messages, rubric_schema(c), self._valid_scores,
                                      role=c.score_llm, temperature=0.0, max_tokens=max_tokens)
        task.result["scores"] = scores
        failing = [f"{k} {v} < {c.min_scores.get(k, c.min_score)}" for k, v in scores.items()
                   if v < c.min_scores.get(k, c.min_score)]
        if failing:
            raise self._drop(task, "score", "below threshold: " + ", ".join(failing))

    def _valid_scores(self, value: dict[str, Any]) -> dict[str, int] | None:
        scores = {}
        for name in self.conf.rubric:
            v = value.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= self.conf.max_score:
                return None
            scores[name] = v
        return scores

    async def question(self, task: TaskState, ctx: AgentContext) -> None:
        c = self.conf
        system = c.question_prompt + "\nAllowed categories: " + ", ".join(c.categories) + "."
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Document:\n{self._document(task)}"}]
        q = await self._ask_json(task, ctx, "question", messages, question_schema(c), self._valid_question,
                                 role=c.question_llm, temperature=c.question_temperature,
                                 max_tokens=c.question_max_tokens)
        final = boxed_answer(q["independent_answer"])
        task.result.update(question=q["question"], category=q["category"],
                           reference_answer=q["reference_answer"].strip() or None,
                           independent_answer=q["independent_answer"], final_answer=final)
        if final is None and c.require_boxed:
            raise self._drop(task, "question", "the independent answer has no \\boxed{...} final answer")

    def _valid_question(self, value: dict[str, Any]) -> dict[str, str] | None:
        keys = ("question", "category", "reference_answer", "independent_answer")
        if not all(isinstance(value.get(k), str) for k in keys):
            return None
        if not value["question"].strip() or not value["independent_answer"].strip():
            return None
        if value["category"] not in self.conf.categories:
            return None
        return {k: value[k] for k in keys}

    async def _ask_json(self, task: TaskState, ctx: AgentContext, stage: str, messages: list[dict[str, Any]],
                        schema: dict[str, Any], validate: Any, **params: Any) -> Any:
        """Ask for schema-constrained JSON; re-ask on unusable output, then drop the row.
        (A schema-enforcing server can still cut the JSON short at max_tokens.)"""
        text = ""
        for attempt in range(self.conf.malformed_retries + 1):
            if attempt:
                params["temperature"] = max(0.7, params.get("temperature", 0.0))
            text = await chat(ctx, task, stage, messages, json_schema=schema, **params)
            value = parse_json_object(text)
            checked = validate(value) if value is not None else None
            if checked is not None:
                return checked
        raise self._drop(task, stage, f"the model's JSON is unusable after {self.conf.malformed_retries + 1} "
                                      f"tries: {text[:120]!r}")

    def result_columns(self) -> dict[str, Any]:
        return {
            "dropped_at": pa.string(), "language": pa.string(), "language_prob": pa.float64(),
            "worth_question": pa.bool_(), "scores": pa.map_(pa.string(), pa.int32()),
            "question": pa.string(), "category": pa.string(), "reference_answer": pa.string(),
            "independent_answer": pa.string(), "final_answer": pa.string(),
        }


def summarize(rows: pa.Table | list[dict[str, Any]]) -> dict[str, Any]:
    """NaturalReasoning's funnel over output rows: documents in, dropped per
    stage, questions out, languages seen, and rows by status."""
    if isinstance(rows, pa.Table):
        return _summarize_table(rows)
    by_status: dict[str, int] = {}
    dropped = {stage: 0 for stage in STAGES}
    languages: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        if r["status"] == "filtered" and r.get("dropped_at") in dropped:
            dropped[r["dropped_at"]] += 1
        if r.get("language"):
            languages[r["language"]] = languages.get(r["language"], 0) + 1
    questions = by_status.get("ok", 0)
    return {"rows": len(rows), "by_status": by_status, "dropped_at": dropped, "questions": questions,
            "yield": questions / len(rows) if rows else None,
            "with_boxed_answer": sum(1 for r in rows if r["status"] == "ok" and r.get("final_answer")),
            "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])[:10])}


#: The columns :func:`summarize` reads (``inspect`` and ``report`` read no others for it).
SUMMARY_COLUMNS = ("status", "dropped_at", "language", "final_answer")


def _summarize_table(t: pa.Table) -> dict[str, Any]:
    """:func:`summarize` with Arrow compute over whole columns (a million rows in well under a second)."""
    import pyarrow.compute as pc

    def column(name: str) -> pa.ChunkedArray:
        return t.column(name) if name in t.column_names else pa.chunked_array([pa.nulls(t.num_rows, pa.string())])

    status = t.column("status")
    by_status = {v["values"]: v["counts"] for v in pc.value_counts(status).to_pylist()}
    filtered = t.filter(pc.fill_null(pc.equal(status, "filtered"), False))
    stages = {v["values"]: v["counts"] for v in pc.value_counts(
        filtered.column("dropped_at") if "dropped_at" in t.column_names else pa.array([], pa.string())).to_pylist()}
    dropped = {stage: int(stages.get(stage, 0)) for stage in STAGES}
    language = column("language")
    spoken = language.filter(pc.fill_null(pc.not_equal(language, ""), False))
    languages = {v["values"]: v["counts"] for v in pc.value_counts(spoken).to_pylist()}
    answered = pc.and_(pc.fill_null(pc.equal(status, "ok"), False),
                       pc.fill_null(pc.not_equal(column("final_answer"), ""), False))
    questions = by_status.get("ok", 0)
    return {"rows": t.num_rows, "by_status": by_status, "dropped_at": dropped, "questions": questions,
            "yield": questions / t.num_rows if t.num_rows else None,
            "with_boxed_answer": int(pc.sum(pc.cast(answered, pa.int64())).as_py() or 0),
            "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])[:10])}
