"""The cluster's own Prometheus: ``matrix-hpc cluster up cluster.monitoring=true``.

The head job starts this process next to its Ray node and stops it with the
node (docs/monitoring.md)::

    python -m matrix_hpc.cluster.cluster_monitor --cluster-dir DIR

It joins the cluster as a Ray driver (the cluster's token file), runs
Prometheus on the head node's 127.0.0.1 with its data under
``DIR/monitoring/``, and keeps two kinds of file-SD target lists current:
every alive node's Ray metrics endpoint (the nodes export them because
monitoring implies ``cluster.export_metrics``), and, per deployed vLLM
service (``matrix-hpc serve up``), its registered replicas, scraped with
that service's own key. Runs on the cluster appear under their
``run_id`` label: one Prometheus for every run and service of the cluster.
Its URL is in ``DIR/monitoring/server.json`` and in ``cluster status``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from matrix_hpc.cluster.auth import use_cluster_token
from matrix_hpc.cluster.monitoring import Monitor, PrometheusConf, ray_metrics_targets
from matrix_hpc.cluster.state import ClusterState

log = logging.getLogger(__name__)

MONITOR_DIR = "monitoring"  # under the cluster dir


def server_url(cluster_dir: Path) -> str | None:
    """The cluster Prometheus's URL, if one was started (``server.json``)."""
    path = Path(cluster_dir) / MONITOR_DIR / "server.json"
    try:
        return str(json.loads(path.read_text())["url"])
    except (OSError, ValueError, KeyError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrix_hpc.cluster.cluster_monitor")
    parser.add_argument("--cluster-dir", required=True)
    parser.add_argument("--scrape-interval-s", type=float, default=5.0)
    parser.add_argument("--binary", default="prometheus")
    parser.add_argument("--retention", default="15d")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    state = ClusterState(Path(args.cluster_dir))
    head = state.head()
    if head is None:
        print(f"cluster monitor: no head in {state.root}", file=sys.stderr)
        return 2
    use_cluster_token(state.token_file)  # before `import ray`: Ray fixes its auth mode at import
    import ray

    from matrix_hpc.services.llm.deploy import metrics_targets

    ray.init(address=head.address, log_to_driver=False, logging_level=logging.ERROR)
    conf = PrometheusConf(binary=args.binary, scrape_interval_s=args.scrape_interval_s, retention=args.retention)
    monitor = Monitor(conf, state.root / MONITOR_DIR, ray_metrics_targets, services=metrics_targets,
                      labels={"matrix_cluster": state.root.name}, refresh_s=max(2.0, args.scrape_interval_s))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    monitor.start()
    print(f"[matrix] cluster Prometheus at {monitor.prometheus.url} (user matrix, password in "
          f"{monitor.prometheus.password_file})", flush=True)
    try:
        while not stop.wait(5.0):
            if monitor.prometheus.proc is None or monitor.prometheus.proc.poll() is not None:
                print("[matrix] cluster Prometheus exited; see its log under "
                      f"{state.root / MONITOR_DIR / 'prometheus.log'}", file=sys.stderr, flush=True)
                return 1
    finally:
        monitor.stop()
        (state.root / MONITOR_DIR / "server.json").unlink(missing_ok=True)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
