"""Monitoring: a Prometheus server for one run (or one cluster), scraping
Ray's metrics endpoints and the vLLM replicas' own ``/metrics``.

Nothing here collects metrics: the processes record through Ray's metrics
API (:mod:`matrix_hpc.metrics`) and Ray's agent on each node serves them.
This module only writes a Prometheus config with two file-based
service-discovery (file-SD) target lists, keeps those lists current from
callables its owner passes (Ray's nodes; the LLM registry's replicas), and
runs ``prometheus`` as a child process bound to 127.0.0.1 until ``stop``.

File-SD is Prometheus's own mechanism for targets that come and go: the
server re-reads the files when they change, so replicas that restart on new
ports are found without a reload. The replicas require their service key;
it goes to Prometheus through ``authorization.credentials_file`` (a 0600
file in a private directory), never through argv or the config text.

Example::

    mon = Monitor(PrometheusConf(), Path("out/_matrix/monitoring"), ray_targets=lambda: ["127.0.0.1:8080"])
    mon.start()
    print(mon.prometheus.url)     # http://127.0.0.1:NNNNN
    mon.stop()
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrix_hpc.procs import die_with_parent_hook, free_port, kill_tree, tail_text

log = logging.getLogger(__name__)

PROMETHEUS_USER = "matrix"  # the basic-auth user of every Prometheus matrix_hpc starts
RAY_JOB = "ray"  # Prometheus job of Ray's metrics endpoints (Ray's own file-SD uses this name too)
VLLM_JOB = "vllm"  # Prometheus job of the vLLM replicas' /metrics


@dataclass
class PrometheusConf:
    binary: str = "prometheus"  # the Prometheus server to run (a path, or a name on PATH)
    scrape_interval_s: float = 5.0  # how often every target is scraped
    ray_export_interval_s: float = 5.0  # local runs: how often Ray's processes send metrics to its agent (Ray: 10)
    port: int = 0  # the server's port on 127.0.0.1; 0 = a free one
    retention: str = "15d"  # --storage.tsdb.retention.time
    start_timeout_s: float = 30.0  # wait this long for the server to say it is ready
    linger_s: float = 0.0  # keep the server up this long after the run ends (Ctrl-C ends it early)

    def __post_init__(self) -> None:
        if self.scrape_interval_s <= 0 or self.ray_export_interval_s <= 0:
            raise ValueError("prometheus.scrape_interval_s and prometheus.ray_export_interval_s must be > 0")

    def find_binary(self) -> str:
        """The server's path; :class:`MonitoringError` saying how to install it when there is none."""
        binary = shutil.which(self.binary)
        if binary is None:
            raise MonitoringError(f"monitoring=true needs a Prometheus server: {self.binary!r} is not on PATH "
                                  "(Debian: apt-get install prometheus, or `sudo bash .ci/setup_monitoring.sh`; "
                                  "elsewhere set prometheus.binary=/path/to/prometheus)")
        return binary


class MonitoringError(RuntimeError):
    """Prometheus could not be started (missing binary, bad config, no ready answer)."""


