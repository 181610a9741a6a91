"""Cluster config: building from dicts/yaml, refusing typos, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from matrix_hpc.cluster.config import ClusterConf, JobShapeConf, LocalClusterConf, SlurmClusterConf, as_cluster_conf

REPO = Path(__file__).resolve().parents[2]


def test_dict_with_backend_slurm_builds_slurm_conf_with_nested_parts() -> None:
    conf = as_cluster_conf({"backend": "slurm", "name": "x", "worker": {"cpus_per_task": 16, "gpus_per_node": 4},
                            "slurm": {"partition": "gpu", "additional_parameters": {"reservation": "r"}}})
    assert isinstance(conf, SlurmClusterConf)
    assert conf.worker == JobShapeConf(cpus_per_task=16, gpus_per_node=4)
    assert conf.slurm.partition == "gpu" and conf.slurm.additional_parameters == {"reservation": "r"}
    assert conf.head.cpus_per_task == 1  # untouched parts keep their defaults


def test_minimal_local_node_gets_local_defaults() -> None:
    conf = as_cluster_conf(OmegaConf.create({"backend": "local"}))
    assert isinstance(conf, LocalClusterConf) and conf.workers == 1


def test_unknown_setting_is_refused_with_valid_settings_listed() -> None:
    with pytest.raises(ValueError) as e:
        as_cluster_conf({"backend": "slurm", "slurm": {"partiton": "gpu"}})
    text = str(e.value)
    assert "partiton" in text and "cluster.slurm" in text and "partition=None" in text


def test_bad_backend_and_bad_shape_name_the_setting() -> None:
    with pytest.raises(ValueError, match="cluster.backend='pbs'; valid choices: local, slurm"):
        ClusterConf(backend="pbs")
    with pytest.raises(ValueError, match="cpus_per_task=0"):
        JobShapeConf(cpus_per_task=0)


def test_cluster_dir_defaults_to_home_and_resolves_explicit(tmp_path: Path) -> None:
    assert ClusterConf(name="abc").cluster_dir == Path.home() / ".matrix_hpc" / "clusters" / "abc"
    assert ClusterConf(dir=str(tmp_path / "c")).cluster_dir == tmp_path / "c"


def test_slurm_yaml_matches_the_schema() -> None:
    data = OmegaConf.load(REPO / "conf" / "cluster" / "slurm.yaml")
    data.pop("defaults")
    merged = OmegaConf.merge(OmegaConf.structured(SlurmClusterConf), data)
    conf = as_cluster_conf(merged)
    assert isinstance(conf, SlurmClusterConf) and conf.slurm.signal_delay_s == 120
