"""An LLM-free workload with the shape of a collaborative dialogue.

Roles teacher, student, answer_extractor, answer_matcher, as in Coral: each
speaker turn produces ~1 KB of text, the extractor emits a choice letter,
the matcher decides agreement; about 3 matcher checks per task. It measures
the runtime's own overhead (no model in the loop).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.workflow import AgentContext, Workflow, WorkflowConf, register_workflow

# 30,000 words drawn by one seeded generator (this had built a generator per word, all seeded
# alike: 0.3 s of every process's import spent on one word repeated 30,000 times).
_CORPUS = " ".join(random.Random(7).choices(
    ["the", "answer", "is", "because", "energy", "which", "therefore", "option", "we", "consider",
     "force", "mass", "so", "not", "a", "reason", "step", "first", "then", "value"], k=30000))
LETTERS = "ABCDEFGHIJ"


class InjectedFailure(RuntimeError):
    """A step failure injected by ``failure_rate`` (to exercise retries)."""


@dataclass
class OverheadConf(WorkflowConf):
    name: str = "overhead"
    text_bytes: int = 1024  # mean size of one speaker turn
    text_jitter: float = 0.2  # +- fraction of text_bytes
    num_choices: int = 4  # answer letters the extractor picks from
    agree_prob: float = 0.45  # chance a matcher check ends the dialogue once both answered
    max_turns: int = 20  # matcher checks before giving up
    step_delay_ms: float = 0.0  # simulated service latency of each speaker step
    failure_rate: float = 0.0  # chance that a speaker step raises (retried by the runtime)


@register_workflow("overhead", OverheadConf)
class Overhead(Workflow):
    roles = ("teacher", "answer_extractor", "answer_matcher", "student")
    conf: OverheadConf

    async def teacher(self, task: TaskState, ctx: AgentContext) -> None:
        await self._speak("teacher", task, ctx)

    async def student(self, task: TaskState, ctx: AgentContext) -> None:
        await self._speak("student", task, ctx)

    async def _speak(self, agent: str, task: TaskState, ctx: AgentContext) -> None:
        rng = ctx.rng(task)
        if self.conf.step_delay_ms:
            await asyncio.sleep(self.conf.step_delay_ms / 1000)
        rate = self.conf.failure_rate
        if rate and random.Random(f"{task.id}:{task.hops}:{task.attempts}").random() < rate:
            raise InjectedFailure(f"injected failure at step {task.hops}")
        jitter = self.conf.text_jitter
        n = int(self.conf.text_bytes * rng.uniform(1 - jitter, 1 + jitter))
        start = rng.randrange(0, len(_CORPUS) - n)
        task.add_message(agent, _CORPUS[start:start + n], prompt_tokens=n // 4, completion_tokens=n // 4)
        task.data["last_speaker"] = agent

    async def answer_extractor(self, task: TaskState, ctx: AgentContext) -> None:
        letter = LETTERS[ctx.rng(task).randrange(self.conf.num_choices)]
        task.data.setdefault("answers", {})[task.data["last_speaker"]] = letter
        task.add_message("answer_extractor", f"({letter})", role="tool")

    async def answer_matcher(self, task: TaskState, ctx: AgentContext) -> None:
        answers: dict[str, str] = task.data.get("answers", {})
        turns = task.data["turns"] = task.data.get("turns", 0) + 1
        both = len(answers) == 2
        agreed = both and ctx.rng(task).random() < self.conf.agree_prob
        if agreed:
            answers["student"] = answers["teacher"]
        task.result = {"turns": turns, "agreed": agreed,
                       "agreed_answer": answers["teacher"] if agreed else None}
        task.data["done"] = agreed or turns >= self.conf.max_turns

    def next_role(self, task: TaskState, finished_role: str) -> str | None:
        if finished_role in ("teacher", "student"):
            return "answer_extractor"
        if finished_role == "answer_extractor":
            return "answer_matcher"
        if task.data.get("done"):
            return None
        return "student" if task.data["last_speaker"] == "teacher" else "teacher"

    def result_columns(self) -> dict[str, Any]:
        return {"turns": pa.int32(), "agreed": pa.bool_(), "agreed_answer": pa.string()}
