"""``workflow=coral``: two LLM agents discuss a multiple-choice question until they agree.

The student opens by asking the question with its lettered options (a fixed
template, no LLM). Then, turn by turn: the teacher speaks -> the extractor
(an LLM restricted by structured output to "(X)" or "not sure yet") reads
that message -> the matcher (no LLM) records each agent's latest valid
answer -> the student speaks -> extract -> match, and so on. The dialogue
stops when both latest answers are equal, after ``max_turns`` matcher
checks, or on an error (the row then fails with it).

Input: MMLU-Pro-shaped rows (question, options list, answer letter); the
column names are configurable. Output columns: ``agreed``,
``agreed_answer``, ``correct``, ``turns``, ``answers`` (every extraction:
turn, agent, answer), ``teacher_answer``, ``student_answer``, ``stop_reason``.
:func:`summarize` turns a table of rows into the run's metrics.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import OK, TaskState
from matrix_hpc.runtime.workflow import AgentContext, Workflow, WorkflowConf, register_workflow
from matrix_hpc.workflows.llm_steps import RoleLLMConf, chat

LETTERS = string.ascii_uppercase
NOT_SURE = "not sure yet"
SPEAKERS = ("teacher", "student")

TEACHER_PROMPT = (
    "You are a teacher discussing a multiple-choice question with a student. Reason step by step, "
    "answer the student's points, correct mistakes, and be open to being convinced. "
    "End every message with the answer you currently hold, written as (X) where X is the option letter."
)
STUDENT_PROMPT = (
    "You are a student working through a multiple-choice question with a teacher. Think aloud, "
    "say what you agree or disagree with and why, and do not simply defer. "
    "End every message with the answer you currently hold, written as (X) where X is the option letter.\n\n"
    "The question you asked the teacher:\n{question}"
)
EXTRACTOR_PROMPT = (
    "You read one message from a discussion of a multiple-choice question and report the option the "
    "author commits to. Reply with the option as (X), or with 'not sure yet' when the message does not "
    "commit to one option."
)


@dataclass
class CoralConf(WorkflowConf):
    name: str = "coral"
    max_turns: int = 20  # matcher checks before the dialogue stops without agreement
    question_column: str = "question"  # input column with the question text
    options_column: str = "options"  # input column with the list of option texts
    answer_column: str = "answer"  # input column with the key's letter (or its 0-based index)
    speaker_temperature: float = 0.7  # sampling temperature of teacher and student turns
    speaker_max_tokens: int = 512  # length cap of one teacher/student turn, in tokens
    extractor_max_tokens: int = 16  # room for "not sure yet" even when constrained decoding splits it into many tokens
    teacher_prompt: str = TEACHER_PROMPT  # system prompt of the teacher
    student_prompt: str = STUDENT_PROMPT  # system prompt of the student ({question} = the opening message)
    extractor_prompt: str = EXTRACTOR_PROMPT  # system prompt of the extractor
    teacher_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # teacher's model/endpoint override
    student_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # student's model/endpoint override
    extractor_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # extractor's model/endpoint override

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"workflow.max_turns must be >= 1, got {self.max_turns}")


def question_message(question: str, options: list[str]) -> str:
    """The student's opening message: the question and its lettered options."""
    lines = [str(question).strip(), ""]
    lines += [f"({LETTERS[i]}) {str(opt).strip()}" for i, opt in enumerate(options)]
    lines += ["", "What is the answer? Let's work it out together."]
    return "\n".join(lines)


def parse_choice(text: str, letters: str) -> str | None:
    """The letter of "(X)" in an extractor answer; None for "not sure yet" or garbage.
    (With structured output the answer is exactly one choice; the regex covers
    endpoints that ignore it.)"""
    text = text.strip()
    if len(text) == 3 and text[0] == "(" and text[2] == ")" and text[1] in letters:
        return text[1]
    found = re.findall(r"\(([A-Z])\)", text)
    return found[-1] if found and found[-1] in letters else None


