"""One job, start to finish: load state, start Ray and services, run the
driver, commit, summarise. The run loop reads like its description."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from matrix_hpc import startup
from matrix_hpc.app.monitoring import check_monitoring, start_run_monitor
from matrix_hpc.cluster.local_ray import start_local_ray
from matrix_hpc.config.secrets import redact, redacted_yaml
from matrix_hpc.runtime.driver import Driver, RunPlan, RunResult, install_signal_handlers, new_run_id
from matrix_hpc.runtime.identity import GROWABLE_IDENTITY_KEYS, resume_identity
from matrix_hpc.runtime.progress import render_summary
from matrix_hpc.store.input import check_input
from matrix_hpc.store.lock import OutputLock
from matrix_hpc.store.resume import check_and_record_config

log = logging.getLogger(__name__)


def plan_from_config(cfg: DictConfig) -> RunPlan:
    """Plain objects from the composed config (nothing below takes OmegaConf)."""
    return RunPlan(
        workflow=OmegaConf.to_object(cfg.workflow),  # type: ignore[arg-type]
        dataset=OmegaConf.to_object(cfg.dataset),  # type: ignore[arg-type]
        output=OmegaConf.to_object(cfg.output),  # type: ignore[arg-type]
        run=OmegaConf.to_object(cfg.run),  # type: ignore[arg-type]
        workflow_yaml=redacted_yaml(cfg.workflow),  # stored in _matrix/: secrets as *** (docs/security.md)
        full_yaml=redacted_yaml(cfg),
    )


def check_placement(plan: RunPlan) -> None:
    """``run.role_workers`` names only roles of the workflow (PlacementError), before anything starts."""
    from matrix_hpc.runtime.placement import plan_groups
    from matrix_hpc.runtime.workflow import build_workflow

    run = plan.run
    plan_groups(build_workflow(plan.workflow).roles, run.placement, run.num_workers, run.role_workers)


def execute(cfg: DictConfig, driver_hook: Any = None) -> RunResult:
    """Run the job described by ``cfg``. ``driver_hook(driver)`` is called
    once the driver exists (e.g. to wire a preemption handler).

    Before Ray starts: the input path and the placement are checked, the
    output directory is locked for this run (a second run on it is refused)
    and the resume check compares the workflow and dataset with what the
    output holds.
    """
    plan = plan_from_config(cfg)
    check_input(plan.dataset)
    check_placement(plan)
    check_monitoring(cfg)
    startup.phase("input_check")
    run_id = new_run_id()
    out_dir = Path(plan.output.dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out_dir, run_id)
    lock.acquire()
    try:
        identity, defaults = resume_identity(plan.workflow, plan.dataset, plan.run)
        identity, defaults = redact(identity), redact(defaults)  # recorded in _matrix/: secrets as ***
        check_and_record_config(out_dir, identity, defaults, plan.full_yaml, force=plan.run.resume.value == "force",
                                growable=GROWABLE_IDENTITY_KEYS)
        startup.phase("lock_and_config_check")
        result = _run_with_ray(cfg, plan, run_id, driver_hook)
    finally:
        lock.release()
    if plan.run.summary:
        print(render_summary(result), file=sys.stderr)
    return result


def _run_with_ray(cfg: DictConfig, plan: RunPlan, run_id: str, driver_hook: Any) -> RunResult:
    driver = Driver(plan, run_id)
    with ThreadPoolExecutor(1, thread_name_prefix="resume-scan") as pool:
        scan = pool.submit(driver.prepare)  # the resume scan needs no Ray: it runs while Ray starts
        owns_ray = init_ray(cfg)  # in the main thread, where Ray sets its SIGTERM handler
    startup.phase("ray_init")
    services: list[Any] = []
    monitor = None
    try:
        scan.result()
        services = start_services(cfg, plan)
        startup.phase("services")
        monitor = start_run_monitor(cfg, plan, run_id)  # monitoring=true: docs/monitoring.md
        if driver_hook is not None:
            driver_hook(driver)
        return asyncio.run(_run_driver(driver))
    finally:
        if monitor is not None:
            failed = sys.exc_info()[0] is not None  # an error on its way out: no wait for the last counts
            monitor.finish(driver.stats.done if not failed else None)
        for svc in services:
            svc.stop()
        if owns_ray:
            import ray

            ray.shutdown()


async def _run_driver(driver: Driver) -> RunResult:
    try:
        install_signal_handlers(driver)
    except (RuntimeError, ValueError):  # not the main thread (e.g. inside a test harness)
        pass
    return await driver.run()


def init_ray(cfg: DictConfig) -> bool:
    """Connect to the cluster's Ray, or start a local one. True if we started it."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    # Before `import ray`: joining a matrix cluster sets Ray's auth mode in the
    # environment, and Ray reads it once, at import.
    address = _cluster_address(cfg)
    import ray

    if address:
        ray.init(address=address, namespace="matrix_hpc", log_to_driver=True)
        return True
    monitored = bool(cfg.get("monitoring", False))
    start_local_ray(cfg.run.num_cpus, namespace="matrix_hpc", log_to_driver=True,
                    metrics_interval_s=cfg.prometheus.ray_export_interval_s if monitored else None)
    return True


