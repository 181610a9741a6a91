"""The simulated OpenAI-compatible endpoint itself: request validation,
authentication, the latency model (``capacity`` slots, then ``ttft_s +
output_tokens * time_per_output_token_s``), answers (plain, structured,
tool calls) and injected faults. Running it (thread, process, CLI) lives in
``sim_server.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import random
import time
import uuid
from collections import Counter
from typing import Any

from aiohttp import web

from matrix_hpc.services.llm.config import SimConf
from matrix_hpc.services.llm.contract import Secret
from matrix_hpc.services.llm.sim_schema import filler_words, sample_json

log = logging.getLogger(__name__)

#: The key of a standalone server (and of the child of SimServerProcess) comes from here.
API_KEY_ENV = "MATRIX_SIM_API_KEY"
#: Paths answered without the key: liveness only, an empty body.
OPEN_PATHS = frozenset({"/health"})


class SimStats:
    """Counters served at ``GET /sim/stats`` (per server process)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.queued = 0
        self.max_in_flight = 0

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts, "in_flight": self.in_flight, "queued": self.queued, "max_in_flight": self.max_in_flight}


class SimEndpoint:
    """The request handlers and latency model of one simulated replica."""

    def __init__(self, conf: SimConf, capacity: int | None = None, api_key: Secret | None = None):
        self.conf = conf
        key = api_key.get() if api_key else None
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None  # None: no key asked (tests only)
        self.stats = SimStats()
        self._slots = asyncio.Semaphore(capacity or conf.capacity)
        self._fault_rng = random.Random(conf.seed)
        self._id_prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        card = {"id": conf.model, "object": "model", "owned_by": "matrix_hpc-sim"}
        self._model_card = {"object": "list", "data": [card]}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2, middlewares=[self._require_key])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/sim/stats", self.stats_handler)
        return app

    @web.middleware
    async def _require_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._key_digest is None or request.path in OPEN_PATHS or self._authorized(request):
            response: web.StreamResponse = await handler(request)
            return response
        self.stats.counts["unauthorized"] += 1
        refusal = _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "AuthenticationError")
        refusal.headers["WWW-Authenticate"] = "Bearer"
        return refusal

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(given.encode()).digest()
        expected = self._key_digest
        return scheme.lower() == "bearer" and expected is not None and hmac.compare_digest(digest, expected)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(self._model_card)

    async def stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_dict())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.stats.counts["requests"] += 1
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "request body is not JSON", "BadRequestError")
        problem = _validate(body)
        if problem:
            self.stats.counts["bad_request"] += 1
            return _error(400, problem, "BadRequestError")
        fault = self._draw_fault()
        if fault:
            return await self._inject(fault, request, body)
        rng = random.Random(hashlib.blake2b(raw, digest_size=8, key=str(self.conf.seed).encode()).digest())
        prompt_tokens = _count_prompt_tokens(body["messages"])
        choices, completion_tokens = _answer(body, rng, self.conf)
        if self.conf.max_model_len and prompt_tokens + completion_tokens > self.conf.max_model_len:
            self.stats.counts["context_too_long"] += 1
            return _context_error(self.conf.max_model_len, prompt_tokens, completion_tokens)
        await self._occupy_slot(completion_tokens)
        self.stats.counts["ok"] += 1
        self.stats.counts["completion_tokens"] += completion_tokens
        return web.json_response(
            {
                "id": f"chatcmpl-{self._id_prefix}{next(self._ids):x}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or self.conf.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    async def _occupy_slot(self, completion_tokens: int) -> None:
        self.stats.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.stats.queued -= 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            await asyncio.sleep(self.conf.ttft_s + completion_tokens * self.conf.time_per_output_token_s)
        finally:
            self.stats.in_flight -= 1
            self._slots.release()

    def _draw_fault(self) -> str | None:
        conf = self.conf
        if not (conf.error_rate or conf.bad_request_rate or conf.hang_rate or conf.reset_rate):
            return None
        x = self._fault_rng.random()
        for name, rate in (
            ("error", conf.error_rate),
            ("bad_request", conf.bad_request_rate),
            ("hang", conf.hang_rate),
            ("reset", conf.reset_rate),
        ):
            if x < rate:
                return name
            x -= rate
        return None

    async def _inject(self, fault: str, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        self.stats.counts[f"fault_{fault}"] += 1
        if fault == "error":
            if self._fault_rng.random() < 0.5:
                return _error(500, "simulated internal server error", "InternalServerError")
            return _error(429, "simulated overload: too many requests", "RateLimitError")
        if fault == "bad_request":
            prompt = _count_prompt_tokens(body["messages"])
            return _context_error(max(prompt // 2, 1), prompt, int(body.get("max_tokens") or 16))
        if fault == "hang":
            await asyncio.Event().wait()  # cancelled when the client gives up
        assert request.transport is not None
        request.transport.abort()  # "reset": drop the connection without an answer
        raise asyncio.CancelledError


def _validate(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    if body.get("stream"):
        return "streaming is not supported by the simulator; send stream=false"
    n = body.get("n", 1)
    if not isinstance(n, int) or n < 1:
        return f"'n' must be a positive integer, got {n!r}"
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name") for t in tools
    ):
        return "'tools' must be a list of {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}"
    return None


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _context_error(limit: int, prompt_tokens: int, completion_tokens: int) -> web.Response:
    message = (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, "
        f"{completion_tokens} in the completion). Please reduce the length of the messages or completion."
    )
    return _error(400, message, "BadRequestError")


def _count_prompt_tokens(messages: list[Any]) -> int:
    # ~4 characters per token plus a few tokens of chat-template framing per message.
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else message
        chars += len(content) if isinstance(content, str) else len(json.dumps(content))
    return chars // 4 + 4 * len(messages)


def _answer(body: dict[str, Any], rng: random.Random, conf: SimConf) -> tuple[list[dict[str, Any]], int]:
    """The response choices and their total output tokens."""
    choices = []
    total = 0
    for index in range(int(body.get("n", 1))):
        message, finish, tokens = _one_message(body, rng, conf)
        choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": None})
        total += tokens
    return choices, total


def _one_message(body: dict[str, Any], rng: random.Random, conf: SimConf) -> tuple[dict[str, Any], str, int]:
    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 1 << 30)
    tool_call = _maybe_tool_call(body, rng, conf)
    if tool_call is not None:
        tokens = max(1, len(tool_call["function"]["arguments"]) // 4)
        return {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls", tokens
    structured = _structured_text(body, rng)
    if structured is not None:
        return {"role": "assistant", "content": structured}, "stop", max(1, len(structured) // 4)
    length = conf.output_tokens + rng.randint(-conf.output_tokens_jitter, conf.output_tokens_jitter)
    length = max(1, length)
    finish = "length" if length > max_tokens else "stop"
    length = min(length, max_tokens)
    return {"role": "assistant", "content": filler_words(rng, length)}, finish, length


def _structured_text(body: dict[str, Any], rng: random.Random) -> str | None:
    structured = body.get("structured_outputs") or {}
    if structured.get("choice"):
        return str(rng.choice(structured["choice"]))
    schema = structured.get("json")
    if schema is None:
        schema = _response_format_schema(body.get("response_format"))
    if schema is None:
        return None
    if isinstance(schema, str):
        schema = json.loads(schema)
    return json.dumps(sample_json(schema, rng))


def _response_format_schema(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema", {"type": "object"})
    if response_format.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    return None


def _maybe_tool_call(body: dict[str, Any], rng: random.Random, conf: SimConf) -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or [] if t.get("type", "function") == "function"]
    tool_choice = body.get("tool_choice", "auto")
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == wanted] or tools
    elif tool_choice != "required" and rng.random() >= conf.tool_call_rate:
        return None
    function = rng.choice(tools)["function"]
    arguments = sample_json(function.get("parameters") or {"type": "object", "properties": {}}, rng)
    return {
        "id": "call_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12)),
        "type": "function",
        "function": {"name": function["name"], "arguments": json.dumps(arguments)},
    }