@register_workflow("coral", CoralConf)
class Coral(Workflow):
    roles = ("student", "teacher", "extractor", "matcher")
    uses_llm = True
    conf: CoralConf

    # -- input -----------------------------------------------------------------

    def validate_input(self, row: dict[str, Any]) -> None:
        self._question(row)

    def _question(self, row: dict[str, Any]) -> tuple[str, list[str], str]:
        c = self.conf
        for col in (c.question_column, c.options_column, c.answer_column):
            if row.get(col) is None:
                raise ValueError(f"input column {col!r} is missing or null (columns: {sorted(row)}); set "
                                 "workflow.question_column / options_column / answer_column to your names")
        options = row[c.options_column]
        if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
            raise ValueError(f"column {c.options_column!r} must be a list of 2 to {len(LETTERS)} options, "
                             f"got {type(options).__name__} {str(options)[:80]}")
        answer = row[c.answer_column]
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = LETTERS[answer] if 0 <= answer < len(options) else str(answer)
        answer = str(answer).strip().strip("()").upper()
        if answer not in LETTERS[:len(options)]:
            raise ValueError(f"column {c.answer_column!r} = {row[c.answer_column]!r} is not one of the "
                             f"{len(options)} option letters {LETTERS[:len(options)]}")
        return str(row[c.question_column]), [str(o) for o in options], answer

    # -- roles -------------------------------------------------------------------

    async def student(self, task: TaskState, ctx: AgentContext) -> None:
        if not task.history:  # the opening: the student asks the question
            question, options, key = self._question(task.input)
            task.add_message("student", question_message(question, options), role="user")
            task.data.update(letters=LETTERS[:len(options)], key=key, turns=0, answers=[],
                             latest={}, last_speaker="student", opened=True)
            return
        task.data["opened"] = False
        await self._speak("student", task, ctx)

    async def teacher(self, task: TaskState, ctx: AgentContext) -> None:
        await self._speak("teacher", task, ctx)

    async def _speak(self, agent: str, task: TaskState, ctx: AgentContext) -> None:
        c = self.conf
        await chat(ctx, task, agent, self._view(agent, task), role=getattr(c, f"{agent}_llm"),
                   temperature=c.speaker_temperature, max_tokens=c.speaker_max_tokens)
        task.data["last_speaker"] = agent

    def _view(self, agent: str, task: TaskState) -> list[dict[str, str]]:
        """The dialogue as ``agent`` sees it: its own turns as assistant, the
        other's as user. The student's opening goes into its system prompt so
        both views alternate user/assistant after the system message."""
        dialogue = [m for m in task.history if m["agent"] in SPEAKERS]
        if agent == "teacher":
            messages = [{"role": "system", "content": self.conf.teacher_prompt}]
        else:
            system = self.conf.student_prompt.replace("{question}", dialogue[0]["content"])
            messages = [{"role": "system", "content": system}]
            dialogue = dialogue[1:]
        messages += [{"role": "assistant" if m["agent"] == agent else "user", "content": m["content"]}
                     for m in dialogue]
        return messages

    async def extractor(self, task: TaskState, ctx: AgentContext) -> None:
        c, speaker = self.conf, task.data["last_speaker"]
        letters: str = task.data["letters"]
        latest = next(m for m in reversed(task.history) if m["agent"] == speaker)
        options = "\n".join(line for line in task.history[0]["content"].splitlines() if line.startswith("("))
        messages = [
            {"role": "system", "content": c.extractor_prompt},
            {"role": "user", "content": f"Options:\n{options}\n\nMessage by the {speaker}:\n{latest['content']}\n\n"
                                        "Which option does this message commit to?"},
        ]
        text = await chat(ctx, task, "extractor", messages, role=c.extractor_llm,
                          choice=[f"({x})" for x in letters] + [NOT_SURE],
                          temperature=0.0, max_tokens=c.extractor_max_tokens)
        task.data["extracted"] = parse_choice(text, letters)

    async def matcher(self, task: TaskState, ctx: AgentContext) -> None:
        d = task.data
        speaker, answer = d["last_speaker"], d.pop("extracted")
        d["turns"] += 1
        # New containers, not in-place edits: a retried step restores task.data from a shallow copy.
        d["answers"] = [*d["answers"], {"turn": d["turns"], "agent": speaker, "answer": answer}]
        if answer is not None:
            d["latest"] = {**d["latest"], speaker: answer}
        teacher, student = d["latest"].get("teacher"), d["latest"].get("student")
        agreed = teacher is not None and teacher == student
        d["done"] = agreed or d["turns"] >= self.conf.max_turns
        task.result = {
            "answer_key": d["key"], "agreed": agreed, "agreed_answer": teacher if agreed else None,
            "correct": agreed and teacher == d["key"], "turns": d["turns"], "answers": d["answers"],
            "teacher_answer": teacher, "student_answer": student,
            "stop_reason": "agreed" if agreed else "max_turns" if d["done"] else None,
        }

    def next_role(self, task: TaskState, finished_role: str) -> str | None:
        if finished_role == "student" and task.data.get("opened"):
            return "teacher"
        if finished_role in SPEAKERS:
            return "extractor"
        if finished_role == "extractor":
            return "matcher"
        if task.data.get("done"):
            return None
        return "student" if task.data["last_speaker"] == "teacher" else "teacher"

    def result_columns(self) -> dict[str, Any]:
        return {
            "answer_key": pa.string(), "agreed": pa.bool_(), "agreed_answer": pa.string(),
            "correct": pa.bool_(), "turns": pa.int32(),
            "answers": pa.list_(pa.struct([("turn", pa.int32()), ("agent", pa.string()), ("answer", pa.string())])),
            "teacher_answer": pa.string(), "student_answer": pa.string(), "stop_reason": pa.string(),
        }


