"""Client-side routing over LLM replicas, with no proxy hop.

Policy, per request:

1. Sticky: a request carrying a ``sticky_key`` (the task id) goes to the
   replica its key is pinned to, so a multi-turn dialogue keeps reusing the
   replica that holds its prefix cache -- unless that replica is down, was
   already tried by this request, or is overloaded: more outstanding requests
   than ``max_load_factor`` times the average (bounded-load stickiness). Then
   the key is re-pinned to the pick of rule 2.
2. Least outstanding requests among healthy replicas (ties broken at random).
3. Health: a replica that fails with a connection error is marked down and
   skipped until a probe finds it healthy again. When every replica is down
   the least-loaded down one is tried anyway, so a single endpoint that
   blinks does not stall the run.

The router is plain synchronous state, owned by one event loop (one
``LLMClient`` per process); it does no I/O.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass
class Replica:
    """One replica as the router sees it."""

    replica_id: str
    base_url: str
    outstanding: int = 0
    healthy: bool = True


class Router:
    """Picks a replica per request; tracks outstanding requests and health.

    Example::

        router = Router(max_load_factor=1.5)
        router.update({"r0": "http://10.0.0.1:8000", "r1": "http://10.0.0.2:8000"})
        replica = router.pick(sticky_key="task-17")
        router.acquire(replica)
        ...  # send the request
        router.release(replica)
    """

    def __init__(self, max_load_factor: float = 1.5, max_sticky_keys: int = 200_000, seed: int | None = None):
        self.max_load_factor = max_load_factor
        self.max_sticky_keys = max_sticky_keys
        self._replicas: dict[str, Replica] = {}
        self._pins: OrderedDict[str, str] = OrderedDict()
        self._total_outstanding = 0
        self._rng = random.Random(seed)

    # -- replica set ---------------------------------------------------

    def update(self, replicas: Mapping[str, str]) -> None:
        """Replace the replica set with ``{replica_id: base_url}``.

        Replicas that stay keep their outstanding counts. A replica whose URL
        changed was restarted: it comes back healthy at its new address.
        Pins to replicas that left are re-pinned lazily on their next use.
        """
        for replica_id in list(self._replicas):
            if replica_id not in replicas:
                gone = self._replicas.pop(replica_id)
                self._total_outstanding -= gone.outstanding
        for replica_id, base_url in replicas.items():
            known = self._replicas.get(replica_id)
            if known is None:
                self._replicas[replica_id] = Replica(replica_id, base_url.rstrip("/"))
            elif known.base_url != base_url.rstrip("/"):
                known.base_url = base_url.rstrip("/")
                known.healthy = True

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def get(self, replica_id: str) -> Replica | None:
        return self._replicas.get(replica_id)

    def down(self) -> list[Replica]:
        return [r for r in self._replicas.values() if not r.healthy]

    # -- health --------------------------------------------------------

    def mark_down(self, replica_id: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.healthy = False

    def mark_up(self, replica_id: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.healthy = True

    # -- load ----------------------------------------------------------

    def acquire(self, replica: Replica) -> None:
        replica.outstanding += 1
        if self._replicas.get(replica.replica_id) is replica:
            self._total_outstanding += 1

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        # A replica removed by update() while this request ran is no longer counted.
        if self._replicas.get(replica.replica_id) is replica:
            self._total_outstanding -= 1

    # -- picking -------------------------------------------------------

    def pick(self, sticky_key: str | None = None, exclude: Collection[str] = ()) -> Replica | None:
        """The replica for the next attempt of a request, or None if there is none at all.

        ``exclude`` holds replicas this request already failed on; they are
        avoided while any other replica is healthy.
        """
        healthy = [r for r in self._replicas.values() if r.healthy]
        candidates = [r for r in healthy if r.replica_id not in exclude] or healthy
        if not candidates:
            # Everything is down: try one anyway, it doubles as a probe.
            candidates = [r for r in self._replicas.values() if r.replica_id not in exclude]
            candidates = candidates or list(self._replicas.values())
        if not candidates:
            return None
        if sticky_key is None:
            return self._least_loaded(candidates)
        pinned = self._pinned(sticky_key, candidates, len(healthy) or len(candidates))
        if pinned is not None:
            return pinned
        chosen = self._least_loaded(candidates)
        self._pin(sticky_key, chosen.replica_id)
        return chosen

    def forget(self, sticky_key: str) -> None:
        """Drop a pin (e.g. when its task ended)."""
        self._pins.pop(sticky_key, None)

    def pinned_to(self, sticky_key: str) -> str | None:
        return self._pins.get(sticky_key)

    def _pinned(self, sticky_key: str, candidates: list[Replica], n_serving: int) -> Replica | None:
        replica_id = self._pins.get(sticky_key)
        if replica_id is None:
            return None
        replica = self._replicas.get(replica_id)
        if replica is None or replica not in candidates:
            return None
        if replica.outstanding >= self._load_bound(n_serving):
            return None
        self._pins.move_to_end(sticky_key)
        return replica

    def _load_bound(self, n_serving: int) -> int:
        # Bound of consistent hashing with bounded loads: no replica takes
        # more than ceil(c * average) once this request is counted.
        average = (self._total_outstanding + 1) / max(n_serving, 1)
        return max(1, math.ceil(self.max_load_factor * average))

    def _pin(self, sticky_key: str, replica_id: str) -> None:
        self._pins[sticky_key] = replica_id
        self._pins.move_to_end(sticky_key)
        while len(self._pins) > self.max_sticky_keys:
            self._pins.popitem(last=False)

    def _least_loaded(self, candidates: list[Replica]) -> Replica:
        lowest = min(r.outstanding for r in candidates)
        best = [r for r in candidates if r.outstanding == lowest]
        return best[0] if len(best) == 1 else self._rng.choice(best)
