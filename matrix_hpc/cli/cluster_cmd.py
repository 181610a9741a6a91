"""``matrix-hpc cluster up|status|down [overrides]``: a Ray cluster's lifecycle.

    matrix-hpc cluster up cluster=slurm cluster.name=gen cluster.workers=4
    matrix-hpc cluster status cluster=slurm cluster.name=gen
    matrix-hpc cluster down cluster=slurm cluster.name=gen
"""

from __future__ import annotations

from omegaconf import OmegaConf

from matrix_hpc.cli.config_check import ConfigError, compose
from matrix_hpc.cli.main import conf_dir, fail

ACTIONS = ("up", "status", "down")


def cluster_command(args: list[str]) -> int:
    if not args or args[0] not in ACTIONS:
        return fail(f"usage: matrix-hpc cluster {{{'|'.join(ACTIONS)}}} cluster=slurm [cluster.KEY=VALUE ...]")
    action, overrides = args[0], args[1:]
    try:
        # A cluster needs no dataset or output: fill the run's mandatory keys with placeholders.
        cfg = compose(["dataset.path=-", "output.dir=-", *overrides], str(conf_dir()))
    except ConfigError as e:
        return fail(str(e))
    from matrix_hpc.cluster.lifecycle import cluster_main

    return cluster_main(action, OmegaConf.to_container(cfg.cluster, resolve=True))
