"""``matrix-hpc serve up|status|down|check``: named LLM services that outlive a run (docs/serve.md).

    matrix-hpc serve up llm=vllm llm.name=teacher llm.vllm.model=/models/8b llm.vllm.num_replicas=4 cluster.name=gen
    matrix-hpc serve status [--json] cluster.name=gen
    matrix-hpc serve check [llm.name=teacher] cluster.name=gen
    matrix-hpc serve down llm.name=teacher cluster.name=gen

The services live on the Ray of a cluster that ``matrix-hpc cluster up`` started
(local or Slurm), reached the way runs reach it, with the cluster's token.
Each service's API key is a 0600 file in the cluster dir
(``services/<name>/api_key``); runs that attach (``llm=deployed llm.name=NAME``)
read it from there.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from matrix_hpc.cli.config_check import ConfigError, compose
from matrix_hpc.cli.main import conf_dir, fail

ACTIONS = ("up", "status", "down", "check")
USAGE = ("usage: matrix-hpc serve up llm=sim|vllm|openai llm.name=NAME [llm.<backend>.KEY=VALUE ...] [cluster=...]\n"
         "       matrix-hpc serve up sandbox=bwrap|apptainer sandbox.pool.name=NAME [sandbox.KEY=VALUE ...] "
         "[cluster=...]\n"
         "       matrix-hpc serve status [--json] [cluster=...]\n"
         "       matrix-hpc serve check [llm.name=NAME] [cluster=...]\n"
         "       matrix-hpc serve down llm.name=NAME | sandbox.pool.name=NAME [cluster=...]")


def serve_command(args: list[str]) -> int:
    if not args or args[0] not in ACTIONS:
        return fail(USAGE)
    action, rest = args[0], args[1:]
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    name = pool = ""
    pool_up = action == "up" and any(a.startswith("sandbox=") for a in rest) and \
        not any(a.startswith("llm=") for a in rest)
    if action != "up":  # only the name matters: the llm group is not composed
        name = next((a.split("=", 1)[1] for a in rest if a.startswith("llm.name=")), "")
        pool = next((a.split("=", 1)[1] for a in rest if a.startswith("sandbox.pool.name=")), "")
        rest = [a for a in rest if not a.startswith(("llm.name=", "llm=", "sandbox.pool.name=", "sandbox="))]
        if action == "down" and not (name or pool):
            return fail("serve down needs the service's name: matrix-hpc serve down llm.name=NAME "
                        "(or sandbox.pool.name=NAME) [cluster=...]")
    try:
        # A service needs no dataset or output: fill the run's mandatory keys with placeholders.
        cfg = compose(["dataset.path=-", "output.dir=-", *rest], str(conf_dir()))
    except ConfigError as e:
        return fail(str(e))
    from matrix_hpc.cluster import ClusterError
    from matrix_hpc.services.llm.deploy import ServeError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cluster_dir = _connect(cfg)
        if pool_up:
            return _pool_up(cfg)
        if action == "up":
            return _up(cfg, cluster_dir)
        if action == "status":
            return _status(as_json)
        if action == "check":
            return _check(name)
        return _pool_down(pool) if pool else _down(name)
    except (ServeError, ClusterError, ValueError) as e:
        return fail(f"serve {action}: {e}")


def _connect(cfg: Any) -> Path:
    """Join the cluster's Ray (before `import ray`: its token is set in the environment first);
    returns the cluster dir."""
    from matrix_hpc.cluster import ClusterError, as_cluster_conf, ray_address_for

    conf = as_cluster_conf(OmegaConf.to_container(cfg.cluster, resolve=True))
    address = os.environ.get("MATRIX_RAY_ADDRESS") or ray_address_for(conf)
    if not address:
        raise ClusterError(f"no cluster is up at {conf.cluster_dir}: a deployed service lives on a cluster's Ray, "
                           "so start one first (`matrix-hpc cluster up cluster=local|slurm cluster.name=...`) "
                           "and give serve the same cluster=/cluster.name=")
    import ray

    from matrix_hpc.services.llm.registry import NAMESPACE

    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    return Path(conf.cluster_dir)


def _up(cfg: Any, cluster_dir: Path) -> int:
    from matrix_hpc.cluster.auth import ensure_private_dir
    from matrix_hpc.services.llm.config import LLMConf
    from matrix_hpc.services.llm.deploy import check_name, deploy_service

    llm = OmegaConf.to_object(cfg.llm)
    if not isinstance(llm, LLMConf) or llm.backend not in ("sim", "vllm", "openai"):
        return fail("serve up needs llm=sim, llm=vllm or llm=openai (and llm.name=NAME)")
    service_dir = cluster_dir / "services" / check_name(llm.name)
    ensure_private_dir(service_dir)  # the key lives here; others must not be able to swap it
    with open(service_dir / "serve.lock", "w") as lock:  # two `serve up NAME` at once would race for replica ids
        fcntl.flock(lock, fcntl.LOCK_EX)
        print(deploy_service(llm, service_dir / "api_key", service_dir))
    return 0


def _pool_up(cfg: Any) -> int:
    """A sandbox pool that outlives runs (docs/serve.md): runs attach with sandbox.pool.deployed=true."""
    from matrix_hpc.services.sandbox.ray_pool import deploy_pool

    print(deploy_pool(OmegaConf.to_object(cfg.sandbox)))  # type: ignore[arg-type]
    return 0


def _pool_down(name: str) -> int:
    from matrix_hpc.services.sandbox.ray_pool import PoolNotDeployed, deployed_pools, shutdown_pool

    pools = deployed_pools()
    if name not in pools:
        raise PoolNotDeployed(f"no sandbox pool named {name!r} (deployed: {', '.join(sorted(pools)) or 'none'})")
    print(f"sandbox pool {name!r} down: stopped {shutdown_pool(name)} pool actor(s) and their sandboxes")
    return 0


def _status(as_json: bool) -> int:
    from matrix_hpc.services.llm.deploy import all_status, format_status
    from matrix_hpc.services.sandbox.ray_pool import pool_status

    services, pools = all_status(), pool_status()
    if as_json:
        print(json.dumps(status_entries(services, pools), indent=1, default=str))
        return 0
    print(format_status(services))
    print("sandbox pools: " + ("none" if not pools else ""))
    for p in pools:
        print(f"  {p['name']:<20} {p['backend']:<12} size {p['size']:<5} {p['stats']}")
    return 0


def status_entries(services: list[dict[str, Any]], pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``serve status --json``: one list, each entry with its ``kind``: the LLM services first (as
    before pools were listed), then the sandbox pools (``name``, ``backend``, ``size``, ``stats``)."""
    entries = [{"kind": "llm_service", **s} for s in services]
    for p in pools:
        stats = p["stats"]
        stats = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) and not isinstance(stats, type) else stats
        entries.append({"kind": "sandbox_pool", **p, "stats": stats})
    return entries


def _check(name: str) -> int:
    from matrix_hpc.services.llm.deploy import check_services, deployed_names

    names = [name] if name else deployed_names()
    if not names:
        return fail("serve check: no LLM services deployed")
    results = check_services(names)
    for r in results:
        outcome = f"ok {r.latency_s * 1000:.0f} ms" if r.ok else f"FAILED after {r.latency_s:.1f} s: {r.error}"
        print(f"{r.service:<20} {r.replica:<24} {r.url or '-':<32} {outcome}")
    return 0 if results and all(r.ok for r in results) else 1


def _down(name: str) -> int:
    from matrix_hpc.services.llm.deploy import undeploy_service

    stopped = undeploy_service(name)
    print(f"llm service {name!r} down: stopped {', '.join(stopped) or 'no replica actor'}")
    return 0
