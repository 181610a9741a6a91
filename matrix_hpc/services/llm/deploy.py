"""Named LLM services that outlive a run (``matrix-hpc serve up|status|down|check``; docs/serve.md).

A deployed service NAME is a detached registry actor ``matrix_hpc/llm-service-NAME``
(a :class:`DeployedRegistry`: the replica table clients poll, plus the deployed
config) and detached replica actors ``llm-replica-NAME-<n>`` (the same sim and
vLLM replica actors a run starts, ``n`` never reused). The name is the
identity: ``serve up`` on a deployed name applies the new config to it.

- Same engine config, another replica count: replicas are added, or the
  newest ones removed (unregistered first, so clients stop sending to it within
  ``llm.client.refresh_interval_s``; drained; then stopped).
- Another engine config (model, engine arguments, backend): each old replica is
  replaced in turn, the new one serving before the old one leaves (rolling;
  never fewer than the wanted count serve, the cluster needs room for one more).

The service's API key is a 0600 file (``key_path``, chosen by the caller: the
cluster dir) whose path the registry records; a run attaching by name
(``llm=deployed``, :func:`attach_service`) reads it there. The key itself
is in no actor name, argument list, log or record.

Example (Ray initialised, connected to a cluster that outlives this process)::

    deploy_service(LLMConf(backend="sim", name="teacher"), key_path, files_dir)
    service = attach_service("teacher", ClientConf())  # in a run: an LLMService whose stop() leaves it up
    undeploy_service("teacher")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matrix_hpc.services.llm.config import ClientConf, LLMConf
from matrix_hpc.services.llm.contract import Secret
from matrix_hpc.services.llm.registry import (
    DEPLOYED_REGISTRY_PREFIX,
    DEPLOYED_REPLICA_PREFIX,
    NAMESPACE,
    ReplicaRegistry,
    ServiceRef,
    config_digest,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
DEPLOYABLE = ("sim", "vllm", "openai")
#: How long a removed replica may take to finish its in-flight requests before it is stopped anyway
#: (requests still running then fail with a connection error and the clients retry them elsewhere).
DRAIN_TIMEOUT_S = 60.0


class ServeError(RuntimeError):
    """A user-facing error of deployed services: the message says what to do (printed without a traceback)."""


class ServiceNotDeployed(ServeError):
    """A run or command named a service that is not deployed on this Ray cluster."""


class DeployError(ServeError):
    """``serve up`` cannot apply the config (bad name, bad backend, a replica that does not start)."""


def check_name(name: str) -> str:
    if not name or not NAME_RE.fullmatch(name):
        raise DeployError(f"llm.name={name!r} must be a service name: 1-63 letters, digits, '_', '.', '-', "
                          "starting with a letter or digit (e.g. llm.name=teacher70b)")
    return name


def deployed_ref(name: str) -> ServiceRef:
    return ServiceRef(check_name(name), "", detached=True)


class DeployedRegistry(ReplicaRegistry):
    """The replica table of a deployed service, and its deployed config (the ``serve up`` record).

    ``record`` is plain data without secrets: backend, model, dialect, the
    engine config and its digest, the wanted replica count, the key file's
    path, and ``members`` (replica id -> actor name, engine digest, state).

    It survives its own death: every change is written to ``state_path`` (JSON, 0600, in the
    service's dir on the cluster's shared filesystem) before the call returns, and Ray restarts the
    actor (:func:`registry_actor`: ``max_restarts=-1``, calls retried), which reads it back. Its table
    version goes on counting up from the saved one, so clients see the restored table as news.
    """

    def __init__(self, state_path: str = "") -> None:
        super().__init__(digest="", owner_job="")
        self._record: dict[str, Any] = {}
        self._registrations: dict[str, int] = {}
        self._state_path = Path(state_path) if state_path else None
        self._restored = 0  # how often this registry was rebuilt from its file (its actor restarted)
        if self._state_path is not None and self._state_path.exists():
            saved = json.loads(self._state_path.read_text())
            self._record, self._replicas = saved["record"], saved["replicas"]
            self._registrations, self._version = saved["registrations"], saved["version"] + 1
            self._restored = saved.get("restored", 0) + 1
            log.warning("llm service registry restarted: restored %d replica(s) and the record from %s",
                        len(self._replicas), self._state_path)
            self._save()

    def _save(self) -> None:
        if self._state_path is not None:
            write_private(self._state_path, json.dumps({
                "record": self._record, "replicas": self._replicas, "registrations": self._registrations,
                "version": self._version, "restored": self._restored}))

    def register(self, replica_id: str, base_url: str, meta: dict[str, Any] | None = None) -> int:
        self._registrations[replica_id] = self._registrations.get(replica_id, 0) + 1
        version = super().register(replica_id, base_url, meta)
        self._save()
        return version

    def unregister(self, replica_id: str) -> int:
        version = super().unregister(replica_id)
        self._save()
        return version

    def record(self) -> dict[str, Any]:
        return self._record

    def set_record(self, record: dict[str, Any]) -> None:
        self._record = record
        self._save()

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Registered replicas: {id: {base_url, meta, since, registrations}}."""
        return {rid: {**r, "registrations": self._registrations.get(rid, 0)} for rid, r in self._replicas.items()}

    def forget(self, replica_id: str) -> None:
        self._registrations.pop(replica_id, None)
        self._save()

    def info(self) -> dict[str, Any]:
        """Where the registry runs and how often it was rebuilt (for ``serve status`` and tests)."""
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "restored": self._restored}


