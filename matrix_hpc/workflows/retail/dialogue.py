"""The retail dialogue's pure parts: prompts, the two views of one conversation,
tool-call parsing and stop tokens. No I/O, so every rule is unit-testable.

The conversation is kept once, in the agent's view (OpenAI chat messages:
``user``, ``assistant`` with optional ``tool_calls``, ``tool``). The user
simulator sees the same dialogue with the roles swapped and without the
tool traffic, as in tau2-bench.

Example::

    msgs = [{"role": "assistant", "content": GREETING}]
    user_view(msgs, "Reason for call: ...")[0]["role"]     # 'system'
    parse_tool_call({"id": "c1", "function": {"name": "calculate", "arguments": '{"expression": "1+1"}'}}, set(...))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

GREETING = "Hi! How can I help you today?"  # tau2's fixed first agent message
STOP = "###STOP###"  # the user is done
TRANSFER = "###TRANSFER###"  # the user was transferred to a human
OUT_OF_SCOPE = "###OUT-OF-SCOPE###"  # the scenario has no answer to what the agent asked
USER_STOP_TOKENS = (STOP, TRANSFER, OUT_OF_SCOPE)

AGENT_INSTRUCTIONS = """<instructions>
You are a customer service agent. Help the user as the <policy> below says.
In each turn do exactly one of: send a message to the user, or make one tool call.
Follow the policy at all times; tool arguments must be valid JSON.
</instructions>
<policy>
{policy}
</policy>"""

USER_INSTRUCTIONS = """You play a customer contacting a retail company's customer service, following the scenario below.
Rules:
- Write only what the customer says, one short message per turn, in plain language.
- Reveal information only when it is asked for or needed; never invent information the scenario does not give.
- Follow the scenario's task instructions; do not give in on what they say you want.
- When your goal is reached (or cannot be reached), answer with exactly {stop} and nothing else.
- If you are transferred to a human agent, answer with exactly {transfer}.
- If the agent asks something the scenario gives no way to answer, answer with exactly {out_of_scope}.

<scenario>
{scenario}
</scenario>"""


def agent_system_prompt(policy: str) -> str:
    return AGENT_INSTRUCTIONS.format(policy=policy)


def user_system_prompt(scenario: str) -> str:
    return USER_INSTRUCTIONS.format(stop=STOP, transfer=TRANSFER, out_of_scope=OUT_OF_SCOPE, scenario=scenario)


def agent_view(system_prompt: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system_prompt}, *messages]


def user_view(messages: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    """The simulator's messages: agent text becomes ``user``, its own turns ``assistant``; tool traffic hidden."""
    view: list[dict[str, Any]] = [{"role": "system", "content": user_system_prompt(scenario)}]
    for m in messages:
        if m["role"] == "assistant" and not m.get("tool_calls") and m.get("content"):
            view.append({"role": "user", "content": m["content"]})
        elif m["role"] == "user":
            view.append({"role": "assistant", "content": m["content"]})
    return view


def user_stop_token(text: str) -> str | None:
    """The stop token the user's message carries, if any."""
    for token in USER_STOP_TOKENS:
        if token in text:
            return token
    return None


@dataclass(frozen=True)
class ToolCall:
    id: str  # the call id the tool message answers
    name: str  # tool name
    arguments: str  # JSON object text (normalised)


class MalformedToolCall(ValueError):
    """A tool call that cannot be sent to the environment (no name, arguments not a JSON object)."""


def parse_tool_call(raw: Any, fallback_id: str) -> ToolCall:
    """Read one OpenAI tool call, whatever a weak model made of it.

    Unknown tool names are *not* refused here: the environment answers them
    with an error, as it would any other bad call.
    """
    if isinstance(raw, str):  # the caller's description of an unreadable call
        raise MalformedToolCall(raw)
    if not isinstance(raw, dict):
        raise MalformedToolCall(f"tool call must be an object, got {type(raw).__name__}")
    fn: dict[str, Any] = raw["function"] if isinstance(raw.get("function"), dict) else raw
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise MalformedToolCall("tool call has no function name")
    arguments = fn.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise MalformedToolCall(f"arguments of {name} are not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(arguments, dict):
        raise MalformedToolCall(f"arguments of {name} must be a JSON object, got {type(arguments).__name__}")
    call_id = raw.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = fallback_id
    return ToolCall(call_id, name.strip(), json.dumps(arguments, sort_keys=True))


TEXT_CALL_OPEN, TEXT_CALL_CLOSE = "<tool_call>", "</tool_call>"  # Hermes-style calls written as text


def text_tool_call(text: str) -> tuple[str, Any] | None:
    """A tool call the model wrote as text that the server did not parse (no tool
    parser, or the call was cut off): ``(text before it, raw call)``, the raw call
    being ``None`` when it cannot be read. ``None`` when the text has no call."""
    start = text.find(TEXT_CALL_OPEN)
    if start < 0:
        return None
    body = text[start + len(TEXT_CALL_OPEN):]
    end = body.find(TEXT_CALL_CLOSE)
    try:
        raw = json.loads(body[:end] if end >= 0 else body)
    except json.JSONDecodeError:
        raw = None
    return text[:start].strip(), raw


def assistant_tool_message(content: str | None, call: ToolCall) -> dict[str, Any]:
    """The agent's turn as recorded: its text (if any) and exactly one tool call."""
    return {"role": "assistant", "content": content or None,
            "tool_calls": [{"id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments}}]}


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def agent_texts(messages: list[dict[str, Any]]) -> list[str]:
    """What the agent said to the user (the communicate-info check reads these)."""
    return [m["content"] for m in messages
            if m["role"] == "assistant" and not m.get("tool_calls") and m.get("content")]
