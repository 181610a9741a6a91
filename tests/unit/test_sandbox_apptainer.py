"""The Apptainer backend's commands, compared with golden strings (Apptainer is cluster-only)."""

from __future__ import annotations

import shlex

import pytest

from matrix_hpc.services.sandbox.apptainer import exec_argv, instance_name, process_env, start_argv, stop_argv
from matrix_hpc.services.sandbox.contract import ApptainerConf, SandboxConf
from matrix_hpc.services.sandbox.limits import SandboxLimitsConf
from matrix_hpc.services.sandbox.registry import create_sandbox

LIMITS = SandboxLimitsConf(mem_mb=512, cpu_time_s=10, max_procs=32, max_file_mb=8, max_open_files=128)


def conf(**kw: object) -> SandboxConf:
    base: dict[str, object] = dict(backend="apptainer", image="/shared/images/py311.sif", limits=LIMITS)
    base.update(kw)
    return SandboxConf(**base)  # type: ignore[arg-type]


def test_start_with_binds_env_gpus_and_no_network() -> None:
    c = conf(binds=["/data/ds:/data:ro", "/shared/out:/out:rw"], env={"A": "1", "LANG": "C.UTF-8"}, gpus=1)
    got = shlex.join(start_argv(c, "/tmp/sb/t1-ab/scratch", "mhpc_t1-ab"))
    assert got == (
        "apptainer instance start --containall --net --network none "
        "--bind /tmp/sb/t1-ab/scratch:/scratch:rw --bind /data/ds:/data:ro --bind /shared/out:/out:rw "
        "--nv /shared/images/py311.sif mhpc_t1-ab"
    )


def test_env_reaches_apptainer_as_variables_never_as_arguments() -> None:
    c = conf(env={"HF_TOKEN": "canary-start"})
    assert "canary-start" not in " ".join(start_argv(c, "/s", "mhpc_x"))
    assert "canary-exec" not in " ".join(exec_argv(c, "mhpc_x", ["true"], "/scratch"))
    env = process_env("apptainer", {"HF_TOKEN": "canary-exec"}, host={"PATH": "/bin", "APPTAINERENV_X": "stray"})
    assert env == {"PATH": "/bin", "APPTAINERENV_HF_TOKEN": "canary-exec"}  # --cleanenv still honours these
    assert process_env("/opt/bin/singularity", {"A": "1"}, host={}) == {"SINGULARITYENV_A": "1"}


def test_start_minimal_has_no_gpu_and_optional_flags() -> None:
    got = shlex.join(start_argv(conf(), "/s", "mhpc_x"))
    assert got == ("apptainer instance start --containall --net --network none --bind /s:/scratch:rw "
                   "/shared/images/py311.sif mhpc_x")


def test_start_fakeroot_writable_tmpfs_cgroups_and_binary() -> None:
    app = ApptainerConf(binary="/opt/apptainer/bin/apptainer", fakeroot=True, writable_tmpfs=True, cgroup_limits=True)
    got = shlex.join(start_argv(conf(apptainer=app, binds=["/ro"]), "/s", "mhpc_x"))
    assert got == (
        "/opt/apptainer/bin/apptainer instance start --containall --net --network none --bind /s:/scratch:rw "
        "--bind /ro:/ro:ro --fakeroot --writable-tmpfs --memory 512M --pids-limit 32 /shared/images/py311.sif mhpc_x"
    )


def test_exec_runs_in_the_instance_under_limits() -> None:
    got = shlex.join(exec_argv(conf(env={"A": "1"}), "mhpc_x", ["python3", "-c", "print(1)"], "/scratch"))
    assert got == (
        "apptainer exec --cleanenv --pwd /scratch instance://mhpc_x "
        "prlimit --as=536870912 --cpu=10 --fsize=8388608 --nofile=128 --core=0 --nproc=32 -- "
        "python3 -c 'print(1)'"
    )


def test_stop() -> None:
    assert shlex.join(stop_argv(conf(), "mhpc_x")) == "apptainer instance stop --force mhpc_x"


def test_instance_names_are_sanitised() -> None:
    assert instance_name("task/7:a b-1") == "mhpc_task_7_a_b-1"


def test_apptainer_needs_an_image() -> None:
    with pytest.raises(ValueError, match="needs sandbox.image"):
        SandboxConf(backend="apptainer")


async def test_missing_apptainer_binary_says_what_to_do(tmp_path: object) -> None:
    c = conf(apptainer=ApptainerConf(binary="apptainer-not-installed-here"), scratch_root=str(tmp_path))
    sb = create_sandbox(c, "t")
    with pytest.raises(RuntimeError, match="module load apptainer"):
        await sb.start()
    assert not sb.started
