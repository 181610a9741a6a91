"""Start the LLM service a run asked for, and hand workers what they need to reach it.

``start_llm_service(conf, run_dir)`` runs in the driver. The returned
:class:`LLMService` gives a picklable :class:`LLMClientFactory` that each
worker process calls once to build its single :class:`LLMClient`.

Every server this starts (sim or vLLM) asks for a key made for it here
(``new_api_key``); the factory carries it to the workers (pickled by Ray,
inside the token-authenticated cluster), the replicas get it through their
environment or actor arguments, never a command line or a log.

- ``sim``: simulated replicas. Under Ray, each is a Ray actor serving HTTP
  from a thread and registered in the replica registry (an actor that dies
  is restarted, serves on a new port and re-registers). Without Ray, child
  processes reached through static URLs.
- ``openai``: an external endpoint; the key comes from the environment
  variable named in the config and is never logged.
- ``vllm``: vLLM replicas on Ray, started by ``vllm_replica.start_vllm_service``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matrix_hpc.services.llm.client import LLMClient
from matrix_hpc.services.llm.config import ClientConf, LLMConf, SimConf
from matrix_hpc.services.llm.contract import Secret
from matrix_hpc.services.llm.endpoints import EndpointSource, RegistryEndpoints, StaticEndpoints
from matrix_hpc.services.llm.registry import NAMESPACE, ServiceRef, config_digest, get_or_create_registry

log = logging.getLogger(__name__)


class LLMClientFactory:
    """Picklable recipe of a worker's :class:`LLMClient`; call it once per process."""

    def __init__(self, endpoints: EndpointSource, conf: ClientConf, model: str | None, api_key: Secret):
        self.endpoints = endpoints
        self.conf = conf
        self.model = model
        self.api_key = api_key

    def __call__(self) -> LLMClient:
        return LLMClient(self.endpoints, self.conf, self.model, self.api_key)

    def __repr__(self) -> str:
        return f"LLMClientFactory({self.endpoints!r}, model={self.model!r}, api_key={self.api_key!r})"


class LLMService:
    """A running LLM service (or an external endpoint) of one run.

    Example::

        service = start_llm_service(LLMConf(backend="sim"), Path("runs/x"))
        make_client = service.client_factory()    # send this to the workers
        client = make_client()                     # in a worker: its one client
        ...
        service.stop()
    """

    def __init__(
        self,
        conf: LLMConf,
        endpoints: EndpointSource | None,
        model: str | None = None,
        api_key: Secret | None = None,
        stoppers: list[Callable[[], None]] | None = None,
    ):
        self.conf = conf
        self._endpoints = endpoints
        self.model = model
        self._api_key = api_key or Secret(None)
        self._stoppers = stoppers or []

    def endpoint_source(self) -> EndpointSource:
        if self._endpoints is None:
            raise RuntimeError("llm.backend is 'none': this run has no LLM; set llm=sim, llm=vllm or llm=openai")
        return self._endpoints

    def client_factory(self) -> LLMClientFactory | None:
        """The per-process client recipe, or None when the run has no LLM."""
        if self._endpoints is None:
            return None
        client_conf = self.conf.client
        if self.conf.backend == "openai":
            client_conf = dataclasses.replace(client_conf, dialect=self.conf.openai.dialect)
        return LLMClientFactory(self._endpoints, client_conf, self.model, self._api_key)

    def stop(self) -> None:
        """Stop what this service started (idempotent); external endpoints are left alone."""
        while self._stoppers:
            stopper = self._stoppers.pop()
            try:
                stopper()
            except Exception as exc:  # stopping must go on for the other parts
                log.warning("stopping part of the LLM service failed: %s", exc)

    def __repr__(self) -> str:
        return f"LLMService(backend={self.conf.backend!r}, endpoints={self._endpoints!r}, model={self.model!r})"


