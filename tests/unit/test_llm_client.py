"""LLM client boundaries: retry classification, request bodies, answer parsing, key redaction."""

from __future__ import annotations

import logging
import pickle
import random
from typing import Any

import pytest
from aiohttp import web

from matrix_hpc.services.llm.client import LLMClient
from matrix_hpc.services.llm.config import ClientConf, LLMConf, SimConf
from matrix_hpc.services.llm.contract import LLMRequestError, LLMUnavailableError, Secret, backoff_s, classify_status
from matrix_hpc.services.llm.dialects import build_body, parse_result, server_message
from matrix_hpc.services.llm.endpoints import StaticEndpoints
from matrix_hpc.services.llm.service import LLMClientFactory, read_api_key

KEY = "sk-test-SECRET-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, "ok"), (400, "fatal"), (401, "fatal"), (404, "fatal"), (413, "fatal"), (422, "fatal"),
     (408, "retry"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry")],
)
def test_retry_classification(status: int, verdict: str) -> None:
    assert classify_status(status) == verdict


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(0)
    waits = [backoff_s(3, 0.5, 10.0, rng) for _ in range(500)]
    assert 0.0 <= min(waits) < 0.2 and 1.8 < max(waits) <= 2.0
    assert max(backoff_s(20, 0.5, 10.0, rng) for _ in range(100)) <= 10.0


def test_vllm_dialect_uses_structured_outputs() -> None:
    body = build_body("m", MESSAGES, "vllm", choice=["yes", "no"], params={"temperature": 0.2, "n": 2})
    assert body["structured_outputs"] == {"choice": ["yes", "no"]}
    assert body["temperature"] == 0.2 and body["n"] == 2 and "response_format" not in body
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert build_body("m", MESSAGES, "vllm", json_schema=schema)["structured_outputs"] == {"json": schema}


def test_vllm_dialect_translates_removed_guided_fields() -> None:
    # vLLM >= 0.12 ignores guided_* silently; sending them would return unconstrained text.
    body = build_body("m", MESSAGES, "vllm", params={"guided_choice": ["a", "b"], "guided_regex": "[ab]"})
    assert "guided_choice" not in body and "guided_regex" not in body
    assert body["structured_outputs"] == {"choice": ["a", "b"], "regex": "[ab]"}


def test_openai_dialect_uses_response_format_and_unwraps_choice() -> None:
    body = build_body("m", MESSAGES, "openai", choice=["yes", "no"])
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema" and "structured_outputs" not in body
    assert schema["properties"]["choice"]["enum"] == ["yes", "no"]
    answer = {"choices": [{"message": {"content": '{"choice": "no"}'}, "finish_reason": "stop"}]}
    assert parse_result(answer, unwrap_choice=True)[0][0].content == "no"
    with pytest.raises(ValueError, match="either choice= or json_schema="):
        build_body("m", MESSAGES, "openai", choice=["a"], json_schema={})


def test_extra_body_is_merged_last() -> None:
    body = build_body("m", MESSAGES, "vllm", params={"extra_body": {"top_k": 5, "model": "other"}})
    assert body["top_k"] == 5 and body["model"] == "other" and "extra_body" not in body