def registry_actor(name: str, state_path: Path) -> Any:  # Any: a Ray actor handle
    """The registry actor of the deployed service ``name``, made if absent. Ray restarts it whenever
    its process or node dies, and retries the calls made meanwhile, so clients and replicas wait for
    it instead of failing (a retried call sets the same value again; only a replica's registration
    count, shown as its restarts, can then be one too high)."""
    import ray

    actor_cls: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(
        DeployedRegistry)  # Any: Ray's actor class wrapper
    return actor_cls.options(name=deployed_ref(name).registry, namespace=NAMESPACE, lifetime="detached",
                             get_if_exists=True).remote(str(state_path))


# -- key files -----------------------------------------------------------------------------


def ensure_key(path: Path, value: str | None = None) -> Secret:
    """The service's key in ``path`` (0600): written (``value``, or a new random 256-bit key) when
    ``value`` is given or no file exists yet, else read (:func:`write_private`). (The cluster package
    has the same for Ray's token, but services sit below it in the layering.)"""
    if value is None and (path.exists() or path.is_symlink()):
        return read_key(path)
    write_private(path, value if value is not None else secrets.token_urlsafe(32))
    return read_key(path)


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path`` (0600 from its first byte, under a private temporary name renamed into
    place: never readable by others nor half-written)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_key(path: Path) -> Secret:
    """The key in ``path``; refused when it is a link, not ours, readable by others, or missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ServiceNotDeployed(f"the key file {path} of this service is missing; deploy it again with "
                                 "`matrix-hpc serve up`") from None
    except OSError as e:
        raise DeployError(f"cannot open the service key file {path} ({e.strerror}); it must be a regular file "
                          "of yours, mode 0600: remove it and `serve up` again") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise DeployError(f"service key file {path} must be a regular file of yours with mode 0600 (it is "
                              f"{stat.filemode(st.st_mode)}, uid {st.st_uid}); remove it and `serve up` again")
        return Secret(f.read().strip() or None)


# -- what a config deploys --------------------------------------------------------------------


@dataclass
class Spec:
    """The parts of an ``LLMConf`` a deployment is made of."""

    backend: str
    engine: dict[str, Any]  # the backend's config without the replica count
    replicas: int
    model: str
    dialect: str
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = config_digest({"backend": self.backend, "engine": self.engine})


def spec_of(conf: LLMConf) -> Spec:
    if conf.backend == "sim":
        engine = {k: v for k, v in dataclasses.asdict(conf.sim).items() if k != "num_replicas"}
        return Spec("sim", engine, conf.sim.num_replicas, conf.sim.model, "vllm")
    if conf.backend == "vllm":
        from matrix_hpc.services.llm.vllm_conf import as_vllm_conf

        vllm = as_vllm_conf(conf.vllm)
        engine = {k: v for k, v in dataclasses.asdict(vllm).items() if k not in ("num_replicas", "env", "service")}
        engine["env_keys"] = sorted(vllm.env)  # env values may be secrets: only their names go in the record
        engine["env_digest"] = config_digest(dict(vllm.env))
        return Spec("vllm", engine, vllm.num_replicas, vllm.model_name, "vllm")
    if conf.backend == "openai":
        engine = {"base_url": conf.openai.base_url, "model": conf.openai.model, "api_key_env": conf.openai.api_key_env}
        return Spec("openai", engine, 1, conf.openai.model, conf.openai.dialect)
    raise DeployError(f"llm={conf.backend} cannot be deployed; deployable backends: {', '.join(DEPLOYABLE)}")


# -- serve up ------------------------------------------------------------------------------


@dataclass
class DeployReport:
    name: str
    created: bool  # a new service (else an update)
    started: list[str]  # replica ids started
    removed: list[str]  # replica ids drained and stopped
    replicas: list[str]  # replica ids serving now

    def __str__(self) -> str:
        verb = "deployed" if self.created else "updated"
        return (f"llm service {self.name!r} {verb}: {len(self.replicas)} replica(s) {', '.join(self.replicas)}"
                f"; started {', '.join(self.started) or 'none'}; removed {', '.join(self.removed) or 'none'}")


def deploy_service(conf: LLMConf, key_path: Path, files_dir: Path) -> DeployReport:
    """Deploy ``conf`` as the service ``conf.name`` on the connected Ray cluster, or apply it to the
    service of that name (add/remove replicas, or replace them one at a time when the engine changed).
    Server logs go to ``files_dir/logs``."""
    import ray

    ref = deployed_ref(conf.name)
    spec = spec_of(conf)
    scale = conf.autoscale
    if scale.max_replicas and spec.backend != "openai":
        spec.replicas = max(scale.min_replicas, min(scale.max_replicas, spec.replicas))
    api_key = _service_key(conf, key_path)
    from matrix_hpc.services.llm.autoscale import start_autoscaler, stop_autoscaler

    stop_autoscaler(ref.name)  # one writer of the record at a time: it starts again below
    registry = registry_actor(ref.name, registry_state_path(files_dir))
    record: dict[str, Any] = ray.get(registry.record.remote())
    created = not record
    record.setdefault("members", {})
    record.setdefault("next_index", 0)
    record.update(name=ref.name, backend=spec.backend, model=spec.model, dialect=spec.dialect, engine=spec.engine,
                  digest=spec.digest, replicas=spec.replicas, key_path=str(key_path),
                  log_dir=str(Path(files_dir) / "logs"), state_path=str(registry_state_path(files_dir)),
                  autoscale=dataclasses.asdict(scale) if scale.max_replicas and spec.backend != "openai" else None,
                  updated=time.time())
    record.setdefault("created", record["updated"])
    ray.get(registry.set_record.remote(record))
    report = DeployReport(ref.name, created, [], [], [])
    deployer = Deployer(ref, registry, record, conf, api_key, Path(files_dir), conf.client.refresh_interval_s)
    members: dict[str, Any] = record["members"]
    stale = [rid for rid, m in members.items() if m["digest"] != spec.digest]
    for rid in stale:  # rolling: the new one serves before the old one goes
        if sum(m["digest"] == spec.digest for m in members.values()) < spec.replicas:
            report.started.append(deployer.add())
        deployer.remove(rid)
        report.removed.append(rid)
    current = [rid for rid, m in members.items() if m["digest"] == spec.digest]
    while len(current) < spec.replicas:
        current.append(deployer.add())
        report.started.append(current[-1])
    while len(current) > spec.replicas:
        rid = current.pop()  # the newest goes first
        deployer.remove(rid)
        report.removed.append(rid)
    report.replicas = sorted(members, key=replica_index)
    if record["autoscale"]:
        start_autoscaler(conf, api_key, Path(files_dir))
    return report


def registry_state_path(files_dir: Path) -> Path:
    """Where the registry of the service whose dir is ``files_dir`` keeps its state."""
    return Path(files_dir).resolve() / "registry.json"


def replica_index(replica_id: str) -> int:
    return int(replica_id.rsplit("-", 1)[1])


def _service_key(conf: LLMConf, key_path: Path) -> Secret:
    if conf.backend == "openai":  # a proxy to a hosted API: its key, taken from the environment once, here
        from matrix_hpc.services.llm.service import read_api_key

        return ensure_key(key_path, read_api_key(conf.openai.api_key_env).get() or "")
    return ensure_key(key_path)


class Deployer:
    """Adds and removes replicas of one service, saving the record after each step
    (a ``serve up`` that fails halfway leaves a record that says what runs)."""

    def __init__(self, ref: ServiceRef, registry: Any, record: dict[str, Any], conf: LLMConf, api_key: Secret,
                 files_dir: Path, refresh_interval_s: float):
        self.ref, self.registry, self.record, self.conf = ref, registry, record, conf
        self.api_key, self.files_dir, self.refresh_interval_s = api_key, files_dir, refresh_interval_s

    def _save(self) -> None:
        import ray

        ray.get(self.registry.set_record.remote(self.record))

    def add(self) -> str:
        import ray

        index = self.record["next_index"]
        self.record["next_index"] = index + 1
        replica_id = f"{self.ref.name}-{index}"
        actor_name = self.ref.actor(self.conf.backend, index)
        member = {"actor": actor_name if self.conf.backend != "openai" else "", "digest": self.record["digest"],
                  "backend": self.conf.backend, "state": "starting", "index": index}
        self.record["members"][replica_id] = member
        self._save()
        try:
            self._start(index, replica_id)
        except BaseException:
            self._stop_actor(member)
            self.record["members"].pop(replica_id, None)
            self._save()
            ray.get(self.registry.unregister.remote(replica_id))
            raise
        member["state"] = "running"
        self._save()
        log.info("llm service %s: replica %s serving", self.ref.name, replica_id)
        return replica_id

    def _start(self, index: int, replica_id: str) -> None:
        import ray

        backend = self.conf.backend
        if backend == "openai":
            meta = {"backend": "openai", "node": "", "external": True}
            ray.get(self.registry.register.remote(replica_id, self.conf.openai.base_url, meta))
            return
        if backend == "sim":
            from matrix_hpc.services.llm.service import _replica_conf, new_sim_actor

            sim = _replica_conf(self.conf.sim, index)
            if sim.host == "127.0.0.1" and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
                sim = dataclasses.replace(sim, host="0.0.0.0")  # reachable from the other nodes (it asks for the key)
            actor = new_sim_actor(sim, self.ref, index, replica_id, self.api_key)
            ray.get(actor.url.remote())  # raises here if the replica cannot start; it registered itself
            return
        from matrix_hpc.services.llm.vllm_replica import ReplicaStartError, new_replica_actor, prepare_vllm_conf

        vllm, use_gpu, host = prepare_vllm_conf(dataclasses.replace(self.conf.vllm, service=self.ref.name))
        # The replica logs to <files_dir>/logs/vllm-<name>-<index>.log.
        actor = new_replica_actor(vllm, index, self.files_dir.resolve(), use_gpu, host, self.ref, self.api_key)
        try:
            ray.get(actor.start.remote(), timeout=vllm.startup_timeout_s + 60)
        except ray.exceptions.GetTimeoutError:
            raise DeployError(f"vLLM replica {replica_id} was not serving {vllm.startup_timeout_s + 60:.0f} s after "
                              "it was placed (no room on the cluster? see `matrix-hpc cluster status`); raise "
                              "llm.vllm.startup_timeout_s or free resources") from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ReplicaStartError):  # its message (with the log's tail) is the useful part
                raise DeployError(str(exc.cause)) from None
            raise

    def remove(self, replica_id: str) -> None:
        """Unregister (clients stop choosing it at their next refresh), drain, stop."""
        import ray

        member = self.record["members"][replica_id]
        member["state"] = "draining"
        self._save()
        ray.get(self.registry.unregister.remote(replica_id))
        self._drain(member)
        self._stop_actor(member)
        ray.get(self.registry.forget.remote(replica_id))
        del self.record["members"][replica_id]
        self._save()
        log.info("llm service %s: replica %s removed", self.ref.name, replica_id)

    def _drain(self, member: dict[str, Any]) -> None:
        import ray

        # Clients refresh their table every refresh_interval_s: after two, none sends new requests here.
        time.sleep(2 * self.refresh_interval_s)
        if member["backend"] != "sim":
            return  # vLLM finishes what it runs on SIGTERM (stop_grace_s); cut requests are retried elsewhere
        actor = actor_or_none(member["actor"])
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while actor is not None and time.monotonic() < deadline:
            try:
                if int(ray.get(actor.stats.remote(), timeout=10).get("in_flight", 0)) == 0:
                    return
            except (ray.exceptions.RayError, TimeoutError):
                return
            time.sleep(0.2)

    def _stop_actor(self, member: dict[str, Any]) -> None:
        stop_replica_actor(member.get("actor", ""))


def actor_or_none(name: str) -> Any:
    import ray

    if not name:
        return None
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def stop_replica_actor(name: str, timeout_s: float = 60.0) -> bool:
    """Stop the replica actor ``name`` (its server with every process, then the actor). False if none."""
    import ray

    actor = actor_or_none(name)
    if actor is None:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=timeout_s)
    except Exception as exc:  # an actor that cannot stop still gets killed (its supervisor takes the server along)
        log.warning("replica %s did not stop cleanly: %s", name, exc)
    ray.kill(actor, no_restart=True)
    return True


# -- status, check, down, attach ------------------------------------------------------------------


def deployed_names() -> list[str]:
    """Names of the services deployed on the connected Ray cluster."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"].removeprefix(DEPLOYED_REGISTRY_PREFIX) for a in actors
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(DEPLOYED_REGISTRY_PREFIX))


