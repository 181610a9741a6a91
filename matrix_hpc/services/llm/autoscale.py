"""Autoscaling of a deployed LLM service (``llm.autoscale``; docs/serve.md): a
detached actor per service that reads the load (requests in flight on its
replicas) and adds or removes one replica at a time through the same steps
as ``serve up``, within [min_replicas, max_replicas] and after a cool-down.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from matrix_hpc.services.llm.config import AutoscaleConf, LLMConf
from matrix_hpc.services.llm.contract import Secret
from matrix_hpc.services.llm.deploy import Deployer, actor_or_none, deployed_ref, replica_index, vllm_outstanding
from matrix_hpc.services.llm.registry import NAMESPACE

log = logging.getLogger(__name__)


def desired_replicas(current: int, outstanding: float, conf: AutoscaleConf) -> int:
    """The replica count the load asks for: enough for ``target_outstanding`` each, within
    [min_replicas, max_replicas]; down by one at a time (each removal drains first)."""
    want = max(conf.min_replicas, min(conf.max_replicas, math.ceil(outstanding / conf.target_outstanding)))
    return current - 1 if want < current else want


def outstanding_requests(record: dict[str, Any], replica_ids: list[str], api_key: Secret) -> float | None:
    """Requests in flight on ``replica_ids`` (sim: its counter; vLLM: running + waiting from /metrics);
    None when a replica cannot say (no decision is taken on a partial view)."""
    import ray

    total = 0.0
    for rid in replica_ids:
        member = record["members"][rid]
        actor = actor_or_none(member["actor"])
        if actor is None:
            return None
        try:
            if member["backend"] == "sim":
                total += float(ray.get(actor.stats.remote(), timeout=10).get("in_flight", 0))
                continue
            load = vllm_outstanding(str(ray.get(actor.status.remote(), timeout=10)["base_url"]), api_key, 10.0)
        except Exception:  # a replica that does not answer now: look again next time
            return None
        if load is None:
            return None
        total += load
    return total


class Autoscaler:
    """Detached actor ``llm-autoscaler-<name>``: every ``interval_s`` it reads the service's load and
    adds or removes one replica (the same steps as `serve up`) when the load asks for another count
    and ``cooldown_s`` has passed since the last change. `serve up` and `serve down` stop it first,
    so the record has one writer at a time."""

    def __init__(self, conf: LLMConf, api_key: Secret, files_dir: str):
        self.conf, self.api_key, self.files_dir = conf, api_key, Path(files_dir)
        self.last_change = time.monotonic()
        self.last_load: float | None = None
        self.error = ""
        threading.Thread(target=self._loop, name="llm-autoscaler", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.conf.autoscale.interval_s)
            try:
                self.step()
                self.error = ""
            except Exception as e:  # keep watching: the next look may succeed
                self.error = str(e).split("\n")[0][:300]
                log.warning("autoscaler of %s: %s", self.conf.name, self.error)

    def step(self) -> None:
        import ray

        ref = deployed_ref(self.conf.name)
        registry: Any = ray.get_actor(ref.registry, namespace=NAMESPACE)
        record: dict[str, Any] = ray.get(registry.record.remote())
        current = sorted((rid for rid, m in record["members"].items()
                          if m["digest"] == record["digest"] and m["state"] == "running"), key=replica_index)
        self.last_load = outstanding_requests(record, current, self.api_key)
        if self.last_load is None:
            return
        want = desired_replicas(len(current), self.last_load, self.conf.autoscale)
        if want == len(current) or time.monotonic() - self.last_change < self.conf.autoscale.cooldown_s:
            return
        log.info("autoscaler of %s: %.0f outstanding on %d replica(s): scaling to %d", ref.name, self.last_load,
                 len(current), want)
        record["replicas"] = want
        deployer = Deployer(ref, registry, record, self.conf, self.api_key, self.files_dir,
                             self.conf.client.refresh_interval_s)
        if want > len(current):
            deployer.add()
        else:
            deployer.remove(current[-1])
        self.last_change = time.monotonic()

    def state(self) -> dict[str, Any]:
        return {"load": self.last_load, "error": self.error,
                "since_last_change_s": round(time.monotonic() - self.last_change, 1)}


def autoscaler_name(name: str) -> str:
    return f"llm-autoscaler-{name}"


def start_autoscaler(conf: LLMConf, api_key: Secret, files_dir: Path) -> None:
    import ray

    actor_cls: Any = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=2)(Autoscaler)  # type: ignore[call-overload]
    actor_cls.options(name=autoscaler_name(conf.name), namespace=NAMESPACE, lifetime="detached").remote(
        conf, api_key, str(files_dir.resolve()))


def stop_autoscaler(name: str) -> None:
    import ray

    actor = actor_or_none(autoscaler_name(name))
    if actor is not None:
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30  # the name is free again only once Ray has removed it
        while actor_or_none(autoscaler_name(name)) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
