"""Helpers the built-in LLM workflows share: one chat call that records its
message, per-role model/endpoint overrides, and tolerant parsing of model
output (a random or misbehaving model must end a row, never stall it)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.workflow import AgentContext, NonRetryableError


@dataclass
class RoleLLMConf:
    """Where one role's LLM calls go (defaults: the run's `llm` service)."""

    model: str | None = None  # model name sent in the request; null: the service's model
    base_url: str | None = None  # another OpenAI-compatible endpoint (…/v1); null: the run's service
    api_key_env: str | None = None  # env var holding that endpoint's API key; null: send none
    service: str | None = None  # a service deployed with `matrix-hpc serve up` (llm.name); null: the run's llm


def role_service_key(service: str) -> str:
    """The ``ctx.services`` entry of the client of deployed service ``service``."""
    return f"llm@service:{service}"


def role_services(workflow_conf: Any) -> list[str]:
    """The deployed services the workflow's roles name (``workflow.<role>_llm.service``): the run attaches
    to each before it admits a task."""
    import dataclasses

    if not dataclasses.is_dataclass(workflow_conf):
        return []
    names = {getattr(workflow_conf, f.name).service for f in dataclasses.fields(workflow_conf)
             if isinstance(getattr(workflow_conf, f.name), RoleLLMConf)}
    return sorted(n for n in names if n)


class LLMRejected(NonRetryableError):
    """The LLM server refused the request for good (e.g. the context is too long)."""


def role_client(ctx: AgentContext, role: RoleLLMConf | None) -> Any:
    """The client for a role: the run's ``ctx.llm``, or a per-process client of
    the role's own endpoint, kept in ``ctx.services`` so the worker closes it."""
    if role is not None and role.service:
        if role.base_url:
            raise NonRetryableError(f"a role's llm sets both service={role.service!r} and base_url; set one")
        client = ctx.services.get(role_service_key(role.service))
        if client is None:  # the composition root attaches every named service before the first task
            raise RuntimeError(f"deployed LLM service {role.service!r} was not attached to this run")
        return client
    if role is None or not role.base_url:
        return ctx.llm
    key = f"llm@{role.base_url}"
    client = ctx.services.get(key)
    if client is None:
        import os

        from matrix_hpc.services.llm.client import LLMClient
        from matrix_hpc.services.llm.config import ClientConf
        from matrix_hpc.services.llm.endpoints import StaticEndpoints

        api_key = os.environ.get(role.api_key_env) if role.api_key_env else None
        client = ctx.services[key] = LLMClient(StaticEndpoints([role.base_url]), ClientConf(),
                                               model=role.model, api_key=api_key)
    return client


def with_task_seed(task: TaskState, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the task's sample seed as the request's ``seed``: the
    samples of one input row (``run.samples_per_input``) then draw
    differently, and each draws the same on a rerun. With one sample per row
    the task has no seed and ``params`` go as they are."""
    return params if task.seed is None else {**params, "seed": task.seed}


async def chat(
    ctx: AgentContext,
    task: TaskState,
    agent: str,
    messages: list[dict[str, Any]],
    *,
    role: RoleLLMConf | None = None,
    record: bool = True,
    **params: Any,
) -> str:
    """One chat completion for ``task``; its answer (and token usage) goes into
    the task's history as ``agent``'s message when ``record``. Returns the text
    ('' when the model returned none)."""
    from matrix_hpc.services.llm.contract import LLMRequestError

    if role is not None and role.model and not role.base_url:
        params["model"] = role.model  # overrides the service's model in the request body
    t_start = time.time()
    try:
        result = await role_client(ctx, role).chat(messages, sticky_key=task.id, **with_task_seed(task, params))
    except LLMRequestError as e:  # asking again cannot succeed: fail the row now
        raise LLMRejected(f"{agent}: {e}") from e
    text = result.content or ""
    if record:
        task.add_message(agent, text, t_start=t_start, prompt_tokens=result.usage.prompt_tokens,
                         completion_tokens=result.usage.completion_tokens)
    return text


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in ``text`` (also inside a ```json fence), else None."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            value = json.loads(text[start:end + 1])
        except ValueError:
            return None
    return value if isinstance(value, dict) else None
