"""supervise(): a background loop that raises is logged, then restarted or
reported; cancelling stops it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from matrix_hpc.background import supervise


async def test_a_crashing_loop_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise OSError("disk full")
        await asyncio.sleep(3600)

    with caplog.at_level(logging.ERROR, logger="matrix_hpc.background"):
        task = supervise(flaky, "sink-flusher", backoff_s=0.01)
        for _ in range(200):
            if len(runs) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(runs) == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "'sink-flusher'" in errors[0].getMessage() and "OSError: disk full" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the traceback is kept


async def test_without_restart_the_owner_hears_of_the_failure() -> None:
    fatal: list[BaseException] = []

    async def broken() -> None:
        raise ValueError("bad state")

    await supervise(broken, "health-watch", restart=False, on_fatal=fatal.append)
    assert [type(e) for e in fatal] == [ValueError]


async def test_max_restarts_bounds_the_retries() -> None:
    runs: list[int] = []
    fatal: list[BaseException] = []

    async def always_fails() -> None:
        runs.append(1)
        raise RuntimeError("no")

    await supervise(always_fails, "x", backoff_s=0.001, max_restarts=2, on_fatal=fatal.append)
    assert len(runs) == 3 and len(fatal) == 1


async def test_a_loop_that_returns_is_not_restarted() -> None:
    runs: list[int] = []

    async def once() -> None:
        runs.append(1)

    await supervise(once, "once")
    assert runs == [1]
