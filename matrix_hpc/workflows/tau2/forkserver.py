"""The warm tau2 environment server: one process per task, forked from a loaded parent (runs in a sandbox).

Starting :mod:`server` afresh for each task costs a Python start, the
imports and the domain's DB (0.3-0.4 s of CPU and 50-75 MB each); a thousand
concurrent dialogues would need tens of GB. This parent loads all that once,
then forks a child per task: the child starts in about a millisecond and
shares the parent's pages until it writes them. ``gc.freeze()`` after the
load keeps the children's collections from touching (and so copying) the
parent's objects.

The host talks to it over a ``SOCK_SEQPACKET`` unix socket it inherits
(``--control-fd``): a channel with no path, that nothing else on the node
can connect to, which carries fds. One JSON object per packet::

    {"id": n, "op": "fork"} + one fd (SCM_RIGHTS): the task's stream socket
        -> {"id": n, "pid": p}   child p serves :mod:`server`'s line protocol on that socket,
                                 and exits when the host closes its end
    {"id": n, "op": "kill", "pid": p}  -> {"id": n, "ok": true}    (SIGKILL; reaped)
    {"id": n, "op": "ping"}            -> {"id": n, "ok": true, "children": k}
    anything wrong                     -> {"id": n, "error": "what was wrong"}

When the host's end closes, every child is killed and the parent exits.
Standard library and this package only, like :mod:`server`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import select
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from matrix_hpc.workflows.tau2.db import domain_dir_env
from matrix_hpc.workflows.tau2.server import EnvServer, serve

_MAX_PACKET = 65536


class ForkServer:
    def __init__(self, server: EnvServer, control: socket.socket, task_cpu_s: int | None = None) -> None:
        self.server = server
        self.control = control
        self.task_cpu_s = task_cpu_s
        self.children: set[int] = set()

    def run(self) -> None:
        try:
            while True:
                self.reap()
                ready, _, _ = select.select([self.control], [], [], 1.0)
                if not ready:
                    continue
                try:
                    data, fds, _, _ = socket.recv_fds(self.control, _MAX_PACKET, 4)
                except ConnectionResetError:
                    return
                if not data:
                    return  # the host is gone
                try:
                    reply = self.handle(data, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                self.control.send(json.dumps(reply).encode())
        finally:
            for pid in list(self.children):
                self.kill(pid)

    def handle(self, data: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            request = json.loads(data)
            rid = request.get("id")
            op = request.get("op")
        except (ValueError, AttributeError):
            return {"id": None, "error": "a control packet must be a JSON object"}
        if op == "fork":
            if len(fds) != 1:
                return {"id": rid, "error": f"'fork' needs exactly one fd (the task's socket), got {len(fds)}"}
            return {"id": rid, "pid": self.fork(fds[0])}
        if op == "kill":
            pid = request.get("pid")
            if pid not in self.children:
                return {"id": rid, "ok": True, "gone": True}
            self.kill(pid)
            return {"id": rid, "ok": True}
        if op == "ping":
            return {"id": rid, "ok": True, "children": len(self.children), "pid": os.getpid()}
        return {"id": rid, "error": f"unknown op {op!r}; valid ops: fork, kill, ping"}

    def fork(self, fd: int) -> int:
        pid = os.fork()
        if pid == 0:  # the task's process: never returns
            code = 1
            try:
                self.control.close()
                devnull = os.open(os.devnull, os.O_RDWR)  # the parent's stdio pipes are not this task's to use
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                if self.task_cpu_s is not None:  # the task's own CPU limit (the parent's is higher: it lives long)
                    resource.setrlimit(resource.RLIMIT_CPU, (self.task_cpu_s, self.task_cpu_s))
                conn = socket.socket(fileno=os.dup(fd))
                serve(self.server, conn.makefile("rb"), conn.makefile("w", encoding="utf-8"))
                code = 0
            except BaseException:  # noqa: BLE001 - a broken connection ends this task's process, nothing else
                pass
            finally:
                os._exit(code)
        self.children.add(pid)
        return pid

    def kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.children.discard(pid)

    def reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)


def warm_up(domain: str) -> None:
    """Fill the template's lazy caches here, once, so that children share them instead of each filling its own.

    A fresh DB's hash encodes the template's records on first use (about 11 MB per retail task otherwise).
    """
    from matrix_hpc.workflows.tau2.tasks import new_environment

    env = new_environment(domain)
    env.db_hash()
    env.user_db_hash()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.workflows.tau2.forkserver",
                                     description="a warm tau2 environment server forking one process per task")
    parser.add_argument("--domain", required=True, choices=("retail", "airline", "telecom"))
    parser.add_argument("--data-dir", default=None, help="the domain's data folder (default: the usual lookup)")
    parser.add_argument("--control-fd", type=int, required=True, help="the inherited SOCK_SEQPACKET control socket")
    parser.add_argument("--task-cpu-s", type=int, default=None, help="CPU seconds of each task's process (RLIMIT_CPU)")
    args = parser.parse_args(argv)
    if args.data_dir:
        os.environ[domain_dir_env(args.domain)] = args.data_dir
    control = socket.socket(fileno=args.control_fd)
    try:
        server = EnvServer(args.domain)
    except (OSError, ValueError) as e:
        print(f"tau2 fork server: cannot load the {args.domain} data: {e}", file=sys.stderr)
        return 2
    warm_up(args.domain)
    gc.collect()
    gc.freeze()  # the loaded objects: children's collections leave their pages shared
    ForkServer(server, control, args.task_cpu_s).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
