"""A run stores no secret: canaries in secret-named config fields are ``***``
in ``_matrix/`` (the recorded config and each run's copy), in Hydra's
``.hydra/`` files and a sweep's ``multirun.yaml``, and nowhere in logs or rows;
the run's own LLM clients reach the sim with the service's key (docs/security.md)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from matrix_hpc.cli.sweep_cmd import sweep_points
from tests.integration.runs import REPO, read_rows, run_cli, write_jsonl
from tests.integration.security_checks import files_with

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray"), pytest.mark.timeout(600)]


def _rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"r{i:04d}", "question": f"Q{i}?"} for i in range(n)]


def _canaries() -> tuple[str, str, list[str]]:
    """Two canaries and the overrides that put them in secret fields unused by a sim run."""
    name_canary = "CANARY_KEY_VAR_" + secrets.token_hex(6).upper()  # the NAME of a key's variable
    value_canary = "hf_canary_" + secrets.token_hex(8)  # a token in an env mapping
    return name_canary, value_canary, [f"llm.openai.api_key_env={name_canary}",
                                       f"+llm.vllm.env.HF_TOKEN={value_canary}"]


def test_a_run_records_its_config_with_secrets_redacted(tmp_path: Path) -> None:
    name_canary, value_canary, overrides = _canaries()
    data = write_jsonl(tmp_path / "in.jsonl", _rows(30))
    out = tmp_path / "out"
    r = run_cli("workflow=generate", "llm=sim", "llm.sim.num_replicas=2", "llm.sim.ttft_s=0.01",
                f"dataset.path={data}", f"output.dir={out}", *overrides)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_rows(out)
    assert len(rows) == 30 and {x["status"] for x in rows} == {"ok"}  # the clients had the sim's key

    recorded = OmegaConf.load(out / "_matrix" / "config.yaml")
    assert recorded.llm.openai.api_key_env == "***" and recorded.llm.vllm.env.HF_TOKEN == "***"
    assert recorded.llm.sim.num_replicas == 2  # the rest as it was
    run_copies = list((out / "_matrix" / "runs").glob("*/config.yaml"))
    hydra_dirs = list((out / "_matrix" / "hydra").glob("*/.hydra"))
    assert len(run_copies) == 1 and len(hydra_dirs) == 1
    assert OmegaConf.load(run_copies[0]).llm.vllm.env.HF_TOKEN == "***"
    assert sorted(p.name for p in hydra_dirs[0].iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert OmegaConf.load(hydra_dirs[0] / "config.yaml").llm.openai.api_key_env == "***"
    assert "+llm.vllm.env.HF_TOKEN=***" in OmegaConf.load(hydra_dirs[0] / "overrides.yaml")
    for canary in (name_canary, value_canary):
        assert files_with(canary, [out]) == []
        assert canary not in r.stdout + r.stderr


def test_a_sweep_records_its_configs_with_secrets_redacted(tmp_path: Path) -> None:
    name_canary, value_canary, overrides = _canaries()
    data = write_jsonl(tmp_path / "in.jsonl", _rows(20))
    cmd = [sys.executable, "-m", "matrix_hpc.cli.main", "run", "-m", "run.max_concurrent_tasks=4,8", "llm=sim",
           f"dataset.path={data}", f"output.dir={tmp_path}/out/mct_${{run.max_concurrent_tasks}}",
           f"hydra.sweep.dir={tmp_path}/sweep", "run.num_cpus=2", "run.progress_interval_s=0", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert (sweep / "multirun.yaml").stat().st_mode & 0o077 == 0  # private from the first byte
    assert sweep.stat().st_mode & 0o777 == 0o700  # and so is what a launcher pickles under it
    assert OmegaConf.load(sweep / "multirun.yaml").llm.vllm.env.HF_TOKEN == "***"
    points = sweep_points(sweep)  # reads each point's .hydra/config.yaml and overrides.yaml
    assert [(p.varied, p.ok) for p in points] == [("run.max_concurrent_tasks=4", 20),
                                                  ("run.max_concurrent_tasks=8", 20)]
    for canary in (name_canary, value_canary):
        assert files_with(canary, [sweep, tmp_path / "out"]) == []
