"""The retail environment as a long-lived JSON-lines server (stdio or a unix socket).

Runs inside a per-task sandbox (read-only repo and venv, no network), so it
uses only the standard library and this package and starts in well under a
second::

    python -m matrix_hpc.workflows.retail.tool_server --db db.json --socket /scratch/tools.sock
    python -m matrix_hpc.workflows.retail.tool_server --db db.json --stdio

With a socket (``--socket``, else ``$MATRIX_SANDBOX_SOCKET`` when set) it also
answers request lines on stdin, so a sandbox started with
``sandbox.start_server([...])`` can be reached on this node through
``server.socket_path`` (:class:`~matrix_hpc.workflows.retail.client.ToolServerClient`)
and from anywhere through the pool's stdio relay
(:class:`~matrix_hpc.workflows.retail.client.LineToolClient`). Its ready line
(``{"ready": true, "socket": ..., "pid": ...}``) then goes to stderr.

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
import contextlib
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from matrix_hpc.workflows.retail.client import (  # re-exported: the client side of this protocol
    MAX_LINE_BYTES,
    LineToolClient,
    LocalToolClient,
    ToolClient,
    ToolServerClient,
    ToolServerError,
    evaluate_client,
)
from matrix_hpc.workflows.retail.db import RetailSnapshot, default_data_dir
from matrix_hpc.workflows.retail.env import RetailEnv, is_write_tool

__all__ = ["LineToolClient", "LocalToolClient", "ToolClient", "ToolServer", "ToolServerClient", "ToolServerError",
           "evaluate_client", "main", "sandbox_binds", "sandbox_server_argv", "serve_stdio", "serve_unix"]

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
        handler = getattr(self, f"_op_{op}", None) if op in _OPS else None
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
            "replay_errors": [f"{actions[i].get('action_id', i)} {name}: {err}" for i, name, err in errors],
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
def serve_stdio(server: ToolServer, stdin: BinaryIO | None = None, stdout: TextIO | None = None) -> None:
    """Answer one line per request line until EOF or a shutdown request."""
    for line in stdin or sys.stdin.buffer:
        if not line.strip():
            continue
        (stdout or sys.stdout).write(server.handle_line(line) + "\n")
        (stdout or sys.stdout).flush()
        if server.stopping:
            return


async def _relay_stdin(server: ToolServer, stop: asyncio.Event, activity: _Activity) -> None:
    """Answer request lines on stdin on stdout, next to the socket (the sandbox pool's relay path)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):  # /dev/null, a file or a tty: no relay there
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        try:
            line = await reader.readline()
        except ValueError:  # a line over MAX_LINE_BYTES
            return
        if not line:
            return  # EOF: keep serving the socket
        if not line.strip():
            continue
        activity.now()
        sys.stdout.write(server.handle_line(line) + "\n")
        sys.stdout.flush()
        if server.stopping:
            stop.set()


class _Activity:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.t = loop, loop.time()

    def now(self) -> None:
        self.t = self.loop.time()


async def serve_unix(server: ToolServer, socket_path: str, idle_timeout_s: float = 0.0,
                     relay_stdin: bool = True) -> None:
    """Serve on a unix socket (and stdin) until SIGTERM/SIGINT, a shutdown request or ``idle_timeout_s`` idle."""
    if len(os.fsencode(socket_path)) > _UNIX_PATH_MAX:
        raise SystemExit(f"socket path {socket_path!r} is longer than {_UNIX_PATH_MAX} bytes; use a shorter directory")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a stale socket from a killed server would make bind fail
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    activity = _Activity(loop)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not stop.is_set():
                line = await reader.readline()
                if not line:
                    break
                activity.now()
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
    relay = asyncio.create_task(_relay_stdin(server, stop, activity)) if relay_stdin else None
    try:
        # CPU seconds since the process began: the startup cost, whatever the machine's load
        ready = {"ready": True, "socket": socket_path, "pid": os.getpid(),
                 "startup_cpu_s": round(time.process_time(), 3)}
        print(json.dumps(ready), file=sys.stderr, flush=True)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(1.0, idle_timeout_s or 1.0))
            except TimeoutError:
                if idle_timeout_s > 0 and loop.time() - activity.t > idle_timeout_s:
                    break
    finally:
        if relay is not None:
            relay.cancel()
        unix_server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


# ---- launching inside a sandbox ------------------------------------------------
SANDBOX_DATA_DIR = "/data/tau2_retail"  # where sandbox_binds mounts the retail data inside
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding the matrix_hpc package


def sandbox_binds(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Read-only binds (``SandboxConf.binds`` syntax) the server needs besides the venv.

    The retail data goes to :data:`SANDBOX_DATA_DIR`; the package source is bound
    too when it lives outside the venv (an editable install).
    """
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    binds = [f"{data.resolve()}:{SANDBOX_DATA_DIR}:ro"]
    if not str(_PACKAGE_ROOT).startswith(os.path.realpath(sys.prefix)):
        binds.append(f"{_PACKAGE_ROOT}:{_PACKAGE_ROOT}:ro")
    return binds


def sandbox_server_argv(python: str = sys.executable, idle_timeout_s: float = 0.0) -> list[str]:
    """``SandboxConf.server_argv`` / ``start_server`` argv: listens on ``$MATRIX_SANDBOX_SOCKET``."""
    argv = [python, "-m", "matrix_hpc.workflows.retail.tool_server", "--db", f"{SANDBOX_DATA_DIR}/db.json"]
    return argv + (["--idle-timeout-s", str(idle_timeout_s)] if idle_timeout_s > 0 else [])


# ---- entry point -------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.workflows.retail.tool_server",
                                     description="tau2 retail environment as a JSON-lines tool server")
    parser.add_argument("--db", default=None, help="retail db.json (default: $MATRIX_HPC_TAU2_RETAIL_DIR/db.json)")
    parser.add_argument("--socket", default=None,
                        help=f"unix socket path to listen on (default: ${SOCKET_ENV} when set, else stdio)")
    parser.add_argument("--stdio", action="store_true", help=f"serve stdin/stdout only, even if ${SOCKET_ENV} is set")
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
