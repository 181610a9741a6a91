"""Request bodies and answers in the two dialects matrix_hpc speaks: vLLM's
(``structured_outputs``, legacy ``guided_*``) and OpenAI's
(``response_format`` JSON schema; a choice wrapped in an enum object), and
the human part of a server's error answer.
"""

from __future__ import annotations

import json
from typing import Any

from matrix_hpc.services.llm.contract import Choice, Usage

_ERROR_TEXT_MAX = 2000


_VLLM_LEGACY_GUIDED = {
    "guided_choice": "choice",
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_grammar": "grammar",
}
_CHOICE_WRAPPER_KEY = "choice"


def build_body(
    model: str,
    messages: list[dict[str, Any]],
    dialect: str,
    choice: list[str] | None = None,
    json_schema: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of a chat completion request for a server of ``dialect``.

    ``choice`` / ``json_schema`` are the portable structured-output forms:
    vLLM (>= 0.12) takes ``structured_outputs={"choice"|"json": ...}`` (its old
    ``guided_*`` fields are silently ignored, so they are translated too);
    OpenAI takes ``response_format`` with a JSON schema, and a choice becomes
    an enum property that :func:`parse_result` unwraps.
    """
    body: dict[str, Any] = {"model": model, "messages": messages}
    extra = dict(params or {})
    extra_body = extra.pop("extra_body", None) or {}
    body.update(extra)
    if dialect == "vllm":
        _add_vllm_structured(body, choice, json_schema)
    else:
        _add_openai_structured(body, choice, json_schema)
    body.update(extra_body)
    return body


def _add_vllm_structured(body: dict[str, Any], choice: list[str] | None, json_schema: dict[str, Any] | None) -> None:
    structured = dict(body.pop("structured_outputs", None) or {})
    for legacy, key in _VLLM_LEGACY_GUIDED.items():
        if legacy in body:
            structured[key] = body.pop(legacy)
    if choice is not None:
        structured["choice"] = list(choice)
    if json_schema is not None:
        structured["json"] = json_schema
    if structured:
        body["structured_outputs"] = structured


def _add_openai_structured(body: dict[str, Any], choice: list[str] | None, json_schema: dict[str, Any] | None) -> None:
    if choice is not None and json_schema is not None:
        raise ValueError("pass either choice= or json_schema=, not both")
    if choice is not None:
        schema = {
            "type": "object",
            "properties": {_CHOICE_WRAPPER_KEY: {"type": "string", "enum": list(choice)}},
            "required": [_CHOICE_WRAPPER_KEY],
            "additionalProperties": False,
        }
        body["response_format"] = _response_format("choice", schema, strict=True)
    elif json_schema is not None:
        body["response_format"] = _response_format("output", json_schema, strict=False)


def _response_format(name: str, schema: dict[str, Any], strict: bool) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def parse_result(data: dict[str, Any], unwrap_choice: bool) -> tuple[list[Choice], Usage]:
    """Choices and usage from a chat completion answer (vLLM, OpenAI, sim)."""
    choices = []
    for item in data.get("choices") or []:
        message = item.get("message") or {}
        content = message.get("content")
        if unwrap_choice and isinstance(content, str):
            content = _unwrap_choice(content)
        choices.append(
            Choice(
                content=content,
                # vLLM renamed reasoning_content to reasoning; accept both.
                reasoning_content=message.get("reasoning") or message.get("reasoning_content"),
                tool_calls=list(message.get("tool_calls") or []),
                finish_reason=item.get("finish_reason"),
            )
        )
    usage = data.get("usage") or {}
    return choices, Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def _unwrap_choice(content: str) -> str:
    try:
        value = json.loads(content)
    except ValueError:
        return content
    if isinstance(value, dict) and isinstance(value.get(_CHOICE_WRAPPER_KEY), str):
        return str(value[_CHOICE_WRAPPER_KEY])
    return content


def decode_text(payload: bytes) -> str:
    return payload.decode("utf-8", errors="replace")


def server_message(text: str) -> str:
    """The human part of an error answer (OpenAI and vLLM shapes), else the raw text, shortened."""
    try:
        data = json.loads(text)
    except ValueError:
        return text[:_ERROR_TEXT_MAX]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:_ERROR_TEXT_MAX]
        if isinstance(error, str):
            return error[:_ERROR_TEXT_MAX]
        if data.get("message"):
            return str(data["message"])[:_ERROR_TEXT_MAX]
    return text[:_ERROR_TEXT_MAX]
