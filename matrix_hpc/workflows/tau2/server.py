"""One task's tau2 environment as a JSON-lines server on stdin/stdout (run inside a sandbox).

Standard library, pydantic and this package only; it loads the domain's DB
once, then answers one line per request line::

    python -m matrix_hpc.workflows.tau2.server --domain telecom --data-dir /scratch/data

    {"id": 1, "op": "open", "task": {...tau2 task...}}                -> {"id": 1, "ok": true}
    {"id": 2, "op": "step", "calls": [{"name", "arguments", "requestor"}]}
        -> {"id": 2, "outputs": [{"ok": true, "text": "..."}]}         (a sync after each call, as a dialogue)
    {"id": 3, "op": "call", "calls": [...]}                            (no sync: tau2's make_tool_call)
    {"id": 4, "op": "hash"}   -> {"id": 4, "db_hash": "...", "user_db_hash": null}
    {"id": 5, "op": "state"}  -> {"id": 5, "state": {...}}
    {"id": 6, "op": "ping"} / {"op": "shutdown"}
    anything wrong            -> {"id": ..., "protocol_error": "what was wrong"}

Example (a pipe instead of a sandbox)::

    printf '{"id":1,"op":"ping"}\\n' | python -m matrix_hpc.workflows.tau2.server --domain retail
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from matrix_hpc.workflows.tau2.db import domain_dir_env
from matrix_hpc.workflows.tau2.environment import Tau2Environment

OPS = ("open", "step", "call", "hash", "state", "ping", "shutdown")


class ProtocolError(ValueError):
    pass


class EnvServer:
    """Transport-free request handling for one task's environment."""

    def __init__(self, domain: str) -> None:
        from matrix_hpc.workflows.tau2.tasks import new_environment

        self.domain = domain
        new_environment(domain)  # load the domain's template now: a later `open` is milliseconds
        self.env: Tau2Environment | None = None
        self.stopping = False

    def handle_line(self, line: str | bytes) -> str:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return json.dumps({"id": None, "protocol_error": f"not a JSON line: {e}"})
        if not isinstance(request, dict):
            return json.dumps({"id": None, "protocol_error": "a request must be a JSON object"})
        rid = request.get("id")
        try:
            return json.dumps({"id": rid, **self.handle(request)})
        except ProtocolError as e:
            return json.dumps({"id": rid, "protocol_error": str(e)})

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op not in OPS:
            raise ProtocolError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")
        if op == "open":
            return self._open(request.get("task"))
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "shutdown":
            self.stopping = True
            return {"ok": True}
        env = self._env()
        if op in ("step", "call"):
            calls = _calls(request.get("calls"))
            run = env.step if op == "step" else env.call
            outputs = [run(c["name"], c.get("arguments") or {}, c.get("requestor", "assistant")) for c in calls]
            return {"outputs": [{"ok": o.ok, "text": o.text} for o in outputs]}
        if op == "hash":
            return {"db_hash": env.db_hash(), "user_db_hash": env.user_db_hash()}
        return {"state": env.state_dict()}

    def _open(self, task: Any) -> dict[str, Any]:
        from matrix_hpc.workflows.tau2.tasks import build_environment

        if not isinstance(task, dict) or "id" not in task:
            raise ProtocolError("'open' needs 'task': a tau2 task object with an 'id'")
        try:
            self.env = build_environment(self.domain, task)
        except Exception as e:  # a task that cannot be set up is the caller's error, named
            raise ProtocolError(f"task {task['id']!r}: its environment could not be built: "
                                f"{type(e).__name__}: {e}") from None
        return {"ok": True}

    def _env(self) -> Tau2Environment:
        if self.env is None:
            raise ProtocolError("no environment yet: send 'open' with the task first")
        return self.env


def _calls(calls: Any) -> Sequence[Mapping[str, Any]]:
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments", {}), dict)
            for c in calls):
        raise ProtocolError("'calls' must be a list of {\"name\": str, \"arguments\": {...}, \"requestor\": ...}")
    return calls


def serve(server: EnvServer, stdin: IO[bytes], stdout: IO[str]) -> None:
    for line in stdin:
        if not line.strip():
            continue
        stdout.write(server.handle_line(line) + "\n")
        stdout.flush()
        if server.stopping:
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.workflows.tau2.server",
                                     description="one tau2 task environment as a JSON-lines server on stdio")
    parser.add_argument("--domain", required=True, choices=("retail", "airline", "telecom"))
    parser.add_argument("--data-dir", default=None, help="the domain's data folder (default: the usual lookup)")
    args = parser.parse_args(argv)
    if args.data_dir:
        os.environ[domain_dir_env(args.domain)] = args.data_dir
    try:
        server = EnvServer(args.domain)
    except (OSError, ValueError) as e:
        print(f"tau2 env server: cannot load the {args.domain} data: {e}", file=sys.stderr)
        return 2
    serve(server, sys.stdin.buffer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
