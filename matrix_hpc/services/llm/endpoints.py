"""Where a client finds its replicas.

An :class:`EndpointSource` is a small picklable description sent to worker
processes; in each process the client calls :meth:`EndpointSource.fetch`
(every ``refresh_interval_s`` for dynamic sources) to learn the current
``{replica_id: base_url}`` table.

- :class:`StaticEndpoints`: fixed URLs (an external endpoint, a sim server
  started by hand).
- :class:`RegistryEndpoints`: the replica registry actor of a service
  (``registry.py``); replicas that restart re-register, possibly on a new
  port, and clients pick the new address up on their next poll.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

from matrix_hpc.services.llm.registry import NAMESPACE, ServiceRef


@runtime_checkable
class EndpointSource(Protocol):
    """Picklable source of the replica table."""

    # Seconds between fetches; 0 means the table never changes.
    refresh_interval_s: float

    async def fetch(self) -> tuple[int, dict[str, str]]:
        """(version, {replica_id: base_url}); the version grows when the table changes."""
        ...


def normalize_base_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> the URL that ``/chat/completions`` hangs off."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class StaticEndpoints:
    """A fixed list of OpenAI-compatible base URLs (with or without the ``/v1`` suffix).

    Example::

        source = StaticEndpoints(["http://127.0.0.1:8000", "http://127.0.0.1:8001"])
    """

    refresh_interval_s = 0.0

    def __init__(self, urls: list[str]):
        if not urls:
            raise ValueError("StaticEndpoints needs at least one URL")
        self.urls = [normalize_base_url(u) for u in urls]

    async def fetch(self) -> tuple[int, dict[str, str]]:
        return 0, {url: url for url in self.urls}

    def __repr__(self) -> str:
        return f"StaticEndpoints({self.urls!r})"


class RegistryEndpoints:
    """The replicas registered in the registry actor of ``service`` (needs Ray initialised).

    Example::

        source = RegistryEndpoints(service_handle.ref)
        version, table = await source.fetch()
    """

    def __init__(self, service: ServiceRef, refresh_interval_s: float = 1.0, namespace: str = NAMESPACE):
        self.service = service
        self.refresh_interval_s = refresh_interval_s
        self.namespace = namespace
        self._actor: Any = None  # Any: a Ray actor handle, looked up lazily per process

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_actor": None}

    async def fetch(self) -> tuple[int, dict[str, str]]:
        import ray

        if self._actor is None:
            try:
                self._actor = ray.get_actor(self.service.registry, namespace=self.namespace)
            except ValueError:
                return -1, {}  # not created yet: no replicas
        try:
            version, table = await self._actor.snapshot.remote()
        except ray.exceptions.RayActorError:
            self._actor = None  # the registry went away; look it up again next time
            raise
        return version, {rid: normalize_base_url(url) for rid, url in table.items()}

    def __repr__(self) -> str:
        return f"RegistryEndpoints(service={self.service.name!r}, registry={self.service.registry!r})"


async def wait_for_replicas(source: EndpointSource, count: int, timeout_s: float) -> dict[str, str]:
    """Poll ``source`` until it lists ``count`` replicas; used by tests and service start-up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    table: dict[str, str] = {}
    while loop.time() < deadline:
        _, table = await source.fetch()
        if len(table) >= count:
            return table
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{source!r} listed {len(table)} of {count} replicas after {timeout_s:.0f} s")
