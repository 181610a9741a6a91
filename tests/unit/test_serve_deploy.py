"""What `serve up` makes of a config (docs/serve.md): names, the engine digest that decides between
scaling and a rolling replacement, no secret in the record, and the key file's guards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from matrix_hpc.services.llm.config import LLMConf, SimConf
from matrix_hpc.services.llm.deploy import DeployError, check_name, deployed_ref, ensure_key, read_key, spec_of
from matrix_hpc.services.llm.vllm_conf import VLLMConf


def test_names_are_checked_and_carry_the_service_alone() -> None:
    ref = deployed_ref("teacher70b")
    assert (ref.registry, ref.actor("vllm", 3)) == ("llm-service-teacher70b", "llm-replica-teacher70b-3")
    for bad in ("", "-x", "a b", "a/b", "x" * 64):
        with pytest.raises(DeployError, match="llm.name="):
            check_name(bad)


def test_replica_count_is_not_part_of_the_engine_digest_but_every_engine_setting_is() -> None:
    one, four = (spec_of(LLMConf(backend="sim", sim=SimConf(num_replicas=n))) for n in (1, 4))
    assert one.digest == four.digest and (one.replicas, four.replicas) == (1, 4)
    assert spec_of(LLMConf(backend="sim", sim=SimConf(ttft_s=0.5))).digest != one.digest
    base = spec_of(LLMConf(backend="vllm", vllm=VLLMConf(model="m", env={"HF_TOKEN": "s3cret"})))
    other = spec_of(LLMConf(backend="vllm", vllm=VLLMConf(model="m", env={"HF_TOKEN": "other"})))
    assert base.digest != other.digest and "s3cret" not in repr(base.engine)
    assert base.engine["env_keys"] == ["HF_TOKEN"] and (base.model, base.dialect) == ("m", "vllm")
    with pytest.raises(DeployError, match="deployable backends: sim, vllm, openai"):
        spec_of(LLMConf(backend="none"))


def test_key_file_is_private_kept_across_updates_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "svc" / "api_key"
    key = ensure_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600 and len(key.get() or "") >= 40
    assert ensure_key(path).get() == key.get()  # a second `serve up` keeps the key
    assert key.get() not in repr(key)
    os.chmod(path, 0o644)
    with pytest.raises(DeployError, match="mode 0600"):
        read_key(path)
    os.chmod(path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(DeployError, match="regular file"):
        read_key(link)


def test_autoscaling_follows_outstanding_requests_within_bounds_one_step_down_at_a_time() -> None:
    from matrix_hpc.services.llm.autoscale import desired_replicas
    from matrix_hpc.services.llm.config import AutoscaleConf

    conf = AutoscaleConf(min_replicas=1, max_replicas=4, target_outstanding=10)
    assert [desired_replicas(1, load, conf) for load in (0, 10, 11, 35, 400)] == [1, 1, 2, 4, 4]
    assert [desired_replicas(4, load, conf) for load in (0, 25, 31, 40)] == [3, 3, 4, 4]  # down by one, drained
    assert desired_replicas(2, 0, AutoscaleConf(min_replicas=2, max_replicas=3)) == 2
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        AutoscaleConf(min_replicas=3, max_replicas=2)


def test_status_json_lists_llm_services_first_then_sandbox_pools_each_with_its_kind() -> None:
    import json

    from matrix_hpc.cli.serve_cmd import status_entries
    from matrix_hpc.services.sandbox.lease import PoolStats

    services = [{"name": "tea", "backend": "sim", "replica_list": []}]
    pools = [{"name": "tools", "backend": "bwrap", "size": 2, "stats": PoolStats(live=1, granted=5)},
             {"name": "odd", "backend": "?", "size": 0, "stats": "unreachable (GetTimeoutError)"}]
    entries = json.loads(json.dumps(status_entries(services, pools)))
    assert [(e["kind"], e["name"]) for e in entries] == [
        ("llm_service", "tea"), ("sandbox_pool", "tools"), ("sandbox_pool", "odd")]
    assert entries[1]["stats"]["granted"] == 5 and entries[1]["stats"]["live"] == 1
    assert entries[2]["stats"] == "unreachable (GetTimeoutError)" and entries[0]["replica_list"] == []