def metrics_targets() -> dict[str, tuple[list[str], str | None]]:
    """Per deployed vLLM service: ``host:port`` of its registered replicas (each serves its own
    ``/metrics``) and the service key they ask for. For a cluster's Prometheus (docs/monitoring.md)."""
    import ray

    found: dict[str, tuple[list[str], str | None]] = {}
    for name in deployed_names():
        with contextlib.suppress(ServiceNotDeployed, ray.exceptions.RayError):
            registry = _registry(name)
            record, registered = ray.get([registry.record.remote(), registry.replicas.remote()], timeout=30)
            if record.get("backend") != "vllm" or record.get("engine", {}).get("engine", "vllm") != "vllm":
                continue  # the sim, command engines and external endpoints: no vLLM /metrics
            hosts = [urllib.parse.urlsplit(reg["base_url"]).netloc for reg in registered.values()
                     if reg.get("base_url")]
            key = read_key(Path(record["key_path"])).get() if record.get("key_path") else None
            found[name] = (hosts, key)
    return found


def _registry(name: str) -> Any:
    import ray

    try:
        return ray.get_actor(deployed_ref(name).registry, namespace=NAMESPACE)
    except ValueError:
        up = deployed_names()
        raise ServiceNotDeployed(
            f"no LLM service named {name!r} is deployed on this Ray cluster; deployed: {', '.join(up) or 'none'} "
            "(deploy one with `matrix-hpc serve up llm=sim|vllm|openai llm.name=NAME`, and give the run the "
            "cluster=/cluster.name= of that cluster)") from None


