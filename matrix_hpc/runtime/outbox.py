"""Batching of hops between processes.

One Ray actor call costs about as much as a thousand in-process hops, so
messages for the same destination are gathered and sent together: at
``batch_size`` messages, or ``delay_s`` after the first one, whichever comes
first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, send: Callable[[list[Any]], Any], batch_size: int, delay_s: float) -> None:
        self._send = send
        self._batch_size = batch_size
        self._delay_s = delay_s
        self._buf: list[Any] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pending: list[Any] = []  # ObjectRefs of recent sends, checked for failures
        self.messages_sent = 0
        self.batches_sent = 0

    def put(self, item: Any) -> None:
        self._buf.append(item)
        if len(self._buf) >= self._batch_size:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        batch, self._buf = self._buf, []
        ref = self._send(batch)
        self.messages_sent += len(batch)
        self.batches_sent += 1
        if ref is not None:
            self._track(ref)

    def _track(self, ref: Any) -> None:
        """Log a failed send (a dead peer); the driver re-admits its tasks."""
        fut = asyncio.ensure_future(_await_quietly(ref))
        self._pending.append(fut)
        if len(self._pending) > 256:
            self._pending = [f for f in self._pending if not f.done()]


async def _await_quietly(ref: Any) -> None:
    try:
        await ref
    except Exception as e:
        log.warning("a batch to a peer failed: %s", e)
