"""Async OpenAI-compatible chat client with retries and client-side routing.

One :class:`LLMClient` per process: it owns one pooled aiohttp session for
all replicas, a :class:`~matrix_hpc.services.llm.routing.Router`, and two
background tasks (refresh the replica table, probe replicas marked down).

Retry policy: connection errors, resets, timeouts, 408, 429 and 5xx are
retried (on another replica when one is healthy) with exponential backoff
and full jitter; any other 4xx (context too long, bad parameters) raises
:class:`LLMRequestError` at once with the server's message, because asking
again cannot succeed. The API key goes into the ``Authorization`` header
only; it is never part of a repr, a log line or an exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Any

import aiohttp

from matrix_hpc import metrics
from matrix_hpc.background import supervise
from matrix_hpc.services.llm.config import ClientConf
from matrix_hpc.services.llm.contract import (
    ChatResult,
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    RetryableError,
    Secret,
    backoff_s,
    classify_status,
)
from matrix_hpc.services.llm.dialects import build_body, decode_text, parse_result, server_message
from matrix_hpc.services.llm.endpoints import EndpointSource
from matrix_hpc.services.llm.routing import Replica, Router

log = logging.getLogger(__name__)


# -- the client --------------------------------------------------------------


def endpoint_label(endpoints: EndpointSource) -> str:
    """The metrics' endpoint label: the service's name, or "static" for fixed URLs (the replica label has them)."""
    service = getattr(endpoints, "service", None)
    return str(getattr(service, "name", None) or "static")


class LLMClient:
    """OpenAI-compatible chat completions over the replicas of ``endpoints``.

    Example::

        client = LLMClient(StaticEndpoints(["http://127.0.0.1:8000"]), ClientConf())
        result = await client.chat([{"role": "user", "content": "Hi"}], sticky_key="task-1",
                                   temperature=0.7, max_tokens=64)
        print(result.content, result.usage.completion_tokens)
        await client.close()
    """

    def __init__(
        self,
        endpoints: EndpointSource,
        conf: ClientConf,
        model: str | None = None,
        api_key: str | Secret | None = None,
    ):
        self.endpoints = endpoints
        self.conf = conf
        self.model = model
        self._api_key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        self.router = Router(conf.sticky_max_load_factor, conf.sticky_max_keys)
        self._rng = random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {"Content-Type": "application/json"}
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key.get()}"
        self._version: int | None = None
        self._first_fetch: asyncio.Task[None] | None = None
        self._model_lookup: asyncio.Future[str] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._has_replicas: asyncio.Event | None = None  # created in the client's event loop
        self._default_timeout = aiohttp.ClientTimeout(total=conf.timeout_s, sock_connect=conf.connect_timeout_s)
        self._gate: asyncio.Semaphore | contextlib.nullcontext[None] = contextlib.nullcontext()
        self._closed = False
        self.calls = 0
        self.retries = 0
        self._endpoint = endpoint_label(endpoints)

    def __repr__(self) -> str:
        return f"LLMClient(endpoints={self.endpoints!r}, model={self.model!r}, api_key={self._api_key!r})"

    # -- public API ----------------------------------------------------

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        sticky_key: str | None = None,
        timeout_s: float | None = None,
        choice: list[str] | None = None,
        json_schema: dict[str, Any] | None = None,
        **params: Any,
    ) -> ChatResult:
        """One chat completion, routed, retried and timed out per attempt.

        ``params`` are sent as-is (temperature, top_p, max_tokens, n, seed,
        tools, tool_choice, response_format, structured_outputs, extra_body...).
        ``choice`` / ``json_schema`` ask for structured output portably.
        Raises :class:`LLMRequestError` (not retryable, carries the server's
        message) or :class:`LLMUnavailableError` (retries exhausted).
        """
        await self._ensure_started()
        model = self.model or await self._model_discovered()
        body = json.dumps(
            build_body(model, messages, self.conf.dialect, choice, json_schema, params), separators=(",", ":")
        ).encode()
        timeout = self._timeout(timeout_s)
        unwrap = choice is not None and self.conf.dialect == "openai"
        return await self._send_with_retries(body, sticky_key, timeout, unwrap)

    def forget_sticky(self, sticky_key: str) -> None:
        """Drop a finished task's replica pin (pins are also forgotten LRU-first)."""
        self.router.forget(sticky_key)

    async def close(self) -> None:
        """Stop background tasks and close the pooled session."""
        self._closed = True
        metrics.flush_batched()  # this client's counts since the last publish
        if self._first_fetch is not None:
            self._tasks.append(self._first_fetch)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- sending -------------------------------------------------------

    async def _send_with_retries(
        self, body: bytes, sticky_key: str | None, http_timeout: aiohttp.ClientTimeout, unwrap: bool
    ) -> ChatResult:
        started = time.perf_counter()
        tried: list[str] = []
        last_reason = ""
        self.calls += 1
        for attempt in range(1, self.conf.max_attempts + 1):
            if attempt > 1:
                self.retries += 1
                metrics.LLM_RETRIES.inc(1, self._endpoint)
                conf = self.conf
                await asyncio.sleep(backoff_s(attempt - 1, conf.backoff_base_s, conf.backoff_max_s, self._rng))
            try:
                async with self._gate:  # max_connections: wait here, outside the timeout
                    replica = await self._pick(sticky_key, tried)
                    data = await self._attempt(replica, body, http_timeout)
            except RetryableError as exc:
                metrics.LLM_REQUESTS.inc(1, self._endpoint, replica.base_url, "retried")
                last_reason = self._redact(f"{replica.base_url}: {exc}")
                tried.append(replica.replica_id)
                if exc.replica_down:
                    self.router.mark_down(replica.replica_id)
                log.debug("LLM attempt %d failed on %s", attempt, last_reason)
                continue
            choices, usage = parse_result(data, unwrap)
            result = ChatResult(choices, usage, replica.base_url, time.perf_counter() - started, attempt, data)
            self._record(result)
            return result
        metrics.LLM_REQUESTS.inc(1, self._endpoint, "", "unavailable")
        raise LLMUnavailableError(
            f"LLM call failed after {self.conf.max_attempts} attempts; last error: {last_reason}. "
            "Check the replicas' logs, or raise llm.client.max_attempts / llm.client.timeout_s."
        )

    async def _attempt(self, replica: Replica, body: bytes, http_timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
        assert self._session is not None
        self.router.acquire(replica)
        metrics.LLM_OUTSTANDING.set(replica.outstanding, self._endpoint, replica.base_url)
        try:
            async with self._session.post(
                replica.base_url + "/chat/completions", data=body, headers=self._headers, timeout=http_timeout
            ) as resp:
                payload = await resp.read()  # bytes: json.loads needs no charset sniffing
                status = resp.status
        except TimeoutError:
            raise RetryableError(f"no answer within {http_timeout.total:.1f} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise RetryableError(f"cannot connect ({exc.os_error})", replica_down=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"connection lost ({type(exc).__name__}: {exc})") from None
        finally:
            self.router.release(replica)
            metrics.LLM_OUTSTANDING.set(replica.outstanding, self._endpoint, replica.base_url)
        verdict = classify_status(status)
        if verdict == "retry":
            raise RetryableError(f"HTTP {status}: {server_message(decode_text(payload))[:200]}")
        if verdict == "fatal":
            metrics.LLM_REQUESTS.inc(1, self._endpoint, replica.base_url, "rejected")
            raise LLMRequestError(status, self._redact(server_message(decode_text(payload))), replica.base_url)
        try:
            return dict(json.loads(payload))
        except ValueError:
            raise RetryableError(f"unparseable answer: {payload[:200]!r}") from None

    def _record(self, result: ChatResult) -> None:
        """One answered request in the metrics (matrix_hpc.metrics), labelled by endpoint and replica URL."""
        where = (self._endpoint, result.replica)
        metrics.LLM_REQUESTS.inc(1, *where, "ok")
        metrics.LLM_LATENCY_S.observe(result.latency_s, *where)
        metrics.LLM_PROMPT_TOKENS.inc(result.usage.prompt_tokens, *where)
        metrics.LLM_COMPLETION_TOKENS.inc(result.usage.completion_tokens, *where)

    async def _pick(self, sticky_key: str | None, tried: list[str]) -> Replica:
        replica = self.router.pick(sticky_key, tried)
        while replica is None:  # no replica registered (yet, or while all restart)
            await self._wait_for_replicas()
            replica = self.router.pick(sticky_key, tried)
        return replica

    def _timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        if timeout_s is None:
            return self._default_timeout
        return aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.conf.connect_timeout_s)

    def _redact(self, text: str) -> str:
        key = self._api_key.get()
        return text.replace(key, "***") if key else text

    # -- start-up, replica table, health ---------------------------------

    async def _ensure_started(self) -> None:
        if self._session is not None:
            return
        if self._closed:
            raise LLMError("this LLMClient was closed; build a new one")
        # The pool itself is unlimited: aiohttp counts time waiting for a pooled
        # connection against the request timeout, so the limit is a semaphore instead.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        if self.conf.max_connections > 0:
            self._gate = asyncio.Semaphore(self.conf.max_connections)
        self._session = aiohttp.ClientSession(connector=connector)
        self._has_replicas = asyncio.Event()
        self._first_fetch = asyncio.ensure_future(self._refresh())
        if self.endpoints.refresh_interval_s > 0:
            self._tasks.append(supervise(self._refresh_loop, "LLM replica table refresh"))
        self._tasks.append(supervise(self._probe_loop, "LLM replica health probe"))

    async def _wait_for_replicas(self) -> None:
        assert self._has_replicas is not None and self._first_fetch is not None
        await asyncio.shield(self._first_fetch)
        if self.router.replicas:
            return
        if self.endpoints.refresh_interval_s <= 0:
            raise LLMUnavailableError(f"{self.endpoints!r} lists no replica")
        try:
            await asyncio.wait_for(self._has_replicas.wait(), self.conf.wait_for_replicas_s)
        except TimeoutError:
            raise LLMUnavailableError(
                f"no LLM replica registered in {self.endpoints!r} within {self.conf.wait_for_replicas_s:.0f} s; "
                "check that the LLM service started (its logs are under the run directory)"
            ) from None

    async def _refresh(self) -> None:
        try:
            version, table = await self.endpoints.fetch()
        except Exception as exc:  # keep the last table: a registry hiccup must not stop the run
            log.warning("could not refresh LLM replicas from %r: %s", self.endpoints, exc)
            return
        if version != self._version:
            self._version = version
            self.router.update(table)
        if self._has_replicas is not None:
            if self.router.replicas:
                self._has_replicas.set()
            else:
                self._has_replicas.clear()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.endpoints.refresh_interval_s)
            await self._refresh()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.conf.health_probe_interval_s)
            down = self.router.down()
            if down:
                results = await asyncio.gather(*(self._probe(r) for r in down))
                for replica, ok in zip(down, results, strict=True):
                    if ok:
                        log.info("LLM replica %s is healthy again", replica.base_url)
                        self.router.mark_up(replica.replica_id)

    async def _probe(self, replica: Replica) -> bool:
        """GET /health (vLLM, sim), else /v1/models (OpenAI-style servers)."""
        assert self._session is not None
        root = replica.base_url.removesuffix("/v1")
        timeout = aiohttp.ClientTimeout(total=5.0)
        for url in (root + "/health", replica.base_url + "/models"):
            try:
                async with self._session.get(url, headers=self._headers, timeout=timeout) as resp:
                    if resp.status == 200:
                        return True
                    if resp.status != 404:
                        return False
            except (TimeoutError, aiohttp.ClientError, OSError):
                return False
        return False

    async def _model_discovered(self) -> str:
        # One lookup shared by all calls that start before the answer is known.
        if self._model_lookup is None or (self._model_lookup.done() and self._model_lookup.exception()):
            self._model_lookup = asyncio.ensure_future(self._discover_model())
        return await asyncio.shield(self._model_lookup)

    async def _discover_model(self) -> str:
        """The first model the endpoint lists, when none was configured."""
        replica = await self._pick(None, [])
        assert self._session is not None
        async with self._session.get(replica.base_url + "/models", headers=self._headers) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise LLMRequestError(resp.status, self._redact(server_message(text)), replica.base_url)
        models = json.loads(text).get("data") or []
        if not models:
            raise LLMError(f"{replica.base_url}/models lists no model; set the model name in the llm config")
        self.model = str(models[0]["id"])
        return self.model