def summarize(rows: pa.Table | list[dict[str, Any]]) -> dict[str, Any]:
    """Coral's metrics over output rows: agreement rate (agreed / ok rows),
    agreement correctness (correct / agreed), accuracy (correct / ok rows),
    mean matcher checks per dialogue, and rows by status."""
    if isinstance(rows, pa.Table):
        return _summarize_table(rows)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    done = [r for r in rows if r["status"] == OK]
    agreed = sum(1 for r in done if r.get("agreed"))
    correct = sum(1 for r in done if r.get("correct"))
    turns = [r["turns"] for r in done if r.get("turns") is not None]
    return {
        "rows": len(rows), "by_status": by_status, "dialogues": len(done),
        "agreement_rate": agreed / len(done) if done else None,
        "agreement_correctness": correct / agreed if agreed else None,
        "accuracy": correct / len(done) if done else None,
        "mean_turns": sum(turns) / len(turns) if turns else None,
    }


#: The columns :func:`summarize` reads (``inspect`` and ``report`` read no others for it).
SUMMARY_COLUMNS = ("status", "agreed", "correct", "turns")


def _summarize_table(t: pa.Table) -> dict[str, Any]:
    """:func:`summarize` with Arrow compute over whole columns (a million rows in well under a second)."""
    import pyarrow.compute as pc

    by_status = {v["values"]: v["counts"] for v in pc.value_counts(t.column("status")).to_pylist()}
    done = t.filter(pc.fill_null(pc.equal(t.column("status"), OK), False))

    def true_count(name: str) -> int:
        if name not in done.column_names:
            return 0
        return int(pc.sum(pc.cast(pc.fill_null(done.column(name), False), pa.int64())).as_py() or 0)

    agreed, correct, n = true_count("agreed"), true_count("correct"), done.num_rows
    turns = done.column("turns").drop_null() if "turns" in done.column_names else pa.array([], pa.int64())
    return {
        "rows": t.num_rows, "by_status": by_status, "dialogues": n,
        "agreement_rate": agreed / n if n else None,
        "agreement_correctness": correct / agreed if agreed else None,
        "accuracy": correct / n if n else None,
        "mean_turns": int(pc.sum(turns).as_py()) / len(turns) if len(turns) else None,
    }
