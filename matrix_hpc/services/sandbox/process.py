"""Run one command to completion with a wall-clock limit and output caps.

Shared by every backend: the backend forms the argv, this module runs it in
a new session, reads stdout and stderr separately up to a cap, and on
timeout, overflow or exit kills the whole process group so nothing the
command started keeps running.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matrix_hpc.procs import kill_group

_CHUNK = 64 * 1024
_DRAIN_GRACE_S = 0.5  # after exit, how long leftover writers may keep the pipes open


@dataclass
class ExecResult:
    """Outcome of one command run in a sandbox.

    ``exit_code`` is negative (-signal) when the process was killed by a
    signal, e.g. -9 after a timeout, an output overflow or RLIMIT_CPU.
    """

    exit_code: int  # process exit status; -N when killed by signal N
    stdout: str  # decoded as UTF-8 (invalid bytes replaced), at most the cap
    stderr: str  # same, for stderr
    timed_out: bool = False  # killed because it ran past its wall-clock limit
    output_truncated: bool = False  # killed because stdout or stderr went past the cap
    duration_s: float = 0.0  # wall-clock time of the exec

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_truncated


class _CappedReader:
    def __init__(self, stream: asyncio.StreamReader, cap: int, on_overflow: Any) -> None:
        self.stream, self.cap, self.on_overflow = stream, cap, on_overflow
        self.buf = bytearray()
        self.overflowed = False

    async def run(self) -> None:
        while True:
            chunk = await self.stream.read(_CHUNK)
            if not chunk:
                return
            room = self.cap - len(self.buf)
            self.buf += chunk[: max(room, 0)]
            if len(chunk) > room and not self.overflowed:
                self.overflowed = True
                self.on_overflow()

    def text(self) -> str:
        return bytes(self.buf).decode("utf-8", errors="replace")


async def run_capped(
    argv: Sequence[str],
    *,
    stdin: bytes | None,
    timeout_s: float,
    max_output_bytes: int,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    user: int | None = None,
    pass_fds: Sequence[int] = (),
) -> ExecResult:
    """Run ``argv``; never raises for the command's own failures. ``pass_fds`` stay open in the child."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
        **_as_user(user),
    )
    assert proc.stdout is not None and proc.stderr is not None
    overflow = asyncio.Event()
    out = _CappedReader(proc.stdout, max_output_bytes, overflow.set)
    err = _CappedReader(proc.stderr, max_output_bytes, overflow.set)
    readers = [asyncio.ensure_future(out.run()), asyncio.ensure_future(err.run())]
    if stdin is not None:
        readers.append(asyncio.ensure_future(_feed(proc, stdin)))
    timed_out = await _wait_exit_or_limit(proc, overflow, timeout_s)
    kill_group(proc.pid)  # leftovers of the command, or the command itself on a limit
    await proc.wait()
    await _drain(readers)
    return ExecResult(
        exit_code=proc.returncode if proc.returncode is not None else -signal.SIGKILL,
        stdout=out.text(),
        stderr=err.text(),
        timed_out=timed_out,
        output_truncated=out.overflowed or err.overflowed,
        duration_s=time.monotonic() - t0,
    )


def _as_user(user: int | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command did not read all its input; that is its business


async def _wait_exit_or_limit(proc: asyncio.subprocess.Process, overflow: asyncio.Event, timeout_s: float) -> bool:
    """Wait for exit, overflow or timeout; returns True on timeout."""
    exit_task = asyncio.ensure_future(proc.wait())
    overflow_task = asyncio.ensure_future(overflow.wait())
    done, _ = await asyncio.wait({exit_task, overflow_task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    overflow_task.cancel()
    if not done:
        exit_task.cancel()
        return True
    return False


async def _drain(tasks: Sequence[asyncio.Future[None]]) -> None:
    _, pending = await asyncio.wait(tasks, timeout=_DRAIN_GRACE_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
