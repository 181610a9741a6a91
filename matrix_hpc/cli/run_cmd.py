"""``matrix-hpc run``: compose the config, start Ray, run the driver."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig

from matrix_hpc import startup
from matrix_hpc.cli.config_check import ConfigError, compose
from matrix_hpc.cli.main import conf_dir, fail
from matrix_hpc.procs import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_LOCKED

_result: dict[str, int] = {}


def run_command(overrides: list[str]) -> int:
    from matrix_hpc.cli.config_check import select_registered_workflow

    overrides = select_registered_workflow(overrides, str(conf_dir()))
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    try:
        if not multirun:  # a sweep's values (a=1,2) are not one config: Hydra checks each point itself
            compose(overrides, str(conf_dir()))  # clear errors before Hydra's own machinery
    except ConfigError as e:
        return fail(str(e))
    startup.phase("config_check")
    import hydra

    if multirun:  # compose() registered the schemas otherwise (a second registration costs ~0.3 s)
        from matrix_hpc.config.schema import register_configs

        register_configs()
    hydra_main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_hydra_task)
    argv, sys.argv = sys.argv, ["matrix-hpc-run", *overrides]
    plain_run = not multirun and not any(o.startswith(("-", "hydra.mode", "+hydra.mode")) for o in overrides)
    try:
        with _known_run_mode() if plain_run else contextlib.nullcontext():
            hydra_main()
    finally:
        sys.argv = argv
    return _result.get("code", 0)


@contextlib.contextmanager
def _known_run_mode() -> Iterator[None]:
    """Hydra composes the whole config once only to read ``hydra.mode`` (``Hydra.get_mode``)
    before it composes it again for the run: 0.2-0.3 s of a run's start (docs/performance.md,
    "Start-up"). Without -m, flags or a ``hydra.mode`` override, and with conf/ setting no
    mode, that read gives None, which Hydra takes as a single run: returned here without
    the compose. Private to Hydra, so pinned below 1.4 (pyproject.toml); a Hydra without
    the method composes as before."""
    from hydra._internal.hydra import Hydra

    get_mode = getattr(Hydra, "get_mode", None)
    if get_mode is None:
        yield
        return
    Hydra.get_mode = lambda self, config_name, overrides: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = get_mode  # type: ignore[method-assign]


def _hydra_task(cfg: DictConfig) -> Any:
    startup.phase("config_compose")
    code = run_from_config(cfg)
    _result["code"] = code
    return code


def _submit_to_slurm(cfg: DictConfig) -> int | None:
    """With cluster=slurm outside an allocation, the run becomes a Slurm job."""
    if (cfg.get("cluster") or {}).get("backend", "local") != "slurm":
        return None
    from matrix_hpc.cluster.slurm_run import maybe_submit_run

    return maybe_submit_run(cfg)


def run_from_config(cfg: DictConfig) -> int:
    """Run one job from a composed config; returns the process exit code."""
    from matrix_hpc.app.run import execute
    from matrix_hpc.cluster.monitoring import MonitoringError
    from matrix_hpc.runtime.placement import PlacementError
    from matrix_hpc.runtime.progress import FINISHED, INTERRUPTED
    from matrix_hpc.services.llm.deploy import ServeError
    from matrix_hpc.services.sandbox.ray_pool import PoolNotDeployed
    from matrix_hpc.store.conf import SinkPlacementError
    from matrix_hpc.store.input import InputPathError
    from matrix_hpc.store.lock import OutputLocked
    from matrix_hpc.store.resume import ResumeRefused

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    submitted = _submit_to_slurm(cfg)
    if submitted is not None:
        return submitted
    try:
        result = execute(cfg)
    except (ResumeRefused, InputPathError, MonitoringError, ServeError, PoolNotDeployed, SinkPlacementError,
            PlacementError) as e:
        return fail(str(e))
    except OutputLocked as e:  # its message names the holder and what to do
        fail(str(e))
        return EXIT_LOCKED
    if result.outcome == FINISHED:
        return 0
    return EXIT_INTERRUPTED if result.outcome == INTERRUPTED else EXIT_INCOMPLETE
