"""Batching of hops between processes.

One Ray actor call costs about as much as a thousand in-process hops, so
messages for the same destination are gathered and sent together: at
``batch_size`` messages, or ``delay_s`` after the first one, whichever comes
first.

A batch whose send fails (the peer died, is restarting, or refused it) is
handed to ``on_failed`` with the error, so its owner can re-admit the tasks
at once instead of waiting for ``run.task_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # at most one log line per outbox this often about failed sends

#: Called with a batch that could not be delivered and the error.
OnFailed = Callable[[list[Any], BaseException], None]


class Outbox:
    def __init__(self, send: Callable[[Any], Any], batch_size: int, delay_s: float,
                 on_failed: OnFailed | None = None, name: str = "peer",
                 encode: Callable[[list[Any]], Any] | None = None) -> None:
        self._send = send
        self._encode = encode  # what ``send`` gets of a batch (e.g. the batch pickled); None: the list itself
        self._batch_size = batch_size
        self._delay_s = delay_s
        self._on_failed = on_failed
        self.name = name  # for log lines: which destination a failed batch was for
        self._buf: list[Any] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Future[None]] = set()  # recent sends, checked for failures
        self.messages_sent = 0
        self.batches_sent = 0
        self.batches_failed = 0
        self._unlogged = 0  # failed messages not yet in a log line
        self._next_log_at = 0.0

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
        self.messages_sent += len(batch)
        self.batches_sent += 1
        try:
            ref = self._send(batch if self._encode is None else self._encode(batch))
        except Exception as e:  # e.g. the handle cannot submit: same as a failed send
            self._failed(batch, e)
            return
        if ref is not None:
            self._track(ref, batch)

    def _track(self, ref: Any, batch: list[Any]) -> None:
        fut = asyncio.ensure_future(self._await(ref, batch))
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    async def _await(self, ref: Any, batch: list[Any]) -> None:
        try:
            await ref
        except Exception as e:
            self._failed(batch, e)

    def _failed(self, batch: list[Any], error: BaseException) -> None:
        self.batches_failed += 1
        self._unlogged += len(batch)
        now = time.monotonic()
        if now >= self._next_log_at:  # a dead peer fails every batch: one line per LOG_EVERY_S says it all
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            log.warning("%d message(s) to %s failed (%s: %s)%s", self._unlogged, self.name, type(error).__name__,
                        first_line, "; they are re-admitted" if self._on_failed else "")
            self._unlogged, self._next_log_at = 0, now + LOG_EVERY_S
        if self._on_failed is not None:
            self._on_failed(batch, error)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Send what is buffered and wait (at most ``timeout_s``) for every send to settle."""
        self.flush()
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout_s)
