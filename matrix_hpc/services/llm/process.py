"""Supervised server subprocesses that never outlive their owner.

A vLLM server is a tree of processes (API server, engine core, workers). To
stop all of them, whatever happens to the Ray actor that owns it, the actor
starts a small supervisor (this file run as a script, stdlib only) instead of
the server itself:

- the supervisor gets SIGTERM when its parent thread dies (PR_SET_PDEATHSIG),
  so a killed actor still takes its server down;
- the server runs in its own process group, and the supervisor is a child
  subreaper, so orphaned grandchildren are reaped and the group can be
  emptied for certain: SIGTERM, a grace period, then SIGKILL;
- the server itself gets SIGKILL if the supervisor vanishes abruptly.

Example::

    proc = spawn_supervised(["python", "-m", "http.server", "8000"], env, Path("server.log"))
    ...
    stop_supervised(proc, grace_s=10)
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PREFIX = "[matrix_hpc supervisor]"


def _prctl(option: int, value: int) -> None:
    """Linux prctl; silently absent elsewhere (the group kill still applies)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, value, 0, 0, 0)


def set_parent_death_signal(sig: int) -> None:
    _prctl(_PR_SET_PDEATHSIG, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_children() -> dict[int, int]:
    """Reap every exited child (ours or adopted); {pid: exit status}."""
    reaped: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = os.waitstatus_to_exitcode(status)


def empty_group(pgid: int, grace_s: float, reap: bool = False) -> None:
    """SIGTERM a process group, wait up to ``grace_s`` for it to empty, then SIGKILL."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if reap:
            _reap_children()
        if not group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and group_alive(pgid):
        if reap:
            _reap_children()
        time.sleep(0.05)


def supervise(cmd: Sequence[str], grace_s: float) -> int:
    """Run ``cmd`` in its own process group until it exits or we are told to stop."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    stop_signal: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop_signal.append(signum))
    server = subprocess.Popen(
        list(cmd), start_new_session=True, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL)
    )
    print(f"{_PREFIX} pid {os.getpid()} started server pid {server.pid} (process group {server.pid})", flush=True)
    exit_code: int | None = None
    while exit_code is None and not stop_signal:
        exit_code = _reap_children().get(server.pid)
        time.sleep(0.1)
    reason = f"server exited with code {exit_code}" if exit_code is not None else f"got signal {stop_signal[0]}"
    print(f"{_PREFIX} {reason}; stopping process group {server.pid}", flush=True)
    empty_group(server.pid, grace_s, reap=True)
    _reap_children()
    if exit_code is None:
        return 128 + stop_signal[0]
    return exit_code if exit_code >= 0 else 128 - exit_code


CASCADE_ENV = "MATRIX_HPC_PARENT_DEATH_SIGNAL"
# Run at start-up by every Python process of a supervised server tree (via
# PYTHONPATH): each one then gets a signal when its parent dies, so even if
# the supervisor is SIGKILLed (nothing left to empty the group), the tree
# unwinds from the top instead of leaving engine processes orphaned.
_CASCADE_HOOK = f"""# Written by matrix_hpc (services/llm/process.py); safe to delete.
import os as _os
_sig = _os.environ.get({CASCADE_ENV!r})
if _sig:
    try:
        import ctypes as _ctypes
        _ctypes.CDLL(None).prctl(1, int(_sig), 0, 0, 0)
    except Exception:
        pass
    else:
        if _os.getppid() == 1:  # the parent died before the line above: we are an orphan already
            _os._exit(1)
"""


def cascade_env(env: Mapping[str, str], hook_dir: Path, sig: int = signal.SIGTERM) -> dict[str, str]:
    """``env`` plus the parent-death hook for every Python process started with it."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    hook = hook_dir / "sitecustomize.py"
    if not hook.exists() or hook.read_text() != _CASCADE_HOOK:
        hook.write_text(_CASCADE_HOOK)
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), env.get("PYTHONPATH", "")) if p)
    out[CASCADE_ENV] = str(int(sig))
    return out


#: Subdir (next to the server's log) of the hooks on the server's PYTHONPATH.
HOOK_DIR = ".python-hooks"


def spawn_supervised(
    cmd: Sequence[str], env: Mapping[str, str], log_path: Path, grace_s: float = 10.0, cwd: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` under a supervisor; stdout and stderr append to ``log_path``.

    Call it from a thread that lives as long as the server should (the
    parent-death signal fires when the *thread* that forked exits): a thread
    the caller owns for its whole life qualifies, a pool thread does not.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server_env = cascade_env(env, log_path.parent / HOOK_DIR)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            # -I: the script's folder must not shadow stdlib modules on sys.path (and no hook here).
            [sys.executable, "-I", str(Path(__file__).resolve()), f"--grace-s={grace_s}", "--", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
        )


def server_pgid(supervisor: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int | None:
    """Process group of the server the supervisor started (its only child), once it exists."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and supervisor.poll() is None:
        try:
            children = psutil.Process(supervisor.pid).children()
        except psutil.NoSuchProcess:
            return None
        if children:
            return int(children[0].pid)
        time.sleep(0.05)
    return None


def stop_supervised(supervisor: subprocess.Popen[bytes], pgid: int | None, grace_s: float = 10.0) -> None:
    """Stop the supervisor and make sure the server's whole group is gone."""
    if supervisor.poll() is None:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=grace_s + 10.0)
        except subprocess.TimeoutExpired:
            _signal_group(supervisor.pid, signal.SIGKILL)
            supervisor.wait(timeout=10.0)
    if pgid is not None and group_alive(pgid):
        empty_group(pgid, grace_s=1.0)


def main(argv: list[str]) -> int:
    grace_s = 10.0
    while argv and argv[0] != "--":
        arg = argv.pop(0)
        if arg.startswith("--grace-s="):
            grace_s = float(arg.split("=", 1)[1])
        else:
            print(f"{_PREFIX} unknown argument {arg!r}; usage: process.py [--grace-s=S] -- CMD...", file=sys.stderr)
            return 2
    if not argv[1:]:
        print(f"{_PREFIX} no command given; usage: process.py [--grace-s=S] -- CMD...", file=sys.stderr)
        return 2
    return supervise(argv[1:], grace_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
