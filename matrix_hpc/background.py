"""Supervised background tasks: the one home for "run this loop for as long
as its owner lives, and never die silently".

A bare ``loop.create_task(forever())`` that raises ends without a log line,
and whatever it kept alive (a sink's flusher, a replica's health watch)
stops with it. :func:`supervise` logs an unexpected exception with the
task's name and then either restarts the loop (after a capped backoff) or
hands the exception to ``on_fatal`` so its owner can fail loudly.

Lives at the package root (imports nothing of matrix_hpc) so that every
layer, the store included, can use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def supervise(
    loop_fn: Callable[[], Awaitable[None]],
    name: str,
    *,
    restart: bool = True,
    on_fatal: Callable[[BaseException], None] | None = None,
    backoff_s: float = 0.5,
    backoff_max_s: float = 30.0,
    max_restarts: int | None = None,
) -> asyncio.Task[None]:
    """Run ``loop_fn()`` as a background task of the running event loop.

    An exception other than cancellation is logged (with traceback and
    ``name``); with ``restart`` the loop starts again after ``backoff_s``
    (doubling up to ``backoff_max_s``), at most ``max_restarts`` times.
    When it will not be restarted, ``on_fatal(exc)`` is called.
    Cancelling the returned task stops it for good.
    """

    async def guard() -> None:
        delay, restarts = backoff_s, 0
        while True:
            try:
                await loop_fn()
                return  # a loop that ends by itself is done
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the point of this module: nothing dies unlogged
                will_restart = restart and (max_restarts is None or restarts < max_restarts)
                log.error("background task %r failed (%s: %s); %s", name, type(e).__name__, e,
                          f"restarting in {delay:.1f} s" if will_restart else "not restarting",
                          exc_info=True)
                if not will_restart:
                    if on_fatal is not None:
                        on_fatal(e)
                    return
                restarts += 1
                await asyncio.sleep(delay)
                delay = min(backoff_max_s, delay * 2)

    return asyncio.get_running_loop().create_task(guard(), name=name)
