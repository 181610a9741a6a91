"""One LLM call per input row: plain batch generation.

The smallest LLM workflow (role ``generate``), used by ``make demo`` on vLLM
and by the pipeline benchmarks:

    matrix-hpc run workflow=generate llm=sim dataset.path=prompts.jsonl output.dir=out
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.workflow import AgentContext, Workflow, WorkflowConf, register_workflow
from matrix_hpc.workflows.llm_steps import with_task_seed


@dataclass
class GenerateConf(WorkflowConf):
    name: str = "generate"
    prompt_column: str = "question"  # input column holding the user prompt
    system_prompt: str = ""  # '' = no system message
    max_tokens: int = 64  # completion length cap
    temperature: float = 0.7  # sampling temperature
    n: int = 1  # completions per prompt (all kept in result.completions)


@register_workflow("generate", GenerateConf)
class Generate(Workflow):
    roles = ("generate",)
    uses_llm = True
    conf: GenerateConf

    def validate_input(self, row: dict[str, Any]) -> None:
        if not isinstance(row.get(self.conf.prompt_column), str):
            raise ValueError(f"column {self.conf.prompt_column!r} (workflow.prompt_column) must hold a string")

    async def generate(self, task: TaskState, ctx: AgentContext) -> None:
        messages = [{"role": "system", "content": self.conf.system_prompt}] if self.conf.system_prompt else []
        messages.append({"role": "user", "content": task.input[self.conf.prompt_column]})
        t0 = time.time()
        params: dict[str, Any] = {"max_tokens": self.conf.max_tokens, "temperature": self.conf.temperature,
                                  "n": self.conf.n}
        out = await ctx.llm.chat(messages, sticky_key=task.id, **with_task_seed(task, params))
        task.add_message("generate", out.content or "", t_start=t0, prompt_tokens=out.usage.prompt_tokens,
                         completion_tokens=out.usage.completion_tokens)
        task.result = {"completion": out.content, "completions": [c.content for c in out.choices],
                       "finish_reason": out.choices[0].finish_reason, "replica": out.replica}

    def result_columns(self) -> dict[str, Any]:
        return {"completion": pa.string(), "finish_reason": pa.string(), "replica": pa.string()}