def service_status(name: str) -> dict[str, Any]:
    """One service: its record and, per replica, node, state, URL, outstanding requests (sim), restarts, log."""
    import ray

    registry = _registry(name)
    record, registered, info = ray.get([registry.record.remote(), registry.replicas.remote(),
                                        registry.info.remote()])
    replicas = []
    for rid, member in sorted(record.get("members", {}).items(), key=lambda kv: replica_index(kv[0])):
        reg = registered.get(rid, {})
        meta = reg.get("meta", {})
        row: dict[str, Any] = {"id": rid, "backend": member["backend"], "state": member["state"],
                               "registered": rid in registered, "url": reg.get("base_url", ""),
                               "node": meta.get("node", ""), "outstanding": None, "requests": None,
                               "pid": meta.get("pid"),
                               "restarts": max(0, reg.get("registrations", 0) - 1), "log": meta.get("log", ""),
                               "current": member["digest"] == record.get("digest")}
        actor = actor_or_none(member.get("actor", ""))
        try:
            if member["backend"] == "sim" and actor is not None:
                stats = ray.get(actor.stats.remote(), timeout=10)
                row.update(outstanding=int(stats.get("in_flight", 0)), requests=int(stats.get("requests", 0)))
            elif member["backend"] == "vllm" and actor is not None:
                st = ray.get(actor.status.remote(), timeout=10)
                row.update(state=st["state"] if member["state"] == "running" else member["state"],
                           restarts=max(row["restarts"], int(st["restarts"])), log=st["log"], server_pids=st["pids"])
                if row["url"] and record.get("engine", {}).get("engine", "vllm") == "vllm" and record.get("key_path"):
                    row["outstanding"] = vllm_outstanding(row["url"], read_key(Path(record["key_path"])))
        except (ray.exceptions.RayError, TimeoutError) as e:
            row["state"] = f"unreachable ({type(e).__name__})"
        if member["backend"] != "openai" and actor is None:
            row["state"] = "gone"
        replicas.append(row)
    public = {k: record.get(k) for k in ("name", "backend", "model", "dialect", "digest", "replicas", "created",
                                         "updated", "log_dir", "autoscale")}
    return {**public, "engine": record.get("engine", {}), "registry": info, "replica_list": replicas}


