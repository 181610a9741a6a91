"""A simulated OpenAI-compatible LLM endpoint for dry runs, capacity planning and scale tests.

Serves ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and
``GET /sim/stats``. Latency model: a request waits for one of ``capacity``
slots (further requests queue, like sequences beyond a vLLM batch), then
takes ``ttft_s + output_tokens * time_per_output_token_s``. Structured
outputs are honoured so workflows progress: ``structured_outputs.choice``
returns an allowed value, ``structured_outputs.json`` / ``response_format``
return schema-valid JSON, and offered ``tools`` may be answered with a tool
call whose arguments fit the tool's parameter schema. Faults (500/429, 400
context-length, hangs, connection resets) are injected at configured rates,
drawn from a generator seeded with ``seed``; answer content is a function
of the seed and the request body.

Every path but ``/health`` (which answers an empty 200 and nothing else)
needs ``Authorization: Bearer <key>``; without it the answer is 401. Run
standalone with the key in the environment, never on the command line::

    MATRIX_SIM_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \
        python -m matrix_hpc.services.llm.sim_server --port 8000 --capacity 512 --ttft-s 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from matrix_hpc.services.llm.client import Secret
from matrix_hpc.services.llm.config import SimConf

log = logging.getLogger(__name__)

#: The key of a standalone server (and of the child of SimServerProcess) comes from here.
API_KEY_ENV = "MATRIX_SIM_API_KEY"
#: Paths answered without the key: liveness only, an empty body.
OPEN_PATHS = frozenset({"/health"})

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their can been has more if will would so no what up out about who into "
    "model answer reason step think because therefore result value data system task agent tool check"
).split()
# Free text is a slice of this fixed pseudo-random word stream: one slice per answer
# instead of one random draw per word (that was the server's largest cost).
_STREAM = random.Random(0).choices(_WORDS, k=1 << 14)
_MAX_DEPTH = 6


def _words(rng: random.Random, count: int) -> str:
    start = rng.randrange(len(_STREAM))
    words = _STREAM[start : start + count]
    while len(words) < count:
        words += _STREAM[: count - len(words)]
    return " ".join(words)



# -- schema-valid JSON ---------------------------------------------------------


def sample_json(schema: Any, rng: random.Random, root: Any = None, depth: int = 0) -> Any:
    """A value valid for the common JSON-schema shapes (object, array, string, integer, number,
    boolean, null, enum, const, anyOf/oneOf/allOf, local ``$ref``)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None if depth > _MAX_DEPTH else _sample_string({}, rng)
    if "$ref" in schema:
        return sample_json(_resolve_ref(schema["$ref"], root), rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return sample_json(rng.choice(options), rng, root, depth + 1)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve_ref(part["$ref"], root) if "$ref" in part else part
            merged = _merge_schemas(merged, part)
        return sample_json(merged, rng, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    return _SAMPLERS[kind](schema, rng, root, depth)


def _resolve_ref(ref: str, root: Any) -> Any:
    if not ref.startswith("#/"):
        raise ValueError(f"the simulator resolves only local $ref ('#/...'), got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _merge_schemas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {**a, **b}
    if "properties" in a or "properties" in b:
        merged["properties"] = {**a.get("properties", {}), **b.get("properties", {})}
        merged["required"] = list(dict.fromkeys(a.get("required", []) + b.get("required", [])))
    return merged


def _sample_object(schema: dict[str, Any], rng: random.Random, root: Any, depth: int) -> dict[str, Any]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    out = {}
    for name, sub in properties.items():
        if name in required or rng.random() < 0.5:
            out[name] = sample_json(sub, rng, root, depth + 1)
    return out


def _sample_array(schema: dict[str, Any], rng: random.Random, root: Any, depth: int) -> list[Any]:
    low = int(schema.get("minItems", 1))
    high = int(schema.get("maxItems", max(low, 3)))
    items = schema.get("items", {"type": "string"})
    if schema.get("uniqueItems") and isinstance(items, dict) and "enum" in items:
        return rng.sample(list(items["enum"]), k=min(len(items["enum"]), rng.randint(low, high)))
    return [sample_json(items, rng, root, depth + 1) for _ in range(rng.randint(low, high))]


def _sample_string(schema: dict[str, Any], rng: random.Random, root: Any = None, depth: int = 0) -> str:
    low = int(schema.get("minLength", 1))
    high = int(schema.get("maxLength", max(low, 24)))
    text = " ".join(rng.choice(_WORDS) for _ in range(8))
    while len(text) < low:
        text += " " + rng.choice(_WORDS)
    return text[: rng.randint(low, high)] if high >= low else text[:low]


def _sample_integer(schema: dict[str, Any], rng: random.Random, root: Any = None, depth: int = 0) -> int:
    (low, low_open), (high, high_open) = _bounds(schema, 0, 100)
    low_i = math.ceil(low) + (1 if low_open and math.ceil(low) == low else 0)
    high_i = math.floor(high) - (1 if high_open and math.floor(high) == high else 0)
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 1:
        multiples = range(-(-low_i // step) * step, high_i + 1, step)
        if multiples:
            return rng.choice(multiples)
    return rng.randint(low_i, max(low_i, high_i))


def _sample_number(schema: dict[str, Any], rng: random.Random, root: Any = None, depth: int = 0) -> float:
    (low, low_open), (high, high_open) = _bounds(schema, 0.0, 1.0)
    value = rng.uniform(low, high)
    if (low_open and value <= low) or (high_open and value >= high):
        value = (low + high) / 2
    return value


def _bounds(schema: dict[str, Any], default_low: float,
            default_high: float) -> tuple[tuple[float, bool], tuple[float, bool]]:
    """((low, exclusive), (high, exclusive)); accepts draft-4 boolean and draft-6+ numeric exclusives."""
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum")
    span = default_high - default_low
    if low is None:
        low = default_low if high is None or high > default_low else high - span
    if high is None:
        high = max(default_high, low + span)
    return (low, low_open), (high, high_open)


def _bound(schema: dict[str, Any], inclusive_key: str, exclusive_key: str) -> tuple[float | None, bool]:
    exclusive = schema.get(exclusive_key)
    if isinstance(exclusive, bool):
        return schema.get(inclusive_key), exclusive
    if exclusive is not None:
        return exclusive, True
    return schema.get(inclusive_key), False


_SAMPLERS: dict[str, Any] = {
    "object": _sample_object,
    "array": _sample_array,
    "string": _sample_string,
    "integer": _sample_integer,
    "number": _sample_number,
    "boolean": lambda schema, rng, root, depth: rng.random() < 0.5,
    "null": lambda schema, rng, root, depth: None,
}


# -- request handling ----------------------------------------------------------


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
    return {"role": "assistant", "content": _words(rng, length)}, finish, length


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


# -- running it ----------------------------------------------------------------


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (about half the CPU per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (10k connections need 10k fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


LISTEN_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(conf: SimConf, sock: socket.socket, capacity: int | None = None,
                api_key: Secret | None = None) -> tuple[web.AppRunner, SimEndpoint]:
    """Serve the sim on an already bound, listening socket; returns the runner to clean up."""
    endpoint = SimEndpoint(conf, capacity, api_key)
    # handler_cancellation: a client that gives up frees its capacity slot, as in vLLM.
    runner = web.AppRunner(endpoint.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    # The backlog again: asyncio re-listens with it (aiohttp's default of 128 drops
    # SYNs when thousands of clients connect at once, stalling them for seconds).
    await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
    return runner, endpoint


class SimServerThread:
    """A sim replica served by an event loop in a background thread (in-process or inside a Ray actor).

    Example::

        server = SimServerThread(SimConf(ttft_s=0.01), api_key=Secret("k3y"))
        print(server.url)   # http://127.0.0.1:<port>; clients send "Authorization: Bearer k3y"
        server.stop()
    """

    def __init__(self, conf: SimConf, advertise_host: str | None = None, api_key: Secret | None = None):
        raise_fd_limit()
        self.conf = conf
        self.api_key = api_key
        self.advertise_host = advertise_host or conf.host
        self._sock = listen_socket(conf.host, conf.port)
        self.port = self._sock.getsockname()[1]
        self._loop = new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-server-{self.port}", daemon=True)
        self._thread.start()
        self._started.wait()

    @property
    def url(self) -> str:
        host = self.advertise_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        return self._endpoint.stats.as_dict()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner, self._endpoint = self._loop.run_until_complete(serve(self.conf, self._sock,
                                                                           api_key=self.api_key))
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


class SimServerProcess:
    """A sim server in a child process (``python -m matrix_hpc.services.llm.sim_server``).

    It asks for ``api_key`` (a new random one if not given), handed to the
    child through its environment, never its command line.

    Example::

        with SimServerProcess(SimConf(capacity=10_000), workers=2) as server:
            client = LLMClient(StaticEndpoints([server.url]), ClientConf(), api_key=server.api_key)
    """

    def __init__(self, conf: SimConf, workers: int = 1, log_path: Path | None = None, start_timeout_s: float = 30.0,
                 api_key: Secret | None = None):
        self.conf = conf
        self.api_key = api_key or new_api_key()
        self.workers = workers
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> SimServerProcess:
        import tempfile

        port_file = Path(tempfile.mkdtemp(prefix="matrix-sim-")) / "port"
        args = [sys.executable, "-m", "matrix_hpc.services.llm.sim_server", "--port-file", str(port_file)]
        args += ["--workers", str(self.workers), "--conf-json", json.dumps(dataclasses.asdict(self.conf))]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # The child imports this package from wherever it is, whatever the working directory.
        package_root = str(Path(__file__).resolve().parents[3])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               API_KEY_ENV: self.api_key.get() or ""}
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sim server did not start (exit code {self.proc.returncode}); see {self.log_path}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def url(self) -> str:
        return f"http://{self.conf.host}:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the workers go too
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> SimServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def new_api_key() -> Secret:
    """A fresh random key for one service (256 bits)."""
    import secrets

    return Secret(secrets.token_urlsafe(32))


def _serve_forever(conf: SimConf, sock: socket.socket, capacity: int, api_key: Secret | None) -> None:
    async def run() -> None:
        runner, _ = await serve(conf, sock, capacity, api_key)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run())


def _parse_args(argv: list[str] | None) -> tuple[SimConf, int, Path | None, bool]:
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible LLM endpoint")
    for f in dataclasses.fields(SimConf):
        if f.type in ("int", "float", "str"):
            parser.add_argument("--" + f.name.replace("_", "-"), type={"int": int, "float": float, "str": str}[f.type])
    parser.add_argument("--conf-json", help="a whole SimConf as JSON (flags given as well win)")
    parser.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--no-auth", action="store_true",
                        help=f"serve without a key (anyone who reaches the port may use it); default: the key "
                             f"in ${API_KEY_ENV}")
    args = parser.parse_args(argv)
    values = json.loads(args.conf_json) if args.conf_json else {}
    for f in dataclasses.fields(SimConf):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return SimConf(**values), args.workers, args.port_file, args.no_auth


def _api_key_from_env(no_auth: bool) -> Secret | None:
    """The key from $MATRIX_SIM_API_KEY (then dropped from the environment), or None with --no-auth."""
    key = os.environ.pop(API_KEY_ENV, "")
    if key or no_auth:
        return Secret(key) if key else None
    sys.exit(f"sim_server: set {API_KEY_ENV} to the API key clients will send as 'Authorization: Bearer <key>' "
             "(a key on the command line would be visible to every user in /proc), or pass --no-auth for a "
             "server no one else can reach")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    conf, workers, port_file, no_auth = _parse_args(argv)
    api_key = _api_key_from_env(no_auth)
    raise_fd_limit()
    sock = listen_socket(conf.host, conf.port)
    port = sock.getsockname()[1]
    capacity = -(-conf.capacity // workers)  # each process serves its share of the slots
    children = [_fork_worker(conf, sock, capacity, i, api_key) for i in range(1, workers)]
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.rename(port_file)
    log.info("sim server on %s:%d (%d process(es), capacity %d each, %s)", conf.host, port, workers, capacity,
             "API key required" if api_key else "NO API KEY (--no-auth)")
    try:
        _serve_forever(conf, sock, capacity, api_key)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)


def _fork_worker(conf: SimConf, sock: socket.socket, capacity: int, index: int, api_key: Secret | None) -> int:
    pid = os.fork()
    if pid == 0:  # child: accept on the shared socket until told to stop
        try:
            _serve_forever(dataclasses.replace(conf, seed=conf.seed + 1000 * index), sock, capacity, api_key)
        finally:
            os._exit(0)
    return pid


if __name__ == "__main__":
    main()