def start_llm_service(conf: LLMConf, run_dir: Path) -> LLMService:
    """Start (or point at) the LLM backend ``conf.backend`` for a run whose files live in ``run_dir``."""
    log_dir = Path(run_dir) / "llm"
    if conf.backend == "none":
        return LLMService(conf, None)
    start = BACKENDS.get(conf.backend)
    if start is None:
        raise ValueError(f"unknown llm.backend {conf.backend!r}; valid: none, {', '.join(BACKENDS)}")
    log_dir.mkdir(parents=True, exist_ok=True)
    service = start(conf, Path(run_dir))
    (log_dir / "service.json").write_text(json.dumps({"backend": conf.backend, "endpoints": repr(service._endpoints),
                                                      "model": service.model}) + "\n")
    return service


def read_api_key(env_var: str) -> Secret:
    """The API key from ``env_var`` ('' = no key); a missing variable is an error that names it."""
    if not env_var:
        return Secret(None)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_var):  # a key pasted here must not reach a log
        raise RuntimeError("llm.openai.api_key_env must be the NAME of an environment variable holding the key "
                           "(e.g. OPENAI_API_KEY), not the key itself; export the key and name its variable")
    value = os.environ.get(env_var)
    if not value:
        raise RuntimeError(
            f"environment variable {env_var} is not set; export it with your API key "
            "(or set llm.openai.api_key_env='' for an endpoint without a key)"
        )
    return Secret(value)


def _external(conf: LLMConf, run_dir: Path) -> LLMService:
    endpoints = StaticEndpoints([conf.openai.base_url])
    return LLMService(conf, endpoints, conf.openai.model, read_api_key(conf.openai.api_key_env))


# -- sim -------------------------------------------------------------------------


def _start_sim(conf: LLMConf, run_dir: Path) -> LLMService:
    import ray

    if ray.is_initialized():
        return _start_sim_actors(conf)
    return _start_sim_processes(conf, run_dir / "llm")


def _replica_conf(conf: SimConf, index: int) -> SimConf:
    # Each replica draws its own faults; a fixed port becomes port + index.
    return dataclasses.replace(conf, seed=conf.seed + index, port=conf.port + index if conf.port else 0)


def _start_sim_processes(conf: LLMConf, log_dir: Path) -> LLMService:
    from matrix_hpc.services.llm.sim_server import SimServerProcess, new_api_key

    api_key = new_api_key()
    servers = []
    try:
        for i in range(conf.sim.num_replicas):
            servers.append(SimServerProcess(_replica_conf(conf.sim, i), log_path=log_dir / f"sim-{i}.log",
                                            api_key=api_key).start())
    except Exception:
        for server in servers:
            server.stop()
        raise
    endpoints = StaticEndpoints([s.url for s in servers])
    return LLMService(conf, endpoints, conf.sim.model, api_key=api_key, stoppers=[s.stop for s in servers])


class SimReplicaActor:
    """A sim replica inside a Ray actor: serves from a thread, registers itself on (re)start."""

    def __init__(self, conf: SimConf, service: ServiceRef, replica_id: str, api_key: Secret):
        import ray

        from matrix_hpc.services.llm.sim_server import SimServerThread

        node_ip = str(ray.util.get_node_ip_address())
        advertise = node_ip if conf.host in ("0.0.0.0", "::") else conf.host
        self.server = SimServerThread(conf, advertise_host=advertise, api_key=api_key)
        self.replica_id = replica_id
        self.registry = get_or_create_registry(service)
        meta = {"backend": "sim", "pid": os.getpid(), "node": node_ip}
        ray.get(self.registry.register.remote(replica_id, self.server.url, meta))

    def url(self) -> str:
        return self.server.url

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        return self.server.stats()

    def stop(self) -> None:
        import ray

        ray.get(self.registry.unregister.remote(self.replica_id))
        self.server.stop()


def sim_service_ref(conf: LLMConf) -> ServiceRef:
    """The sim service's name and config digest (names its registry and actors)."""
    return ServiceRef(conf.service, config_digest({"backend": "sim", "sim": dataclasses.asdict(conf.sim)}))


