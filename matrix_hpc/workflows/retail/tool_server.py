"""The retail environment as a long-lived JSON-lines server (stdio or a unix socket).

Runs inside a per-task sandbox (read-only repo and venv, no network), so it
uses only the standard library and this package and starts in well under a
second::

    python -m matrix_hpc.workflows.retail.tool_server --db db.json --socket /scratch/tools.sock
    python -m matrix_hpc.workflows.retail.tool_server --db db.json          # stdio (or $MATRIX_SANDBOX_SOCKET)

Inside a sandbox leased from ``matrix_hpc.services.sandbox``, start it with
``sandbox.start_server([...])``: it listens on ``$MATRIX_SANDBOX_SOCKET`` and the
host connects to ``server.socket_path`` with :class:`ToolServerClient`.

One JSON object per line each way; every response echoes the request's ``id``:

    {"id": 1, "tool": "get_order_details", "arguments": {"order_id": "#W2378156"}}
        -> {"id": 1, "content": "{...}", "error": false}
    {"id": 2, "op": "db_hash"}            -> {"id": 2, "db_hash": "ab12..."}
    {"id": 3, "op": "dump_db"}            -> {"id": 3, "db": {...}}
    {"id": 4, "op": "tool_schemas"}       -> {"id": 4, "tools": [...]}
    {"id": 5, "op": "gold_db_hash", "actions": [{"name": ..., "arguments": {...}}]}
        -> {"id": 5, "db_hash": "...", "replay_errors": [...], "write_failed": false}
    {"id": 6, "op": "reset"} / "ping" / "stats" / "shutdown"
    anything malformed    -> {"id": ..., "protocol_error": "what was wrong"}

``gold_db_hash`` replays actions on a fresh copy of the initial DB without
touching the live one, so the reward can be computed where the DB already is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from matrix_hpc.workflows.retail.db import RetailSnapshot, default_data_dir
from matrix_hpc.workflows.retail.env import RetailEnv, ToolOutcome, is_write_tool
from matrix_hpc.workflows.retail.reward import GoldState, RewardInfo, compute_reward, replay_gold
from matrix_hpc.workflows.retail.tasks import RetailTask

MAX_LINE_BYTES = 64 * 1024 * 1024  # dump_db is ~1.3 MB; leave room for bigger DBs
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
SOCKET_ENV = "MATRIX_SANDBOX_SOCKET"  # set by the sandbox service's start_server (/scratch/<name>.sock)


class ToolServer:
    """Transport-free request handling: one environment, one request at a time."""

    def __init__(self, snapshot: RetailSnapshot) -> None:
        self.snapshot = snapshot
        self.env = RetailEnv(snapshot)
        self.stopping = False

    def handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return {"id": None, "protocol_error": "request must be a JSON object"}
        rid = request.get("id")
        try:
            return {"id": rid, **self._dispatch(request)}
        except _ProtocolError as e:
            return {"id": rid, "protocol_error": str(e)}

    def _dispatch(self, request: Mapping[str, Any]) -> dict[str, Any]:
        if "tool" in request:
            tool = request["tool"]
            if not isinstance(tool, str):
                raise _ProtocolError("'tool' must be a string")
            outcome = self.env.call_detailed(tool, request.get("arguments"))
            return {"content": outcome.content, "error": outcome.error}
        op = request.get("op")
        handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise _ProtocolError(f"unknown request: give 'tool' or 'op' (one of {', '.join(_OPS)}), got op={op!r}")
        result: dict[str, Any] = handler(request)
        return result

    def _op_db_hash(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {"db_hash": self.env.db_hash()}

    def _op_dump_db(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {"db": self.env.dump_db()}

    def _op_tool_schemas(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {"tools": self.env.tool_schemas()}

    def _op_gold_db_hash(self, request: Mapping[str, Any]) -> dict[str, Any]:
        actions = request.get("actions")
        if not isinstance(actions, list) or not all(isinstance(a, dict) and "name" in a for a in actions):
            raise _ProtocolError("'actions' must be a list of {\"name\": ..., \"arguments\": {...}}")
        gold = self.env.fresh()
        errors = gold.replay((a["name"], a.get("arguments") or {}) for a in actions)
        return {
            "db_hash": gold.db_hash(),
            "replay_errors": [f"{i} {name}: {err}" for i, name, err in errors],
            "write_failed": any(is_write_tool(name) for _, name, _ in errors),
        }

    def _op_reset(self, _: Mapping[str, Any]) -> dict[str, Any]:
        self.env = RetailEnv(self.snapshot)
        return {"ok": True}

    def _op_ping(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    def _op_stats(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {"calls": self.env.calls, "errors": self.env.errors, "written": self.env.db.written_keys()}

    def _op_shutdown(self, _: Mapping[str, Any]) -> dict[str, Any]:
        self.stopping = True
        return {"ok": True}

    def handle_line(self, line: bytes | str) -> str:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return json.dumps({"id": None, "protocol_error": f"not a JSON line: {e}"})
        return json.dumps(self.handle(request))


_OPS = ("db_hash", "dump_db", "tool_schemas", "gold_db_hash", "reset", "ping", "stats", "shutdown")


class _ProtocolError(Exception):
    pass


# ---- transports ------------------------------------------------------------
def serve_stdio(server: ToolServer, stdin: Any = None, stdout: Any = None) -> None:
    """Answer one line per request line until EOF or a shutdown request."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    for line in stdin:
        if not line.strip():
            continue
        stdout.write(server.handle_line(line) + "\n")
        stdout.flush()
        if server.stopping:
            return


