"""One tau2 dialogue as data: the trajectory, whose turn it is, and when it ends.

The rules are tau2-bench a2c02472's half-duplex orchestrator:

- the agent opens with ``"Hi! How can I help you today?"``; the user
  simulator answers; a message with tool calls goes to the environment and its
  answers go back to the caller (agent or user); a text message goes to the
  other party;
- the user ends with ``###STOP###``, ``###TRANSFER###`` or
  ``###OUT-OF-SCOPE###`` in a text message (``user_stop``); the agent with
  ``###STOP###`` (``agent_stop``);
- every step (a user turn, an agent turn, an environment answer) counts; after
  a step that does not go to the environment, ``max_steps`` then
  ``max_errors`` (failed tool calls) are checked, in that order, and each
  overrides the reason set before it (tau2 does the same);
- an empty message ends the dialogue as ``agent_error``/``user_error`` (tau2
  raises there); so do tool-call arguments that are not a JSON object.

One difference is configurable: tau2 runs every tool call of a message;
with ``max_tool_calls_per_turn=1`` (the workflow's default) only the first is
kept and the rest are counted as dropped.

The trajectory uses tau2's message shape (see :mod:`evaluator`), so it can be
scored and exported as it is. Example::

    d = Dialogue.start()
    d.trajectory[0]["content"]      # 'Hi! How can I help you today?'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

GREETING = "Hi! How can I help you today?"
STOP = "###STOP###"
TRANSFER = "###TRANSFER###"
OUT_OF_SCOPE = "###OUT-OF-SCOPE###"
USER_STOP_TOKENS = (STOP, TRANSFER, OUT_OF_SCOPE)

Message = dict[str, Any]


class MalformedTurn(ValueError):
    """An LLM answer that tau2 could not turn into a message (arguments not a JSON object)."""


@dataclass
class Dialogue:
    """The dialogue's state; travels in the task message as plain data (``to_dict``/``from_dict``)."""

    trajectory: list[Message] = field(default_factory=list)
    to_role: str = "user"  # who acts next: 'user' | 'agent' | 'env'
    from_role: str = "agent"  # who sent the last message (the env answers to it)
    steps: int = 0
    errors: int = 0  # tool calls that failed (tau2's num_errors)
    dropped_tool_calls: int = 0  # calls beyond max_tool_calls_per_turn, not run
    termination: str | None = None
    stop_token: str | None = None
    max_steps: int | None = None  # tau2's max_steps (None: no limit)
    max_errors: int | None = None  # tau2's max_errors (None: no limit)

    @classmethod
    def start(cls, max_steps: int | None = None, max_errors: int | None = None) -> Dialogue:
        greeting = {"role": "assistant", "content": GREETING, "tool_calls": None}
        return cls(trajectory=[greeting], max_steps=max_steps, max_errors=max_errors)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dialogue:
        return cls(**data)

    @property
    def done(self) -> bool:
        return self.termination is not None

    @property
    def pending_calls(self) -> list[dict[str, Any]]:
        """The tool calls the environment must answer now."""
        last = self.trajectory[-1]
        return list(last.get("tool_calls") or []) if self.to_role == "env" else []

    # --- turns

    def add_turn(self, who: str, message: Message) -> None:
        """A user or agent message (from :func:`message_from_llm`); routes it and checks the limits."""
        self.trajectory.append(message)
        self.from_role = who
        self.steps += 1
        has_calls = message.get("tool_calls") is not None
        text = message.get("content")
        if not has_calls and not (text and text.strip()):
            self.termination = f"{who}_error"
            return
        if who == "user" and not has_calls and (token := user_stop_token(text)) is not None:
            self.stop_token, self.termination = token, "user_stop"
        elif who == "agent" and text is not None and STOP in text:
            self.stop_token, self.termination = STOP, "agent_stop"
        self.to_role = "env" if has_calls and not self.done else ("agent" if who == "user" else "user")
        self.check_limits()

    def end(self, termination: str) -> None:
        """End the dialogue for a reason outside the turn rules (e.g. the LLM refused the request)."""
        self.termination = termination

    def add_tool_results(self, results: Sequence[Message]) -> None:
        """The environment's answers to :attr:`pending_calls`, in order."""
        self.errors += sum(1 for r in results if r.get("error"))
        self.trajectory.extend(results)
        self.to_role, self.from_role = self.from_role, "env"
        self.steps += 1
        self.check_limits()

    def check_limits(self) -> None:
        if self.to_role == "env":
            return  # tau2 checks only when no tool answer is awaited
        if self.max_steps is not None and self.steps >= self.max_steps:
            self.termination = "max_steps"
        if self.max_errors is not None and self.errors >= self.max_errors:
            self.termination = "too_many_errors"


