"""The LLM service's contract with its callers: what a chat call returns
(:class:`ChatResult`, :class:`Choice`, :class:`Usage`), how it fails
(:class:`LLMRequestError`: the request itself is wrong, asking again cannot
succeed; :class:`LLMUnavailableError`: no replica answered), the retry
classification of an HTTP status, and :class:`Secret`, the API key holder
that never prints itself. No I/O here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


# -- results ---------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Choice:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class ChatResult:
    choices: list[Choice]
    usage: Usage
    replica: str  # base URL of the replica that answered
    latency_s: float  # first attempt's start to the answer, retries included
    attempts: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the server's JSON answer

    @property
    def content(self) -> str | None:
        return self.choices[0].content if self.choices else None


# -- errors ----------------------------------------------------------------


class LLMError(Exception):
    """Base of the errors an agent step can get from the LLM client."""


class LLMRequestError(LLMError):
    """The server refused the request for good (a 4xx other than 408/409/425/429)."""

    retryable = False  # the runtime fails the row at once instead of retrying the step

    def __init__(self, status: int, message: str, replica: str):
        self.status = status
        self.server_message = message
        self.replica = replica
        super().__init__(f"LLM request rejected by {replica} with HTTP {status}: {message}")


class LLMUnavailableError(LLMError):
    """Every attempt failed with a retryable error, or no replica ever registered."""


class RetryableError(Exception):
    """One attempt failed in a way worth retrying; ``replica_down`` when the replica is unreachable."""

    def __init__(self, reason: str, replica_down: bool = False):
        super().__init__(reason)
        self.replica_down = replica_down


class Secret:
    """A string that never shows itself in repr/str (API keys)."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value or None

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret(None)"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return self._value is not None


def classify_status(status: int) -> str:
    """'ok', 'retry' or 'fatal' for an HTTP status."""
    if status < 400:
        return "ok"
    if status in RETRYABLE_STATUS or status >= 500:
        return "retry"
    return "fatal"


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
    return rng.uniform(0.0, min(max_s, base_s * 2 ** (attempt - 1)))