def basic_auth(user: str, password: str) -> str:
    """An HTTP ``Authorization`` value for basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new 0600 file at ``path`` (replacing any, never through a link)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_targets(path: Path, targets: list[str], labels: dict[str, str]) -> bool:
    """Write a Prometheus file-SD list atomically (Prometheus may read it at any
    moment); True when the content changed."""
    text = json.dumps([{"targets": sorted(set(targets)), "labels": labels}])
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def prometheus_config(scrape_interval_s: float, ray_sd: Path, vllm_sd: Path | None,
                      vllm_key_file: Path | None,
                      services: dict[str, tuple[Path, Path | None]] | None = None) -> dict[str, Any]:
    """The server's config (JSON is YAML, so no YAML writer is needed). ``services``: deployed LLM
    services (name -> their file-SD list and key file), one job ``vllm-NAME`` each (each its own key)."""
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    jobs: list[dict[str, Any]] = [
        {"job_name": RAY_JOB, "file_sd_configs": [{"files": [str(ray_sd)], "refresh_interval": "5s"}]}]
    llm_jobs = [(VLLM_JOB, vllm_sd, vllm_key_file)] if vllm_sd is not None else []
    llm_jobs += [(f"{VLLM_JOB}-{name}", sd, key) for name, (sd, key) in sorted((services or {}).items())]
    for job_name, sd, key in llm_jobs:
        job: dict[str, Any] = {"job_name": job_name, "metrics_path": "/metrics",
                               "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "5s"}]}
        if key is not None:
            job["authorization"] = {"type": "Bearer", "credentials_file": str(key)}
        jobs.append(job)
    return {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": jobs}


class PrometheusServer:
    """One ``prometheus`` process on 127.0.0.1 with its data under ``data_dir``."""

    def __init__(self, conf: PrometheusConf, config_file: Path, data_dir: Path, log_file: Path) -> None:
        self.conf, self.config_file, self.data_dir, self.log_file = conf, config_file, data_dir, log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._web_config = config_file.with_name("web.json")
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        """The password of user ``matrix`` (0600): 127.0.0.1 is shared by every user of the node."""
        return self.config_file.with_name("password")

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": basic_auth(PROMETHEUS_USER, self.password_file.read_text())}

    def get(self, path: str, timeout_s: float = 10) -> Any:
        """GET ``path`` of the server's HTTP API (with its credentials), parsed JSON."""
        request = urllib.request.Request(self.url + path, headers=self.auth_header())
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def _write_web_config(self) -> Path:
        """Prometheus's web config: basic auth for every request (its bcrypt hash; the password in a
        0600 file beside it, for the owner's queries, Grafana and the report)."""
        import bcrypt

        password = secrets.token_urlsafe(24)
        write_private(self.password_file, password)
        digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
        web = self.config_file.with_name("web.json")
        write_private(web, json.dumps({"basic_auth_users": {PROMETHEUS_USER: digest}}))
        return web

    def start(self, tries: int = 3) -> None:
        binary = self.conf.find_binary()
        self._web_config = self._write_web_config()
        for attempt in range(1, tries + 1):  # a free port can be taken before the server binds it
            self.port = self.conf.port or free_port("127.0.0.1")
            self.proc = self._spawn(binary)
            if self._wait_ready():
                log.info("Prometheus at %s (config %s, data %s)", self.url, self.config_file, self.data_dir)
                return
            self.stop()
            if self.conf.port or attempt == tries:
                break
        raise MonitoringError(f"Prometheus did not start ({self.config_file}); its log {self.log_file} ends:\n"
                              f"{tail_text(self.log_file)}")

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        argv = [binary, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir}",
                f"--storage.tsdb.retention.time={self.conf.retention}",
                f"--web.listen-address=127.0.0.1:{self.port}", f"--web.config.file={self._web_config}"]
        with open(self.log_file, "ab") as out:
            return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=die_with_parent_hook())

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.conf.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                request = urllib.request.Request(f"{self.url}/-/ready", headers=self.auth_header())
                with urllib.request.urlopen(request, timeout=2) as resp:
                    if resp.status == 200:
                        return True
            time.sleep(0.2)
        return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API: the result vector."""
        body = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if body.get("status") != "success":
            raise MonitoringError(f"query {expr!r} failed: {body}")
        return list(body["data"]["result"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid, grace_s=10)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.proc = None


class Monitor:
    """Prometheus plus the loop that keeps its target lists current.

    ``ray_targets()``: ``host:port`` of Ray's metrics endpoints, or the path
    of Ray's own file-SD list (written by its dashboard) to read instead;
    ``vllm_targets()``: ``host:port`` of the replicas (None: no vLLM job);
    ``vllm_key``: the replicas' key, given to Prometheus in a 0600 file;
    ``services()``: deployed LLM services, name -> (``host:port`` of their
    replicas, their key): one scrape job each, added (config reloaded) as
    services come and removed as they go.
    """

    def __init__(self, conf: PrometheusConf, work_dir: Path, ray_targets: Callable[[], list[str]] | Path,
                 vllm_targets: Callable[[], list[str]] | None = None, vllm_key: str | None = None,
                 labels: dict[str, str] | None = None, refresh_s: float = 2.0,
                 services: Callable[[], dict[str, tuple[list[str], str | None]]] | None = None) -> None:
        self.conf, self.dir = conf, work_dir
        self._ray_targets, self._vllm_targets, self._vllm_key = ray_targets, vllm_targets, vllm_key
        self._services = services
        self._service_jobs: dict[str, tuple[Path, Path | None]] = {}  # name -> (file-SD list, key file)
        self._labels = labels or {}
        self._refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._secret_dir: Path | None = None
        self._key_file: Path | None = None
        self.prometheus = PrometheusServer(conf, work_dir / "prometheus.json", work_dir / "data",
                                           work_dir / "prometheus.log")

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key_file = self._write_key("vllm_key", self._vllm_key) \
            if self._vllm_targets is not None and self._vllm_key else None
        self.refresh()
        self._write_config()
        self.prometheus.start()
        self._thread = threading.Thread(target=self._refresh_loop, name="monitoring targets", daemon=True)
        self._thread.start()
        (self.dir / "server.json").write_text(json.dumps({"url": self.prometheus.url, "user": PROMETHEUS_USER,
                                                         "password_file": str(self.prometheus.password_file),
                                                         "pid": self.prometheus.proc.pid if self.prometheus.proc
                                                         else None}))

    def _write_config(self) -> None:
        ray_sd = self._ray_targets if isinstance(self._ray_targets, Path) else self.dir / "ray_targets.json"
        config = prometheus_config(self.conf.scrape_interval_s, ray_sd,
                                   self.dir / "vllm_targets.json" if self._vllm_targets is not None else None,
                                   self._key_file, self._service_jobs)
        tmp = self.prometheus.config_file.with_name(f".{self.prometheus.config_file.name}.tmp")
        tmp.write_text(json.dumps(config, indent=1))
        os.replace(tmp, self.prometheus.config_file)

    def _write_key(self, name: str, value: str) -> Path:
        """A key in a private directory (0700, file 0600), removed at stop."""
        if self._secret_dir is None:
            self._secret_dir = Path(tempfile.mkdtemp(prefix="matrix-prom-"))
        key_file = self._secret_dir / name
        write_private(key_file, value)
        return key_file

    def _refresh_services(self) -> None:
        """Deployed services: their target lists and keys; the config reloaded when the set changes."""
        assert self._services is not None
        try:
            services = self._services()
        except Exception as e:  # the cluster busy or restarting: the next refresh tries again
            log.debug("monitoring: services unavailable (%s)", e)
            return
        jobs: dict[str, tuple[Path, Path | None]] = {}
        for name, (targets, key) in services.items():
            sd = self.dir / f"{VLLM_JOB}-{name}_targets.json"
            write_targets(sd, targets, {**self._labels, "service": name})
            jobs[name] = (sd, self._write_key(f"key-{name}", key) if key else None)
        if jobs != self._service_jobs:
            self._service_jobs = jobs
            if self.prometheus.proc is not None and self.prometheus.proc.poll() is None:
                self._write_config()
                self.prometheus.proc.send_signal(signal.SIGHUP)  # Prometheus re-reads its config
                log.info("monitoring: scraping LLM services %s", sorted(jobs) or "(none)")

    def refresh(self) -> None:
        """Rewrite the target lists from their sources (a failing source keeps its last list)."""
        sources: list[tuple[Path, Callable[[], list[str]], str]] = []
        if not isinstance(self._ray_targets, Path):
            sources.append((self.dir / "ray_targets.json", self._ray_targets, RAY_JOB))
        if self._vllm_targets is not None:
            sources.append((self.dir / "vllm_targets.json", self._vllm_targets, VLLM_JOB))
        for path, source, job in sources:
            try:
                targets = source()
            except Exception as e:  # a registry restarting: try again at the next refresh
                log.debug("monitoring: %s targets unavailable (%s)", job, e)
                if not path.exists():
                    write_targets(path, [], self._labels)
                continue
            write_targets(path, targets, self._labels)
        if self._services is not None:
            self._refresh_services()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self.refresh()

    def wait_until(self, expr: str, expected: float, timeout_s: float) -> bool:
        """Wait until ``expr`` (a scalar-valued query) equals ``expected``: the
        run's last counts have been exported by Ray and scraped."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                result = self.prometheus.query(expr)
                if result and float(result[0]["value"][1]) == expected:
                    return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.prometheus.stop()
        if self._secret_dir is not None:
            shutil.rmtree(self._secret_dir, ignore_errors=True)
            self._secret_dir = None