def user_stop_token(text: str | None) -> str | None:
    for token in USER_STOP_TOKENS:
        if text is not None and token in text:
            return token
    return None


def message_from_llm(who: str, content: str | None, raw_calls: Sequence[Any], call_prefix: str,
                     max_calls: int | None) -> tuple[Message, int]:
    """A tau2 message from an LLM answer; returns it and how many tool calls were dropped.

    ``who`` is 'agent' or 'user'; tool calls carry the caller as requestor.
    """
    requestor = "assistant" if who == "agent" else "user"
    calls = [_tool_call(raw, f"{call_prefix}_{i}", requestor) for i, raw in enumerate(raw_calls)]
    dropped = 0
    if max_calls is not None and len(calls) > max_calls:
        dropped, calls = len(calls) - max_calls, calls[:max_calls]
    role = "assistant" if who == "agent" else "user"
    return {"role": role, "content": content, "tool_calls": calls or None}, dropped


def _tool_call(raw: Any, fallback_id: str, requestor: str) -> dict[str, Any]:
    fn = raw.get("function") if isinstance(raw, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise MalformedTurn(f"tool call without a function name: {str(raw)[:200]}")
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise MalformedTurn(f"arguments of {fn['name']} are not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(arguments, dict):
        raise MalformedTurn(f"arguments of {fn['name']} must be a JSON object, got {type(arguments).__name__}")
    call_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else fallback_id
    return {"id": call_id, "name": fn["name"], "arguments": arguments, "requestor": requestor}


def tool_result(call: Mapping[str, Any], ok: bool, text: str) -> Message:
    return {"role": "tool", "id": call["id"], "content": text, "requestor": call["requestor"], "error": not ok}


# --- what each LLM sees


def _openai_calls(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


def agent_view(system_prompt: str, trajectory: Sequence[Message]) -> list[dict[str, Any]]:
    """The agent's chat: its own turns, the user's text messages, answers to its own calls."""
    return _chat_view(system_prompt, trajectory, me="assistant", other="user")


def user_view(system_prompt: str, trajectory: Sequence[Message]) -> list[dict[str, Any]]:
    """The simulator's chat, roles flipped (tau2's ``flip_roles``): its turns are 'assistant'."""
    return _chat_view(system_prompt, trajectory, me="user", other="assistant")


def _chat_view(system_prompt: str, trajectory: Sequence[Message], me: str, other: str) -> list[dict[str, Any]]:
    """One side's chat: ``me``'s turns as 'assistant' (with its tool calls), ``other``'s text
    messages as 'user', and the tool answers to ``me``'s own calls."""
    view: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}]
    for m in trajectory:
        role = m["role"]
        if role == me:
            entry: dict[str, Any] = {"role": "assistant", "content": m.get("content")}
            if m.get("tool_calls"):
                entry["tool_calls"] = _openai_calls(m["tool_calls"])
            view.append(entry)
        elif role == other and not m.get("tool_calls"):
            view.append({"role": "user", "content": m.get("content")})
        elif role == "tool" and m.get("requestor") == me:
            view.append({"role": "tool", "tool_call_id": m["id"], "content": m["content"]})
    return view
