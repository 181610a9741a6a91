"""The driver's watch over its peers: worker and sink actors that Ray
restarts when they die.

A restart is recognised by a new *incarnation* (each actor process names
its own). A restarted worker is reconnected (it lost its peers' handles);
a restarted sink needs no reconnection (Ray handles stay valid across
restarts, and the sink rebuilds its state from disk), but the tasks it may
have buffered are gone. Either way the owner is told at once, through
callbacks, and re-admits what may have been lost.

A slow answer is not a loss: a worker busy with thousands of tasks on a
loaded node answers late, so only a new incarnation counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

WorkerKey = tuple[str, int]  # (placement group, instance)

#: Consecutive failed commits of one sink after which the driver logs an error
#: (the sink retries them itself; its rows stay buffered meanwhile).
COMMIT_FAILURES_LOUD = 2


@dataclass
class PeerEvents:
    """What the watch reports to its owner (the driver)."""

    lost_ids: Callable[[list[str]], None]  # tasks of failed sends between peers
    worker_restarted: Callable[[WorkerKey], None]  # after it was reconnected
    sink_restarted: Callable[[int], None]
    sink_stalled: Callable[[int, str], None]  # (sink, what is wrong): its commits failed too long


@dataclass
class PeerWatch:
    handles: dict[str, list[Any]]  # worker handles per group
    sinks: list[Any]  # sink handles
    connect_args: tuple[Any, ...]  # what Worker.connect takes: (router, handles, sinks)
    events: PeerEvents
    worker_incarnations: dict[WorkerKey, str] = field(default_factory=dict)
    sink_incarnations: list[str] = field(default_factory=list)
    commit_stall_timeout_s: float = 600.0  # a sink failing every commit this long fails the run (0: never)
    ping_timeout_s: float = 60.0
    _wake_workers: asyncio.Event = field(default_factory=asyncio.Event)
    _wake_sinks: asyncio.Event = field(default_factory=asyncio.Event)
    _loud: dict[int, int] = field(default_factory=dict)  # sink -> failures already logged
    _failing_since: dict[int, float] = field(default_factory=dict)  # sink -> first failed commit of a streak

    def wake(self) -> None:
        """Check now, not at the next interval (e.g. a poller lost its sink)."""
        self._wake_workers.set()
        self._wake_sinks.set()

    @staticmethod
    async def _sleep(wake: asyncio.Event, interval_s: float) -> None:
        try:
            await asyncio.wait_for(wake.wait(), interval_s)
        except TimeoutError:
            pass
        wake.clear()

    # -- workers ----------------------------------------------------------
    async def watch_workers(self, interval_s: float, after_check: Callable[[], None] = lambda: None) -> None:
        keys = [(g, i) for g, hs in self.handles.items() for i in range(len(hs))]
        while True:
            await self._sleep(self._wake_workers, interval_s)
            await asyncio.gather(*[self._check_worker(key) for key in keys])  # one slow worker delays none
            after_check()

    async def _check_worker(self, key: WorkerKey) -> None:
        worker = self.handles[key[0]][key[1]]
        try:
            incarnation, lost = await asyncio.wait_for(worker.heartbeat.remote(), self.ping_timeout_s)
        except Exception:  # busy, or dead and restarting: judged by the next heartbeat
            return
        if lost:
            self.events.lost_ids(lost)
        if incarnation == self.worker_incarnations.get(key):
            return
        try:
            self.worker_incarnations[key] = await worker.connect.remote(*self.connect_args)
        except Exception as e:  # died again while connecting: the next heartbeat sees the next incarnation
            log.warning("worker %s/%d restarted but could not be reconnected yet (%s); retrying", key[0], key[1],
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return
        log.warning("worker %s/%d restarted (incarnation %s); reconnected, re-admitting the tasks it may have held",
                    key[0], key[1], incarnation)
        self.events.worker_restarted(key)

    # -- sinks ------------------------------------------------------------
    async def watch_sinks(self, interval_s: float, after_check: Callable[[], None] = lambda: None) -> None:
        while True:
            await self._sleep(self._wake_sinks, interval_s)
            await asyncio.gather(*[self._check_sink(n) for n in range(len(self.sinks))])
            after_check()

    async def _check_sink(self, n: int) -> None:
        try:
            health: dict[str, Any] = await asyncio.wait_for(self.sinks[n].health.remote(), self.ping_timeout_s)
        except Exception:  # restarting: the next check sees the new incarnation
            return
        self._report_commit_failures(n, health)
        incarnation = str(health.get("incarnation"))
        if incarnation == self.sink_incarnations[n]:
            return
        self.sink_incarnations[n] = incarnation
        log.warning("sink %d restarted (incarnation %s); re-admitting the tasks routed to it that it had not "
                    "acknowledged", n, incarnation)
        self.events.sink_restarted(n)

    def _report_commit_failures(self, n: int, health: dict[str, Any]) -> None:
        failures = int(health.get("commit_failures") or 0)  # consecutive
        if failures == 0:
            self._failing_since.pop(n, None)
            if self._loud.pop(n, 0):
                log.warning("sink %d commits again", n)
            return
        since = self._failing_since.setdefault(n, time.time())
        if failures >= COMMIT_FAILURES_LOUD and failures != self._loud.get(n):
            log.error("sink %d: %d commits in a row failed (last error: %s); %s rows wait in its buffer and are "
                      "retried. Check the output filesystem (space, quota, permissions).", n, failures,
                      health.get("last_error"), health.get("rows_buffered", "?"))
            self._loud[n] = failures
        stalled_s = time.time() - since
        if self.commit_stall_timeout_s > 0 and stalled_s > self.commit_stall_timeout_s:
            self.events.sink_stalled(n, f"{failures} commits in a row failed over {stalled_s:.0f} s "
                                        f"(run.commit_stall_timeout_s={self.commit_stall_timeout_s:g}); last error: "
                                        f"{health.get('last_error')}")
