"""A cluster that `cluster up` starts lets no one in without its token
(docs/security.md): on the local backend and on the real Slurm test cluster,
a client from a clean environment is refused, one with the token file runs,
a run joins and completes, the dashboard binds loopback and asks for the
token, and the token is in no command line, log, config or row."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from matrix_hpc.cluster import ClusterConf, LocalClusterConf, cluster_down, cluster_up
from matrix_hpc.cluster.slurm_run import submit_run, wait_run
from matrix_hpc.cluster.state import ClusterState
from tests.integration.runs import REPO, read_rows, run_cli, write_jsonl
from tests.integration.security_checks import cmdlines_with, files_with, open_http_listeners, run_ray_client

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray"), pytest.mark.timeout(900)]


def _rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"s{i:04d}", "question": f"Q{i}?"} for i in range(n)]


@pytest.fixture
def up() -> Iterator[list[ClusterConf]]:
    """Clusters appended here are brought up by the test and taken down afterwards, whatever happened."""
    confs: list[ClusterConf] = []
    yield confs
    for conf in confs:
        cluster_down(conf)


def assert_token_guards_the_cluster(conf: ClusterConf, home: Path) -> str:
    """Token file private; no-token and wrong-token clients refused; the token file admits. Returns the token."""
    state = ClusterState(conf.cluster_dir)
    st = os.lstat(state.token_file)
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
    token = state.token_file.read_text()
    assert len(token) == 64
    head = state.head()
    assert head is not None
    home.mkdir(exist_ok=True)
    for env in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        refused = run_ray_client(head.address, home, **env)
        assert "RESULT" not in refused.stdout and refused.returncode != 0, (env, refused.stdout, refused.stderr[-2000:])
        assert "Authentication token is missing or incorrect" in refused.stderr, refused.stderr[-2000:]
    admitted = run_ray_client(head.address, home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state.token_file))
    assert f"RESULT {os.getuid()}" in admitted.stdout, admitted.stderr[-3000:]
    return token


def assert_token_nowhere(token: str, conf: ClusterConf, *more_roots: Path) -> None:
    """Not in any process's argv, nor in any file of the cluster dir (but the token file), the
    nodes' Ray session dirs (Ray's own logs) or ``more_roots`` (run outputs)."""
    assert cmdlines_with(token) == []
    state = ClusterState(conf.cluster_dir)
    ray_dirs = [Path(n["tmp_dir"]) for n in state.nodes()]
    assert ray_dirs, "no Ray node files: the cluster is not up"
    leaks = files_with(token, [state.root, *ray_dirs, *more_roots], skip=[state.token_file])
    assert leaks == []


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_local_cluster_refuses_clients_without_its_token_and_runs_with_it(tmp_path: Path, up: list) -> None:
    conf = LocalClusterConf(name=f"sec{os.getpid()}", dir=str(tmp_path / "cluster"), workers=1,
                            head_wait_timeout_s=240, include_dashboard=True)
    conf.worker.cpus_per_task = 2
    up.append(conf)
    cluster_up(conf)
    token = assert_token_guards_the_cluster(conf, tmp_path / "home")

    head = ClusterState(conf.cluster_dir).head()
    assert head is not None and head.dashboard_port
    dashboard = f"http://127.0.0.1:{head.dashboard_port}/api/jobs/"
    assert http_status(dashboard) == 401
    assert http_status(dashboard, token) == 200
    with pytest.raises(urllib.error.URLError):  # loopback only: not on the node's address
        http_status(f"http://{head.node_ip}:{head.dashboard_port}/api/jobs/")
    nodes = ClusterState(conf.cluster_dir).nodes()
    for node in nodes:  # no node serves anything (Ray's metrics exporter included) without a credential
        assert open_http_listeners(node["ray_pid"]) == [], node

    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "in.jsonl", _rows(40))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run = run_cli(f"dataset.path={data}", f"output.dir={out}", "cluster=local", f"cluster.dir={conf.dir}",
                  f"cluster.name={conf.name}", timeout_s=400, env={**env, "RAY_AUTH_TOKEN": "wrong-token-in-shell"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Connecting to existing Ray cluster at address: {head.address}" in run.stderr
    assert sorted(r["id"] for r in read_rows(out)) == [r["id"] for r in _rows(40)]
    assert_token_nowhere(token, conf, out)


@pytest.mark.needs("slurm")
def test_slurm_cluster_refuses_clients_without_its_token_and_runs_with_it(tmp_path: Path, up: list) -> None:
    from tests.integration.test_slurm_cluster import small_conf

    conf = small_conf(tmp_path, "sec")
    up.append(conf)
    cluster_up(conf)
    token = assert_token_guards_the_cluster(conf, tmp_path / "home")

    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "in.jsonl", _rows(60))
    job = submit_run([f"dataset.path={data}", f"output.dir={out}", "cluster=slurm", f"cluster.dir={conf.dir}",
                      f"cluster.name={conf.name}", "run.progress_interval_s=0", "run.num_workers=2"],
                     conf, cwd=str(REPO))
    assert wait_run(job, conf) == 0
    head = ClusterState(conf.cluster_dir).head()
    assert head is not None and head.address in Path(job.paths.stderr).read_text()  # joined this cluster
    assert sorted(r["id"] for r in read_rows(out)) == [r["id"] for r in _rows(60)]
    recorded = json.loads((conf.cluster_dir / "jobs.json").read_text())
    assert [j["role"] for j in recorded["jobs"]] == ["head", "worker", "driver"]
    assert_token_nowhere(token, conf, out)