def _cluster_address(cfg: DictConfig) -> str | None:
    """The Ray address of a running matrix cluster, if the cluster config names one."""
    if os.environ.get("MATRIX_RAY_ADDRESS"):
        return os.environ["MATRIX_RAY_ADDRESS"]
    from matrix_hpc.cluster import ClusterError, ray_address_for  # None unless `cluster up` started a head

    conf = OmegaConf.to_object(cfg.cluster)
    try:
        return ray_address_for(conf)  # type: ignore[no-any-return]
    except ClusterError as e:
        if getattr(conf, "backend", "local") != "local":
            raise
        log.warning("%s; starting a local Ray instead", e)  # a stale local cluster must not stop a run
        return None


def start_services(cfg: DictConfig, plan: RunPlan) -> list[Any]:
    """Start the LLM / sandbox services the config asks for; register one
    per-process client factory each in ``plan.services``."""
    started: list[Any] = []
    for group in ("llm", "sandbox"):
        node = cfg.get(group)
        if node is None or node.get("backend", "none") in ("none", "disabled"):
            continue
        service = _start_service(group, OmegaConf.to_object(node), plan)
        started.append(service)
        factory = service.client_factory()
        if factory is not None:
            plan.services[group] = factory
    try:
        started += _attach_role_services(cfg, plan)
    except BaseException:  # a role's service is not deployed: what started for this run stops again
        for service in started:
            service.stop()
        raise
    return started


def _attach_role_services(cfg: DictConfig, plan: RunPlan) -> list[Any]:
    """Deployed services named per role (``workflow.teacher_llm.service=NAME``, docs/serve.md): attached
    now, so a name that is not deployed fails the run before its first task."""
    from matrix_hpc.workflows.llm_steps import role_service_key, role_services

    names = role_services(plan.workflow)
    if not names:  # the LLM service modules cost 0.2 s to import: only when a role names a service
        return []
    from matrix_hpc.services.llm.config import LLMConf
    from matrix_hpc.services.llm.service import start_llm_service
    from matrix_hpc.store.layout import META_DIR

    llm = cfg.get("llm")
    attached = []
    for name in names:
        conf = LLMConf(backend="deployed", name=name)
        if llm is not None and "client" in llm:  # the run's client settings (timeouts, retries) apply to it too
            conf.client = OmegaConf.to_object(llm.client)  # type: ignore[assignment]
        service = start_llm_service(conf, Path(plan.output.dir).expanduser() / META_DIR / "services" / name)
        attached.append(service)
        factory = service.client_factory()
        if factory is not None:
            plan.services[role_service_key(name)] = factory
    return attached


def _start_service(group: str, conf: Any, plan: RunPlan) -> Any:
    from matrix_hpc.store.layout import META_DIR

    if group == "llm":
        from matrix_hpc.services.llm.service import start_llm_service

        return start_llm_service(conf, Path(plan.output.dir).expanduser() / META_DIR / "services")
    from matrix_hpc.services.sandbox.service import start_service

    return start_service(conf, plan)