async def serve_unix(server: ToolServer, socket_path: str, idle_timeout_s: float = 0.0) -> None:
    """Serve on a unix socket until SIGTERM/SIGINT, a shutdown request or ``idle_timeout_s`` of silence."""
    if len(os.fsencode(socket_path)) > _UNIX_PATH_MAX:
        raise SystemExit(f"socket path {socket_path!r} is longer than {_UNIX_PATH_MAX} bytes; use a shorter directory")
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a stale socket from a killed server would make bind fail
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    activity = {"t": loop.time()}

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not stop.is_set():
                line = await reader.readline()
                if not line:
                    break
                activity["t"] = loop.time()
                writer.write((server.handle_line(line) + "\n").encode())
                await writer.drain()
                if server.stopping:
                    stop.set()
        except (ConnectionError, ValueError):  # ValueError: a line over MAX_LINE_BYTES
            pass
        finally:
            writer.close()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    unix_server = await asyncio.start_unix_server(on_client, path=socket_path, limit=MAX_LINE_BYTES)
    print(json.dumps({"ready": True, "socket": socket_path, "pid": os.getpid()}), flush=True)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                if idle_timeout_s > 0 and loop.time() - activity["t"] > idle_timeout_s:
                    break
    finally:
        unix_server.close()
        if os.path.exists(socket_path):
            os.unlink(socket_path)


# ---- client ----------------------------------------------------------------
class ToolServerError(RuntimeError):
    """The tool server could not be reached or answered outside the protocol."""