def sim_actor_name(service: ServiceRef, index: int) -> str:
    return service.actor("sim", index)


def new_sim_actor(conf: SimConf, ref: ServiceRef, index: int, replica_id: str, api_key: Secret) -> Any:
    """Create sim replica actor ``index`` of ``ref`` (it serves and registers as it starts);
    detached for a deployed service. Any: a Ray actor handle."""
    import ray

    # num_cpus=0: the sim is light and must not take CPU slots from agents on small machines.
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)(SimReplicaActor)  # type: ignore[call-overload]
    options: dict[str, Any] = {"name": sim_actor_name(ref, index), "namespace": NAMESPACE}
    if ref.detached:  # `serve up`: outlives the command that made it
        options["lifetime"] = "detached"
    return actor_cls.options(**options).remote(conf, ref, replica_id, api_key)


def _start_sim_actors(conf: LLMConf) -> LLMService:
    import ray

    from matrix_hpc.services.llm.sim_server import new_api_key

    ref, api_key = sim_service_ref(conf), new_api_key()
    registry = get_or_create_registry(ref)  # here first: the registry is this driver's, and a conflict stops us now
    actors = [new_sim_actor(_replica_conf(conf.sim, i), ref, i, f"sim-{i}", api_key)
              for i in range(conf.sim.num_replicas)]
    ray.get([a.url.remote() for a in actors])  # raises here if a replica cannot start
    _drop_stale_replicas(registry, {f"sim-{i}" for i in range(conf.sim.num_replicas)})

    def stop() -> None:
        for actor in actors:
            try:
                ray.get(actor.stop.remote(), timeout=10)
            finally:
                ray.kill(actor, no_restart=True)
        ray.kill(registry, no_restart=True)

    endpoints = RegistryEndpoints(ref, refresh_interval_s=conf.client.refresh_interval_s)
    return LLMService(conf, endpoints, conf.sim.model, api_key=api_key, stoppers=[stop])


def _drop_stale_replicas(registry: Any, current: set[str]) -> None:
    """Forget replicas registered before this service's own (none unless something else registered there)."""
    import ray

    _, table = ray.get(registry.snapshot.remote())
    for replica_id in set(table) - current:
        ray.get(registry.unregister.remote(replica_id))


# -- vllm ------------------------------------------------------------------------


def _start_vllm(conf: LLMConf, run_dir: Path) -> LLMService:
    from matrix_hpc.services.llm.vllm_conf import as_vllm_conf
    from matrix_hpc.services.llm.vllm_replica import start_vllm_service

    vllm_conf = as_vllm_conf(conf.vllm)
    if conf.service != "default":  # llm.service names every backend's registry
        vllm_conf = dataclasses.replace(vllm_conf, service=conf.service)
    handle = start_vllm_service(vllm_conf, run_dir)
    endpoints = RegistryEndpoints(handle.ref, refresh_interval_s=conf.client.refresh_interval_s)
    return LLMService(conf, endpoints, handle.model_name, api_key=handle.api_key, stoppers=[handle.stop])


# -- deployed ------------------------------------------------------------------------


def _attach_deployed(conf: LLMConf, run_dir: Path) -> LLMService:
    """``llm=deployed llm.name=NAME``: the service `matrix-hpc serve up` deployed; nothing started, nothing
    stopped at the run's end. A name not deployed fails here, before any task, naming the deployed ones."""
    from matrix_hpc.services.llm.deploy import attach_service

    endpoints, model, api_key, client = attach_service(conf.name, conf.client)
    return LLMService(dataclasses.replace(conf, client=client), endpoints, model, api_key=api_key)


#: llm.backend -> what starts it (or points at it) for a run whose files live in run_dir.
BACKENDS: dict[str, Callable[[LLMConf, Path], LLMService]] = {
    "deployed": _attach_deployed,
    "openai": _external,
    "sim": _start_sim,
    "vllm": _start_vllm,
}