def vllm_outstanding(base_url: str, key: Secret, timeout_s: float = 5.0) -> int | None:
    """Requests a vLLM replica is running or has waiting, from its own ``/metrics`` (the service key
    required); None when it does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    root = base_url.removesuffix("/").removesuffix("/v1")
    request = urllib.request.Request(root + "/metrics", headers={"Authorization": f"Bearer {key.get()}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting"}
    return int(sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name in wanted))


def all_status() -> list[dict[str, Any]]:
    return [service_status(n) for n in deployed_names()]


def format_status(services: list[dict[str, Any]]) -> str:
    if not services:
        return "no LLM services deployed"
    lines = []
    for s in services:
        scale = s.get("autoscale")
        bounds = f", autoscaled {scale['min_replicas']}-{scale['max_replicas']}" if scale else ""
        restored = s.get("registry", {}).get("restored", 0)
        rebuilt = f"; registry restarted {restored}x" if restored else ""
        lines.append(f"{s['name']}: llm={s['backend']} model={s['model']} replicas {len(s['replica_list'])}/"
                     f"{s['replicas']}{bounds} (config {s['digest']}{rebuilt})")
        for r in s["replica_list"]:
            out = "-" if r["outstanding"] is None else str(r["outstanding"])
            lines.append(f"  {r['id']:<20} {r['state']:<10} node={r['node'] or '-'} {r['url'] or '-'} "
                         f"outstanding={out} restarts={r['restarts']} log={r['log'] or '-'}")
    return "\n".join(lines)


@dataclass
class CheckResult:
    service: str
    replica: str
    url: str
    ok: bool
    latency_s: float
    error: str = ""


def check_services(names: list[str], timeout_s: float = 120.0) -> list[CheckResult]:
    """One real chat request to each registered replica of each service (no retry), with its latency."""
    import ray

    from matrix_hpc.services.llm.client import LLMClient
    from matrix_hpc.services.llm.endpoints import StaticEndpoints

    async def one(name: str, rid: str, url: str, model: str, dialect: str, key: Secret) -> CheckResult:
        conf = ClientConf(max_attempts=1, timeout_s=timeout_s, dialect=dialect)
        client = LLMClient(StaticEndpoints([url]), conf, model, key)
        t0 = time.monotonic()
        try:
            await client.chat([{"role": "user", "content": "Say OK."}], max_tokens=8, temperature=0.0)
            return CheckResult(name, rid, url, True, time.monotonic() - t0)
        except Exception as e:  # every failure is reported, per replica
            return CheckResult(name, rid, url, False, time.monotonic() - t0, str(e).split("\n")[0][:300])
        finally:
            await client.close()

    jobs = []
    for name in names:
        registry = _registry(name)
        record, table = ray.get([registry.record.remote(), registry.snapshot.remote()])
        key = read_key(Path(record["key_path"]))
        if not table[1]:
            jobs.append(_failed(CheckResult(name, "-", "", False, 0.0, "no replica registered")))
        for rid, url in sorted(table[1].items()):
            jobs.append(one(name, rid, url, record["model"], record["dialect"], key))

    async def gather() -> list[CheckResult]:
        return list(await asyncio.gather(*jobs))

    return asyncio.run(gather())


async def _failed(result: CheckResult) -> CheckResult:
    return result


def undeploy_service(name: str) -> list[str]:
    """Stop every replica of ``name`` (servers with all their processes), its registry and key file.
    Returns the replica actors stopped."""
    import ray

    from matrix_hpc.services.llm.autoscale import stop_autoscaler

    registry = _registry(name)
    stop_autoscaler(name)
    record = ray.get(registry.record.remote())
    pattern = re.compile(re.escape(DEPLOYED_REPLICA_PREFIX + name) + r"-\d+")
    names = {m["actor"] for m in record.get("members", {}).values() if m.get("actor")}
    names |= {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)  # one a failed `up` left
              if a.get("namespace") == NAMESPACE and pattern.fullmatch(a["name"])}
    for rid in record.get("members", {}):
        ray.get(registry.unregister.remote(rid))
    stopped = [n for n in sorted(names) if stop_replica_actor(n)]
    ray.kill(registry, no_restart=True)
    for path in (record.get("key_path"), record.get("state_path")):
        if path:
            Path(path).unlink(missing_ok=True)
    return stopped


def attach_service(name: str, client: ClientConf) -> tuple[Any, str, Secret, ClientConf]:
    """What a run needs to use the deployed service ``name``: (endpoint source, model, key, client conf
    with the service's dialect). Raises :class:`ServiceNotDeployed` naming the deployed services."""
    import ray

    from matrix_hpc.services.llm.endpoints import RegistryEndpoints

    if not name:
        raise ServiceNotDeployed(f"llm=deployed needs the service's name: llm.name=NAME (deployed: "
                                 f"{', '.join(deployed_names()) or 'none'})")
    registry = _registry(name)
    record = ray.get(registry.record.remote())
    key = read_key(Path(record["key_path"]))
    endpoints = RegistryEndpoints(deployed_ref(name), refresh_interval_s=client.refresh_interval_s)
    return endpoints, str(record["model"]), key, dataclasses.replace(client, dialect=record["dialect"])