class ToolServerClient:
    """Async client for one tool server (unix socket or a spawned stdio process).

    Requests on one client are sent one at a time (a lock), matching the
    dialogue: at most one tool call per agent turn.

    Example::

        async with await ToolServerClient.connect("/scratch/tools.sock") as env:
            await env.call("find_user_id_by_email", {"email": "noah.brown7922@example.com"})
            await env.db_hash()
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str,
                 request_timeout_s: float = 30.0, process: asyncio.subprocess.Process | None = None) -> None:
        self._reader, self._writer, self.where = reader, writer, where
        self.request_timeout_s = request_timeout_s
        self._process = process
        self._lock = asyncio.Lock()
        self._next_id = 0

    @classmethod
    async def connect(cls, socket_path: str | os.PathLike[str], timeout_s: float = 10.0,
                      request_timeout_s: float = 30.0) -> "ToolServerClient":
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
                    request_timeout_s: float = 30.0) -> "ToolServerClient":
        """Start a stdio server as a child process and talk to it over its pipes."""
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "matrix_hpc.workflows.retail.tool_server", "--db", os.fspath(db_path), "--stdio",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE_BYTES,
        )
        assert proc.stdout is not None and proc.stdin is not None
        return cls(proc.stdout, proc.stdin, f"stdio:pid {proc.pid}", request_timeout_s, process=proc)

    async def request(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and return its response (raises ToolServerError on protocol errors)."""
        async with self._lock:
            self._next_id += 1
            rid = self._next_id
            self._writer.write((json.dumps({**payload, "id": rid}) + "\n").encode())
            try:
                await self._writer.drain()
                line = await asyncio.wait_for(self._reader.readline(), self.request_timeout_s)
            except (ConnectionError, asyncio.TimeoutError) as e:
                raise ToolServerError(f"retail tool server at {self.where} failed on {payload}: {e!r}") from e
            if not line:
                raise ToolServerError(f"retail tool server at {self.where} closed the connection")
            response: dict[str, Any] = json.loads(line)
        if "protocol_error" in response:
            raise ToolServerError(f"retail tool server at {self.where}: {response['protocol_error']}")
        if response.get("id") != rid:
            raise ToolServerError(f"retail tool server at {self.where} answered id {response.get('id')}, expected {rid}")
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
        r = await self.gold_db_hash(task.gold_calls)
        return GoldState(r["db_hash"], tuple(r["replay_errors"]), bool(r["write_failed"]))

    async def reset(self) -> None:
        await self.request({"op": "reset"})

    async def ping(self) -> dict[str, Any]:
        return await self.request({"op": "ping"})

    async def shutdown(self) -> None:
        """Ask the server to exit (it answers first)."""
        await self.request({"op": "shutdown"})

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, BrokenPipeError):
            pass
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), 5.0)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def __aenter__(self) -> "ToolServerClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ToolClient(Protocol):
    """What a dialogue needs from an environment, wherever it runs."""

    async def call_detailed(self, tool: str, arguments: Mapping[str, Any] | str | None) -> ToolOutcome: ...
    async def call(self, tool: str, arguments: Mapping[str, Any] | str | None) -> str: ...
    async def db_hash(self) -> str: ...
    async def gold_state(self, task: RetailTask) -> GoldState: ...
    async def close(self) -> None: ...


class LocalToolClient:
    """The :class:`ToolClient` interface over an in-process :class:`RetailEnv` (no sandbox).

    Environments on one snapshot share it copy-on-write, so thousands are cheap.
    """

    def __init__(self, env: RetailEnv) -> None:
        self.env = env
        self._gold: dict[str, GoldState] = {}

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


# ---- entry point -------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.workflows.retail.tool_server",
                                     description="tau2 retail environment as a JSON-lines tool server")
    parser.add_argument("--db", default=None, help="retail db.json (default: $MATRIX_HPC_TAU2_RETAIL_DIR/db.json)")
    parser.add_argument("--socket", default=None,
                        help=f"unix socket path to listen on (default: ${SOCKET_ENV} when set, else stdio)")
    parser.add_argument("--stdio", action="store_true", help="serve stdin/stdout even when a socket is configured")
    parser.add_argument("--idle-timeout-s", type=float, default=0.0,
                        help="exit after this many seconds without a request (socket mode; 0 = never)")
    args = parser.parse_args(argv)
    db_path = Path(args.db) if args.db else default_data_dir() / "db.json"
    try:
        server = ToolServer(RetailSnapshot.from_file(db_path))
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        print(f"retail tool server: cannot load DB {db_path}: {e}", file=sys.stderr)
        return 2
    socket_path = None if args.stdio else (args.socket or os.environ.get(SOCKET_ENV))
    if socket_path:
        asyncio.run(serve_unix(server, socket_path, args.idle_timeout_s))
    else:
        serve_stdio(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
