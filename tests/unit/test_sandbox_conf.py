"""Sandbox configuration: validation messages, binds, limits, the bwrap command shape, Hydra yaml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from matrix_hpc.services.sandbox.binds import Bind, parse_bind, python_binds
from matrix_hpc.services.sandbox.bwrap import bwrap_argv, isolation_args, mount_parent_args, sandbox_env
from matrix_hpc.services.sandbox.contract import SandboxConf, command_argv
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf, prlimit_argv
from matrix_hpc.services.sandbox.pool_conf import SandboxPoolConf

REPO = Path(__file__).resolve().parents[2]


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="choose one of bwrap, apptainer, trusted_subprocess"):
        SandboxConf(backend="docker")


@pytest.mark.parametrize("spec,expected", [
    ("/data", Bind("/data", "/data", False)),
    ("/data:/in", Bind("/data", "/in", False)),
    ("/data:/in:rw", Bind("/data", "/in", True)),
    ("/data::ro", Bind("/data", "/data", False)),
])
def test_parse_bind(spec: str, expected: Bind) -> None:
    assert parse_bind(spec) == expected


@pytest.mark.parametrize("spec,msg", [("", "malformed"), ("/a:/b:rx", "must be 'ro' or 'rw'"),
                                      ("rel:/b", "absolute"), ("/a:/b:ro:x", "malformed")])
def test_bad_binds_are_refused_at_config_time(spec: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        SandboxConf(binds=[spec])


def test_limit_and_pool_checks_name_the_setting() -> None:
    with pytest.raises(ValueError, match="sandbox.limits.mem_mb must be > 0"):
        SandboxLimitsConf(mem_mb=0)
    with pytest.raises(ValueError, match="sandbox.pool.size must be >= 1"):
        SandboxPoolConf(size=0)
    with pytest.raises(ValueError, match="lease_ttl_s=1.0 must be at least twice"):
        SandboxPoolConf(lease_ttl_s=1.0, reap_interval_s=2.0)
    with pytest.raises(ValueError, match="sandbox.pool.mode='k8s' is unknown"):
        SandboxPoolConf(mode="k8s")


def test_prlimit_prefix() -> None:
    lim = SandboxLimitsConf(mem_mb=100, cpu_time_s=5, max_procs=7, max_file_mb=1, max_open_files=50)
    assert prlimit_argv(lim) == ["prlimit", "--as=104857600", "--cpu=5", "--fsize=1048576", "--nofile=50",
                                 "--core=0", "--nproc=7", "--"]
    assert "--nproc=7" not in prlimit_argv(lim, nproc=False)


def test_command_argv() -> None:
    assert command_argv("echo hi | wc") == ["/bin/sh", "-c", "echo hi | wc"]
    assert command_argv(("python3", "x.py")) == ["python3", "x.py"]
    with pytest.raises(ValueError, match="non-empty"):
        command_argv([])


def test_bwrap_as_root_drops_to_the_sandbox_uid_without_network() -> None:
    argv = bwrap_argv(SandboxConf(), Path("/tmp/s/x/scratch"), 7, "/scratch", host_uid=200123)
    joined = " ".join(argv)
    assert "--unshare-net" in argv and "--unshare-pid" in argv and "--die-with-parent" in argv
    assert "--bind /tmp/s/x/scratch /scratch" in joined
    assert "--ro-bind /usr /usr" in joined and "--clearenv --args 7" in joined and "--setenv" not in argv
    assert argv[-8:] == ["setpriv", "--reuid=200123", "--regid=200123", "--clear-groups", "--inh-caps=-all",
                         "--bounding-set=-all", "--no-new-privs", "--"]
    assert "--share-net" not in argv


def test_bwrap_unprivileged_uses_a_user_namespace_and_limits_inside() -> None:
    flags, prefix = isolation_args(None, 9)
    assert "--unshare-all" in flags and "--unshare-user" in flags and "--disable-userns" in flags
    assert prefix == ["prlimit", "--nproc=9", "--"]


def test_image_replaces_the_host_root() -> None:
    argv = bwrap_argv(SandboxConf(image="/images/py"), Path("/s"), {}, "/scratch", host_uid=None)
    assert argv[1:4] == ["--ro-bind", "/images/py", "/"] and "/usr" not in argv[4:6]


def test_mount_parents_are_made_traversable_but_system_dirs_left_alone() -> None:
    args = mount_parent_args([Bind("/root/.pyenv/versions/3", "/root/.pyenv/versions/3", False),
                              Bind("/x", "/usr/local/lib/y", False)])
    assert args == ["--perms", "0755", "--dir", "/root", "--perms", "0755", "--dir", "/root/.pyenv",
                    "--perms", "0755", "--dir", "/root/.pyenv/versions"]


def test_python_is_bound_read_only_and_first_on_path() -> None:
    binds = python_binds()
    assert all(not b.writable for b in binds)
    env = sandbox_env(SandboxConf(env={"X": "y"}), {"Z": "1"})
    assert env["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin")
    assert env["HOME"] == "/scratch" and env["X"] == "y" and env["Z"] == "1"
    assert "PYTHONPATH" not in env and "LD_PRELOAD" not in env  # nothing leaks in from the host


@pytest.mark.parametrize("name", ["bwrap", "apptainer", "trusted_subprocess"])
def test_yaml_composes_into_the_dataclass(name: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    ConfigStore.instance().store(group="sandbox", name="sandbox_schema", node=SandboxConf)
    GlobalHydra.instance().clear()
    overrides = [f"+sandbox={name}"] + (["sandbox.image=/img.sif"] if name == "apptainer" else [])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(overrides=overrides)
    conf = OmegaConf.to_object(cfg.sandbox)
    assert isinstance(conf, SandboxConf) and conf.backend == name
    assert isinstance(conf.limits, SandboxLimitsConf) and isinstance(conf.pool, SandboxPoolConf)


def test_cgroup_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="sandbox.limits.cgroup='maybe' is unknown"):
        SandboxLimitsConf(cgroup="maybe")


def test_commands_join_the_cgroup_before_they_run(tmp_path: Path) -> None:
    """The join prefix writes the command's own pid (exec keeps it) into every cgroup.procs."""
    import subprocess

    from matrix_hpc.services.sandbox.cgroups import SandboxCgroup

    cg = SandboxCgroup.__new__(SandboxCgroup)
    cg.v2, cg.dirs = False, [tmp_path / "memory x", tmp_path / "pids"]
    for d in cg.dirs:
        d.mkdir()
        (d / "cgroup.procs").touch()
    out = subprocess.run(cg.join_prefix() + ["/bin/sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    pid = out.stdout.strip()
    assert [(d / "cgroup.procs").read_text().strip() for d in cg.dirs] == [pid, pid]


def test_required_cgroup_without_one_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_hpc.services.sandbox import cgroups

    monkeypatch.setattr(cgroups, "find_parents", lambda override=None: None)
    cgroups.cgroup_parents.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="set sandbox.limits.cgroup=auto"):
            cgroups.cgroup_parents("required", None)
        assert cgroups.cgroup_parents("auto", None) is None
    finally:
        cgroups.cgroup_parents.cache_clear()


@pytest.mark.parametrize("old", ["none", "subprocess"])
def test_the_old_unsandboxed_names_fail_saying_what_they_are_now(old: str) -> None:
    renamed = r"was renamed: .*no isolation.* now sandbox=trusted_subprocess.*sandbox=disabled"
    with pytest.raises(ValueError, match=renamed):
        SandboxConf(backend=old)


@pytest.mark.parametrize("group_option", ["none", "subprocess"])
def test_sandbox_none_on_the_command_line_names_the_new_option(group_option: str) -> None:
    from matrix_hpc.cli.config_check import ConfigError, compose

    with pytest.raises(ConfigError, match="now sandbox=trusted_subprocess"):
        compose([f"sandbox={group_option}", "dataset.path=x", "output.dir=y"], str(REPO / "conf"))


def test_pool_actor_names_follow_the_config_but_not_the_secrets() -> None:
    from matrix_hpc.services.sandbox.pool_identity import config_differences, pool_actor_name

    base = SandboxConf(env={"HF_TOKEN": "canary-1"})
    name = pool_actor_name(base)
    assert name.startswith("sandbox-pool-default-") and "canary" not in name
    assert pool_actor_name(SandboxConf(env={"HF_TOKEN": "canary-2"})) == name  # same pool; values compared later
    assert pool_actor_name(SandboxConf(pool=SandboxPoolConf(mode="ray"), env={"HF_TOKEN": "x"})) == name
    other = SandboxConf(env={"HF_TOKEN": "canary-1"}, limits=SandboxLimitsConf(mem_mb=64), binds=["/data"])
    assert pool_actor_name(other) != name
    assert config_differences(base, other) == ["binds", "limits.mem_mb"]
    assert config_differences(base, SandboxConf(env={"HF_TOKEN": "canary-2"})) == ["env.HF_TOKEN"]


def test_env_values_stay_out_of_the_repr() -> None:
    assert "canary" not in repr(SandboxConf(env={"HF_TOKEN": "canary"}))


def test_a_registered_backend_is_found_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from matrix_hpc.services.sandbox import registry
    from matrix_hpc.services.sandbox.trusted_subprocess import TrustedSubprocessSandbox

    monkeypatch.setattr(registry, "_SANDBOX_BACKENDS", dict(registry._SANDBOX_BACKENDS))
    registry.register_backend("mine", "matrix_hpc.services.sandbox.trusted_subprocess:TrustedSubprocessSandbox")
    conf = SandboxConf(backend="mine", scratch_root=str(tmp_path))
    assert isinstance(registry.create_sandbox(conf, "t"), TrustedSubprocessSandbox)
    with pytest.raises(ValueError, match="choose one of bwrap, apptainer, trusted_subprocess, mine"):
        SandboxConf(backend="docker")


def test_the_contract_imports_no_backend() -> None:
    import subprocess

    backends = ("bwrap", "apptainer", "trusted_subprocess", "local_pool", "ray_pool", "ray_pool_actor")
    code = ("import sys, matrix_hpc.services.sandbox.contract\n"
            f"print(sorted(m for m in sys.modules if m.rsplit('.', 1)[-1] in {backends!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