def test_parse_result_reads_reasoning_tools_and_usage() -> None:
    answer = {
        "choices": [
            {"message": {"content": "a", "reasoning": "r1"}, "finish_reason": "stop"},
            {"message": {"content": None, "reasoning_content": "r2",
                         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
             "finish_reason": "tool_calls"},
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    choices, usage = parse_result(answer, unwrap_choice=False)
    assert [c.reasoning_content for c in choices] == ["r1", "r2"]
    assert choices[1].tool_calls[0]["function"]["name"] == "f" and choices[1].finish_reason == "tool_calls"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 3, 10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [('{"error": {"message": "too long", "code": 400}}', "too long"),
     ('{"object": "error", "message": "bad n"}', "bad n"),
     ('{"error": "nope"}', "nope"),
     ("plain text", "plain text")],
)
def test_server_message_shapes(text: str, expected: str) -> None:
    assert server_message(text) == expected


def test_conf_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="llm.client.max_attempts"):
        ClientConf(max_attempts=0)
    with pytest.raises(ValueError, match="llm.sim.error_rate"):
        SimConf(error_rate=1.5)
    with pytest.raises(ValueError, match="llm.backend must be one of"):
        LLMConf(backend="tgi")


# -- the API key never shows -----------------------------------------------------


def test_key_absent_from_reprs_and_pickles_of_recipes() -> None:
    secret = Secret(KEY)
    client = LLMClient(StaticEndpoints(["http://127.0.0.1:9"]), ClientConf(), "m", KEY)
    factory = LLMClientFactory(StaticEndpoints(["http://127.0.0.1:9"]), ClientConf(), "m", secret)
    for text in (repr(secret), str(secret), repr(client), repr(factory), f"{secret}"):
        assert KEY not in text
    assert pickle.loads(pickle.dumps(factory)).api_key.get() == KEY


def test_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MATRIX_TEST_KEY", raising=False)
    with pytest.raises(RuntimeError, match="MATRIX_TEST_KEY is not set"):
        read_api_key("MATRIX_TEST_KEY")
    monkeypatch.setenv("MATRIX_TEST_KEY", KEY)
    assert read_api_key("MATRIX_TEST_KEY").get() == KEY
    assert read_api_key("").get() is None


async def _echo_key_server(status: int) -> tuple[web.AppRunner, str, list[str]]:
    """A loopback server that answers every chat with ``status`` and echoes the Authorization header back."""
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        seen.append(auth)
        return web.json_response({"error": {"message": f"invalid request, you sent {auth}"}}, status=status)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}", seen


@pytest.mark.parametrize("status", [400, 503])
async def test_key_is_sent_but_redacted_from_errors_and_logs(status: int, caplog: pytest.LogCaptureFixture) -> None:
    runner, url, seen = await _echo_key_server(status)
    caplog.set_level(logging.DEBUG)
    client = LLMClient(StaticEndpoints([url]), ClientConf(max_attempts=2, backoff_base_s=0.01), "m", KEY)
    try:
        with pytest.raises((LLMRequestError, LLMUnavailableError)) as info:
            await client.chat(MESSAGES)
    finally:
        await client.close()
        await runner.cleanup()
    assert seen and all(h == f"Bearer {KEY}" for h in seen)
    assert len(seen) == (1 if status == 400 else 2)  # 400: no retry
    error: Any = info.value
    assert KEY not in str(error) and KEY not in repr(error) and "***" in str(error)
    assert KEY not in caplog.text
    if status == 400:
        assert error.status == 400 and "invalid request" in error.server_message


class _MutableSource:
    """An endpoint table the test changes, as replicas (un)register."""

    refresh_interval_s = 0.05

    def __init__(self) -> None:
        self.table: dict[str, str] = {}
        self.version = 0

    async def fetch(self) -> tuple[int, dict[str, str]]:
        return self.version, dict(self.table)

    def set(self, table: dict[str, str]) -> None:
        self.table = table
        self.version += 1


async def test_calls_wait_while_no_replica_is_registered() -> None:
    import asyncio

    from matrix_hpc.services.llm.sim_server import SimServerThread

    server = SimServerThread(SimConf(ttft_s=0.0, time_per_output_token_s=0.0))
    source = _MutableSource()
    client = LLMClient(source, ClientConf(wait_for_replicas_s=5.0), "sim")
    try:
        waiting = asyncio.ensure_future(client.chat(MESSAGES))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # nothing registered yet: the call waits, it does not fail
        source.set({"r0": server.url + "/v1"})
        assert (await asyncio.wait_for(waiting, 5)).attempts == 1
        source.set({})  # the only replica restarts: unregistered for a while
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(client.chat(MESSAGES))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        source.set({"r0": server.url + "/v1"})
        assert (await asyncio.wait_for(waiting, 5)).content
    finally:
        await client.close()
        server.stop()


async def test_no_replica_at_all_fails_with_a_clear_message() -> None:
    client = LLMClient(_MutableSource(), ClientConf(wait_for_replicas_s=0.3), "sim")
    try:
        with pytest.raises(LLMUnavailableError, match="no LLM replica registered"):
            await client.chat(MESSAGES)
    finally:
        await client.close()


def test_package_and_config_import_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, matrix_hpc.services.llm as m, matrix_hpc.services.llm.config as c; c.LLMConf(); "
        "heavy = [n for n in ('aiohttp', 'ray', 'vllm', 'torch') if n in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
