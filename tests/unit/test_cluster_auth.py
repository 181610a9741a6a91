"""The cluster's Ray token file: made private and whole, refused when anything about it is off (cluster/auth.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from matrix_hpc.cluster.auth import check_token, create_token, ensure_private_dir, node_env
from matrix_hpc.cluster.errors import ClusterError
from matrix_hpc.cluster.ray_node import NodeSpec, RayNode
from matrix_hpc.cluster.state import ClusterState


def test_token_is_made_once_private_and_complete(tmp_path: Path) -> None:
    token_file = tmp_path / "ray_auth_token"
    assert create_token(token_file) is True
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert create_token(token_file) is False and token_file.read_text() == token  # never replaced
    assert [p.name for p in tmp_path.iterdir()] == ["ray_auth_token"]  # no temporary file left


@pytest.mark.parametrize("problem", ["missing", "readable", "empty", "symlink"])
def test_a_token_file_with_a_problem_is_refused(tmp_path: Path, problem: str) -> None:
    token_file = tmp_path / "ray_auth_token"
    if problem == "readable":
        token_file.write_text("ab" * 32)
        token_file.chmod(0o644)
    elif problem == "empty":
        token_file.touch(mode=0o600)
    elif problem == "symlink":
        (tmp_path / "elsewhere").write_text("ab" * 32)
        (tmp_path / "elsewhere").chmod(0o600)
        token_file.symlink_to(tmp_path / "elsewhere")
    expected = {"missing": "no Ray token at", "readable": "others could read it", "empty": "is empty",
                "symlink": "is not a regular file"}[problem]
    with pytest.raises(ClusterError, match=expected):
        check_token(token_file)
    if problem == "readable":  # create_token does not adopt it either
        with pytest.raises(ClusterError, match="others could read it"):
            create_token(token_file)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file owned by someone else")
def test_a_token_file_of_another_user_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text("ab" * 32)
    token_file.chmod(0o600)
    os.chown(token_file, 65534, 65534)
    with pytest.raises(ClusterError, match="is owned by uid 65534, not you"):
        check_token(token_file)


def test_cluster_dir_is_made_private_and_a_shared_one_refused(tmp_path: Path) -> None:
    ensure_private_dir(tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ClusterError, match="writable by you alone: `chmod go-w"):
        ensure_private_dir(shared)
    with pytest.raises(ClusterError, match="writable by you alone"):
        with ClusterState(shared).locked():
            pass


def test_nodes_get_the_token_by_path_never_by_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token-from-the-calling-shell")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    state = ClusterState(tmp_path)
    create_token(state.token_file)
    env = node_env(state.token_file)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(state.token_file)
    assert "RAY_AUTH_TOKEN" not in env
    head = RayNode(NodeSpec(role="head", num_cpus=1, include_dashboard=True), state, "1", 0)
    monkeypatch.setattr("matrix_hpc.cluster.ray_node.node_ip", lambda: "10.0.0.7")
    cmd = head.command(None, 6379, 8265)
    assert cmd[cmd.index("--dashboard-host") + 1] == "127.0.0.1"
    assert state.token_file.read_text() not in " ".join(cmd)


def test_a_local_run_keeps_rays_default_token_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_hpc.cluster.auth import private_local_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    private_local_token()  # none yet: made 0600 (Ray would write it 0644)
    token_file = tmp_path / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text()) == 64
    token_file.chmod(0o644)  # as an earlier Ray wrote it
    private_local_token()
    assert token_file.stat().st_mode & 0o777 == 0o600
