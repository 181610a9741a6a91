"""Clients of a retail environment: over a unix socket, a stdio pipe, a relayed line, or in-process.

All offer the :class:`ToolClient` interface a dialogue needs (``call_detailed``,
``call``, ``db_hash``, ``gold_state``, ``close``), so the workflow does not care
where the environment lives:

- :class:`ToolServerClient`: a tool server on a unix socket on this node
  (``connect``) or a child process on stdio (``spawn``);
- :class:`LineToolClient`: any "send one line, get one line" function, e.g. the
  sandbox pool's ``server_request`` when the sandbox is on another node;
- :class:`LocalToolClient`: an in-process :class:`RetailEnv` (no sandbox).

Example::

    async with await ToolServerClient.connect("/scratch/tools.sock") as env:
        await env.call("find_user_id_by_email", {"email": "noah.brown7922@example.com"})
        info = await evaluate_client(env, task, agent_texts, termination_reason="user_stop")
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, Self

from matrix_hpc.workflows.retail.env import RetailEnv, ToolOutcome
from matrix_hpc.workflows.retail.reward import GoldState, RewardInfo, compute_reward, replay_gold
from matrix_hpc.workflows.retail.tasks import RetailTask

MAX_LINE_BYTES = 64 * 1024 * 1024  # dump_db is ~1.3 MB; leave room for bigger DBs


class ToolServerError(RuntimeError):
    """The tool server could not be reached or answered outside the protocol."""


class ToolClient(Protocol):
    """What a dialogue needs from an environment, wherever it runs."""

    async def call_detailed(self, tool: str, arguments: Mapping[str, Any] | str | None) -> ToolOutcome: ...
    async def call(self, tool: str, arguments: Mapping[str, Any] | str | None) -> str: ...
    async def db_hash(self) -> str: ...
    async def gold_state(self, task: RetailTask) -> GoldState: ...
    async def close(self) -> None: ...


class _ProtocolClient:
    """The tool-server protocol over some way of exchanging one line for one line."""

    where = "?"  # where the server is, for error messages

    def __init__(self) -> None:
        self._lock = asyncio.Lock()  # one request at a time keeps replies matched to requests
        self._next_id = 0

    async def _exchange(self, line: str) -> str:
        raise NotImplementedError

    async def request(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and return its response (raises ToolServerError on protocol errors)."""
        async with self._lock:
            self._next_id += 1
            rid = self._next_id
            reply = await self._exchange(json.dumps({**payload, "id": rid}))
        try:
            response: dict[str, Any] = json.loads(reply)
        except json.JSONDecodeError:
            raise ToolServerError(
                f"retail tool server at {self.where} answered a non-JSON line: {reply[:200]!r}") from None
        if "protocol_error" in response:
            raise ToolServerError(f"retail tool server at {self.where}: {response['protocol_error']}")
        if response.get("id") != rid:
            raise ToolServerError(
                f"retail tool server at {self.where} answered id {response.get('id')}, expected {rid}")
        return response

    async def call_detailed(self, tool: str, arguments: Mapping[str, Any] | str | None) -> ToolOutcome:
        response = await self.request({"tool": tool, "arguments": arguments})
        return ToolOutcome(response["content"], bool(response["error"]))

    async def call(self, tool: str, arguments: Mapping[str, Any] | str | None) -> str:
        """Run a tool; returns what the agent sees (result or ``Error: ...``)."""
        return (await self.call_detailed(tool, arguments)).content

    async def db_hash(self) -> str:
        return str((await self.request({"op": "db_hash"}))["db_hash"])

    async def dump_db(self) -> dict[str, Any]:
        db: dict[str, Any] = (await self.request({"op": "dump_db"}))["db"]
        return db

    async def tool_schemas(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = (await self.request({"op": "tool_schemas"}))["tools"]
        return tools

    async def gold_db_hash(self, actions: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
        """Replay ``(tool, arguments)`` on a fresh initial DB server-side; the live DB is untouched."""
        return await self.request({"op": "gold_db_hash", "actions": [{"name": n, "arguments": a} for n, a in actions]})

    async def gold_state(self, task: RetailTask) -> GoldState:
        """The task's gold DB state, replayed server-side (where the DB already is)."""
        actions = [{"action_id": a.action_id, "name": a.name, "arguments": a.arguments} for a in task.actions]
        r = await self.request({"op": "gold_db_hash", "actions": actions})
        return GoldState(r["db_hash"], tuple(r["replay_errors"]), bool(r["write_failed"]))

    async def reset(self) -> None:
        await self.request({"op": "reset"})

    async def ping(self) -> dict[str, Any]:
        return await self.request({"op": "ping"})

    async def shutdown(self) -> None:
        """Ask the server to exit (it answers first)."""
        await self.request({"op": "shutdown"})

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ToolServerClient(_ProtocolClient):
    """A tool server on a unix socket (:meth:`connect`) or a child process on stdio (:meth:`spawn`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str,
                 request_timeout_s: float = 30.0, process: asyncio.subprocess.Process | None = None) -> None:
        super().__init__()
        self._reader, self._writer, self.where = reader, writer, where
        self.request_timeout_s = request_timeout_s
        self._process = process

    @classmethod
    async def connect(cls, socket_path: str | os.PathLike[str], timeout_s: float = 10.0,
                      request_timeout_s: float = 30.0) -> ToolServerClient:
        """Connect, retrying until the server listens or ``timeout_s`` passes."""
        path = os.fspath(socket_path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
                return cls(reader, writer, f"unix:{path}", request_timeout_s)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if loop.time() >= deadline:
                    raise ToolServerError(
                        f"no retail tool server listening on {path} after {timeout_s:.1f}s ({e}); "
                        "is `python -m matrix_hpc.workflows.retail.tool_server --socket ...` running?"
                    ) from e
                await asyncio.sleep(0.02)

    @classmethod
    async def spawn(cls, db_path: str | os.PathLike[str], python: str = sys.executable,
                    request_timeout_s: float = 30.0) -> ToolServerClient:
        """Start a stdio server as a child process and talk to it over its pipes."""
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "matrix_hpc.workflows.retail.tool_server", "--db", os.fspath(db_path), "--stdio",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE_BYTES,
        )
        assert proc.stdout is not None and proc.stdin is not None
        return cls(proc.stdout, proc.stdin, f"stdio:pid {proc.pid}", request_timeout_s, process=proc)

    async def _exchange(self, line: str) -> str:
        self._writer.write(line.encode() + b"\n")
        try:
            await self._writer.drain()
            reply = await asyncio.wait_for(self._reader.readline(), self.request_timeout_s)
        except (TimeoutError, ConnectionError) as e:
            raise ToolServerError(f"retail tool server at {self.where} failed on {line[:200]}: {e!r}") from e
        if not reply:
            raise ToolServerError(f"retail tool server at {self.where} closed the connection")
        return reply.decode()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, BrokenPipeError):
            pass
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), 5.0)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()


class LineToolClient(_ProtocolClient):
    """The protocol over any ``async send(line) -> reply line`` function.

    Example (the sandbox on another node, reached through the pool)::

        client = LineToolClient(functools.partial(pool.server_request, lease, "server"), where=lease.sandbox_id)
    """

    def __init__(self, send_line: Callable[[str], Awaitable[str]], where: str = "relay") -> None:
        super().__init__()
        self._send_line = send_line
        self.where = where

    async def _exchange(self, line: str) -> str:
        return await self._send_line(line)


class LocalToolClient:
    """The :class:`ToolClient` interface over an in-process :class:`RetailEnv` (no sandbox).

    Environments on one snapshot share it copy-on-write, so thousands are cheap.
    """

    def __init__(self, env: RetailEnv) -> None:
        self.env = env

    async def call_detailed(self, tool: str, arguments: Mapping[str, Any] | str | None) -> ToolOutcome:
        return self.env.call_detailed(tool, arguments)

    async def call(self, tool: str, arguments: Mapping[str, Any] | str | None) -> str:
        return self.env.call(tool, arguments)

    async def db_hash(self) -> str:
        return self.env.db_hash()

    async def gold_state(self, task: RetailTask) -> GoldState:
        return replay_gold(task, self.env.db.snapshot)

    async def close(self) -> None:
        return None


async def evaluate_client(
    client: ToolClient, task: RetailTask, agent_messages: Iterable[str],
    termination_reason: str | None = None, gold: GoldState | None = None,
) -> RewardInfo:
    """The reward of a finished dialogue whose environment ``client`` reaches.

    ``gold``: a cached gold state (e.g. from :class:`GoldHashCache`); by default
    the gold actions are replayed by the environment itself.
    """
    final = await client.db_hash()
    gold_state = gold if gold is not None else await client.gold_state(task)
    return compute_reward(task, final, agent_messages, gold_state, termination_reason)
