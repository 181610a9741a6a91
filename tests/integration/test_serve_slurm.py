"""Deployed services on the real Slurm test cluster (docs/serve.md): `cluster up`, `serve up` a sim
service and a vllm-cpu service, a coral run submitted as a Slurm job uses both (teacher on one,
student on the other), then `serve down` and `cluster down` leave no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from matrix_hpc.cluster import SlurmClusterConf, cluster_down, cluster_up
from matrix_hpc.cluster.slurm_run import submit_run, wait_run
from tests.integration.runs import REPO, assert_each_id_once, log_of, read_rows, write_jsonl
from tests.integration.test_serve import ROWS

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SlurmClusterConf]:
    from tests.integration.test_slurm_cluster import small_conf

    conf = small_conf(tmp_path, "srv")
    conf.head.cpus_per_task = 2  # the vLLM replica's actor and the sim's share the head with Ray
    try:
        cluster_up(conf)
        yield conf
    finally:
        cluster_down(conf)


def serve(conf: SlurmClusterConf, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "matrix_hpc.cli.main", "serve", *args, "cluster=slurm", f"cluster.dir={conf.dir}",
           f"cluster.name={conf.name}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_slurm_job_uses_a_deployed_sim_and_vllm_service_then_nothing_is_left(
        tmp_path: Path, cluster: SlurmClusterConf) -> None:
    sim = serve(cluster, "up", "llm=sim", "llm.name=tea", "llm.sim.num_replicas=1")
    assert sim.returncode == 0 and "llm service 'tea' deployed" in sim.stdout, log_of(sim)[-3000:]
    vllm = serve(cluster, "up", "llm=vllm", "llm.name=stu", "llm.vllm.model=models/tiny-llama",
                 "llm.vllm.num_replicas=1", "llm.vllm.max_model_len=512", "+llm.vllm.extra_engine_args.enforce-eager=true")
    assert vllm.returncode == 0 and "llm service 'stu' deployed" in vllm.stdout, log_of(vllm)[-4000:]

    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    job = submit_run(["workflow=coral", f"dataset.path={data}", f"output.dir={out}", "workflow.max_turns=1",
                      "workflow.speaker_max_tokens=8", "llm=deployed", "llm.name=stu",
                      "workflow.teacher_llm.service=tea", "cluster=slurm", f"cluster.dir={cluster.dir}",
                      f"cluster.name={cluster.name}", "run.progress_interval_s=0"], cluster, cwd=str(REPO))
    assert wait_run(job, cluster) == 0, Path(job.paths.stderr).read_text()[-4000:]
    assert_each_id_once(out, [r["id"] for r in ROWS])
    assert all(r["status"] in ("ok", "failed") for r in read_rows(out))
    # Both services answered the job: the sim counts its requests, vLLM logs each chat request.
    st = serve(cluster, "status", "--json")
    assert st.returncode == 0, log_of(st)[-3000:]
    services = {s["name"]: s for s in json.loads(st.stdout) if s["kind"] == "llm_service"}
    assert sum(r["requests"] for r in services["tea"]["replica_list"]) > 0
    (replica,) = services["stu"]["replica_list"]
    assert "POST /v1/chat/completions" in Path(replica["log"]).read_text()
    (sim_replica,) = services["tea"]["replica_list"]
    pids = [*replica["server_pids"], sim_replica["pid"]]
    assert len(pids) >= 2 and all(psutil.pid_exists(p) for p in pids), (pids, services)

    for name in ("tea", "stu"):
        down = serve(cluster, "down", f"llm.name={name}")
        assert down.returncode == 0, log_of(down)[-3000:]
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(psutil.pid_exists(p) for p in pids), "LLM server processes left after serve down"