@contextlib.contextmanager
def loopback_local_ray() -> Iterator[None]:
    """Around a local ``ray.init``: the node gets the address 127.0.0.1.

    Ray binds each node's metrics endpoint (no authentication, unlike its
    gRPC and dashboard) to every interface unless the node's address is a
    loopback one, and on Linux it resolves a local node to the routable
    address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off. That switch
    is read once, at import, into a constant that ``ray.init`` consults:
    flipped here for the duration of the call only (in the environment it
    would stop a later ``ray start --address`` in a child process, and a later
    connection to a remote cluster would take 127.0.0.1 for this host).
    Multi-node clusters are started by ``ray start`` and do not pass here.
    """
    import ray._private.ray_constants as constants  # private: the switch has no public API

    before = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


def ray_metrics_targets() -> list[str]:
    """``host:port`` of every alive Ray node's metrics endpoint (what Ray's
    dashboard writes to ``prom_metrics_service_discovery.json``; the
    dashboard is off by default, so the list is read from the GCS here)."""
    import ray

    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
            if n.get("Alive") and (n.get("MetricsExportPort") or 0) > 0]  # -1: the node exports none


def ray_discovery_file() -> Path | None:
    """Ray's own file-SD list, when its dashboard runs and writes one."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # private: the session dir of this node
    if node is None:
        return None
    path = Path(node.get_session_dir_path()) / "prom_metrics_service_discovery.json"
    return path if path.exists() else None
