"""``monitoring=true``: a Prometheus server for this run, scraping Ray's
metrics endpoints and (llm=vllm) the replicas' own ``/metrics``; stopped
when the run ends, after it has scraped the run's last counts.

The composition lives here because it needs both the cluster (the
Prometheus process, :mod:`matrix_hpc.cluster.monitoring`) and the services
(the LLM registry's replicas and key). docs/monitoring.md.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from matrix_hpc.cluster.monitoring import Monitor, PrometheusConf, ray_discovery_file, ray_metrics_targets
from matrix_hpc.services.llm.endpoints import RegistryEndpoints
from matrix_hpc.store.layout import META_DIR

log = logging.getLogger(__name__)


class RunMonitor:
    """The run's Prometheus; ``finish(rows)`` waits for the last counts, lingers, stops."""

    def __init__(self, conf: PrometheusConf, monitor: Monitor, run_id: str) -> None:
        self.conf, self.monitor, self.run_id = conf, monitor, run_id

    def finish(self, rows_committed: int | None) -> None:
        try:
            if rows_committed is not None:
                self._wait_for_last_counts(rows_committed)
            self._linger()
        finally:
            self.monitor.stop()

    def _wait_for_last_counts(self, rows: int) -> None:
        expr = f'sum(ray_matrix_tasks_completed_total{{run_id="{self.run_id}"}}) or vector(0)'
        timeout_s = 3 * (self.conf.ray_export_interval_s + self.conf.scrape_interval_s) + 5
        if not self.monitor.wait_until(expr, float(rows), timeout_s):
            log.warning("monitoring: Prometheus has not seen the run's last counts after %.0f s; stopping it anyway",
                        timeout_s)

    def _linger(self) -> None:
        if self.conf.linger_s <= 0:
            return
        print(f"Prometheus stays up {self.conf.linger_s:.0f} s at {self.monitor.prometheus.url} "
              "(Ctrl-C or SIGTERM ends it)", file=sys.stderr, flush=True)
        done = threading.Event()
        main = threading.current_thread() is threading.main_thread()  # signal handlers: the main thread only
        previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)
                    if main}
        try:
            done.wait(self.conf.linger_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def check_monitoring(cfg: Any) -> None:
    """Before Ray starts: with ``monitoring=true``, a Prometheus server must be there."""
    if cfg.get("monitoring", False):
        from omegaconf import OmegaConf

        OmegaConf.to_object(cfg.prometheus).find_binary()  # type: ignore[union-attr]


def start_run_monitor(cfg: Any, plan: Any, run_id: str) -> RunMonitor | None:
    """Start Prometheus when ``monitoring=true`` (after Ray and the services are up)."""
    if not cfg.get("monitoring", False):
        return None
    from omegaconf import OmegaConf

    conf: PrometheusConf = OmegaConf.to_object(cfg.prometheus)  # type: ignore[assignment]
    work_dir = Path(plan.output.dir).expanduser().resolve() / META_DIR / "monitoring" / run_id
    vllm_targets, key = _vllm_targets(plan) if cfg.llm.get("backend") == "vllm" else (None, None)
    monitor = Monitor(conf, work_dir, ray_discovery_file() or ray_metrics_targets, vllm_targets, key,
                      labels={"matrix_run_id": run_id})
    monitor.start()
    print(f"Prometheus for run {run_id}: {monitor.prometheus.url} (user matrix, password in "
          f"{monitor.prometheus.password_file}; docs/monitoring.md)", file=sys.stderr, flush=True)
    if not ray_metrics_targets():
        print("monitoring: this cluster's Ray nodes export no metrics, so Prometheus sees only the run's LLM "
              "services; bring the cluster up with cluster.export_metrics=true (docs/monitoring.md)",
              file=sys.stderr, flush=True)
    return RunMonitor(conf, monitor, run_id)


def _vllm_targets(plan: Any) -> tuple[Any, str | None]:
    """The vLLM replicas' ``host:port`` from the LLM registry, and their key."""
    factory = plan.services.get("llm")
    endpoints = getattr(factory, "endpoints", None)
    if not isinstance(endpoints, RegistryEndpoints):
        return None, None
    secret = getattr(factory, "api_key", None)

    def targets() -> list[str]:
        _, replicas = asyncio.run(endpoints.fetch())
        return [urllib.parse.urlsplit(url).netloc for url in replicas.values()]

    return targets, secret.get() if secret is not None else None
