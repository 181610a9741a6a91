"""The environment server (``python -m matrix_hpc.workflows.tau2.server``) over a real pipe.

Same answers and hashes as the in-process environment, named protocol errors,
and a fast start. The sandboxed path is tests/integration/test_workflow_tau2_bwrap.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from matrix_hpc.workflows.tau2.server import EnvServer
from matrix_hpc.workflows.tau2.tasks import build_environment, load_tasks


def exchange(domain: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = "".join(json.dumps(r) + "\n" for r in requests)
    proc = subprocess.run([sys.executable, "-m", "matrix_hpc.workflows.tau2.server", "--domain", domain],
                          input=lines, capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_a_telecom_dialogue_through_the_server_matches_the_in_process_environment() -> None:
    task = next(t for t in load_tasks("telecom") if any(a.get("requestor") == "user"
                                                        for a in t["evaluation_criteria"].get("actions") or []))
    calls = [{"name": a["name"], "arguments": a.get("arguments") or {}, "requestor": a.get("requestor", "assistant")}
             for a in task["evaluation_criteria"]["actions"]]
    answers = exchange("telecom", [{"id": 1, "op": "open", "task": task},
                                   *({"id": 2 + i, "op": "step", "calls": [c]} for i, c in enumerate(calls)),
                                   {"id": 99, "op": "hash"}])
    env = build_environment("telecom", task)
    expected = [env.step(c["name"], c["arguments"], c["requestor"]) for c in calls]
    assert answers[0] == {"id": 1, "ok": True}
    assert [a["outputs"][0] for a in answers[1:-1]] == [{"ok": o.ok, "text": o.text} for o in expected]
    assert answers[-1] == {"id": 99, "db_hash": env.db_hash(), "user_db_hash": env.user_db_hash()}


def test_protocol_errors_are_named_and_the_server_goes_on() -> None:
    server = EnvServer("retail")
    assert "send 'open'" in json.loads(server.handle_line('{"id": 1, "op": "step", "calls": []}'))["protocol_error"]
    assert "valid ops: open" in json.loads(server.handle_line('{"id": 2, "op": "dance"}'))["protocol_error"]
    assert "not a JSON line" in json.loads(server.handle_line("{"))["protocol_error"]
    assert "'open' needs 'task'" in json.loads(server.handle_line('{"id": 3, "op": "open"}'))["protocol_error"]
    server.handle_line(json.dumps({"id": 4, "op": "open", "task": load_tasks("retail")[0]}))
    bad_calls = json.loads(server.handle_line('{"id": 5, "op": "step", "calls": [{"arguments": {}}]}'))
    assert "'calls' must be a list" in bad_calls["protocol_error"]
    ok = json.loads(server.handle_line('{"id": 6, "op": "call", "calls": [{"name": "calculate", '
                                       '"arguments": {"expression": "2*3"}}]}'))
    assert ok == {"id": 6, "outputs": [{"ok": True, "text": "6.0"}]}


def test_an_open_is_milliseconds_once_the_server_is_up() -> None:
    server = EnvServer("airline")
    task = load_tasks("airline")[0]
    t0 = time.perf_counter()
    for i in range(20):
        server.handle({"id": i, "op": "open", "task": task})
    assert (time.perf_counter() - t0) / 20 < 0.05


def test_sandbox_files_carry_the_package_and_the_data_unless_the_data_is_bound() -> None:
    from matrix_hpc.workflows.tau2.sessions import EnvSessions

    copied = EnvSessions("telecom", None, 60, 30)
    files = copied.server_files()
    assert {"data/db.toml", "data/user_db.toml", "data/tasks.json",
            "matrix_hpc/workflows/tau2/server.py", "matrix_hpc/workflows/tau2/domains/telecom/tools.py"} <= set(files)
    assert copied.server_argv()[-2:] == ["--data-dir", "data"]  # relative to the server's cwd, scratch
    bound = EnvSessions("telecom", None, 60, 30, data_dir_inside="/data/tau2_telecom")
    assert not [p for p in bound.server_files() if p.startswith("data/")]
    assert bound.server_argv()[-2:] == ["--data-dir", "/data/tau2_telecom"]
