"""Each paper workload as a Slurm job on the real single-node Slurm
(.ci/setup_slurm.sh): `matrix-hpc run cluster=slurm workflow=... llm=sim`
submits the driver, which runs the workflow and writes one row per input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from matrix_hpc.cluster import slurm_available
from tests.conftest import require_component
from tests.integration.runs import REPO, read_rows
from tests.integration.test_slurm_cluster import cleanup, small_conf  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.timeout(600)]


def _retail_rows(path: Path, n: int) -> Path:
    from matrix_hpc.workflows.tau2.rows import task_rows

    rows = list(task_rows("retail"))[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("workflow", ["coral", "natural_reasoning",
                                      pytest.param("tau2", marks=pytest.mark.needs("tau2_data"))])
def test_each_paper_workflow_runs_as_a_slurm_job(workflow: str, tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    require_component(slurm_available(), "Slurm", "run .ci/setup_slurm.sh as root")
    conf = small_conf(tmp_path, workflow[:4])
    cleanup.append(conf)
    data = {"coral": ["dataset=mmlu_pro_sample", "workflow.max_turns=3"],
            # min_score=1: with the sim's random rubric scores the default of 3 on every
            # criterion passes ~1 document in 64, and 40 documents may all be dropped.
            "natural_reasoning": ["dataset=web_docs_sample", "workflow.require_boxed=false", "workflow.min_score=1"],
            "tau2": ["workflow.domain=retail", f"dataset.path={_retail_rows(tmp_path / 'tasks.jsonl', 8)}",
                     "workflow.max_steps=10"]}
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "matrix_hpc.cli.main", "run", "cluster=slurm", f"cluster.dir={conf.dir}",
           f"cluster.name={conf.name}", "cluster.driver.cpus_per_task=2", "cluster.driver.mem_gb=3",
           f"workflow={workflow}", *data[workflow], "llm=sim", f"output.dir={out}", "run.num_cpus=2",
           "run.progress_interval_s=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted run as Slurm job" in proc.stderr
    rows = read_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and len(ids) == (8 if workflow == "tau2" else 40)
    assert all(r["status"] in ("ok", "filtered", "failed") for r in rows)
    assert all(r["reason"] or r["error"] for r in rows if r["status"] != "ok")
    assert sum(r["status"] == "ok" for r in rows) > 0
