"""What a vLLM replica runs: its settings (``llm.vllm``, :class:`VLLMConf`),
the server's command line and environment, and the interpreter that has
vLLM. Pure functions of the config; the actor that runs them is
``vllm_replica.py``.

    server_command(VLLMConf(model="models/tiny-llama"), python, "127.0.0.1", 8000, use_gpu=False)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matrix_hpc.services.llm.contract import Secret

REPO_ROOT = Path(__file__).resolve().parents[3]
VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
DEVICES = ("auto", "gpu", "cpu")
#: What a replica runs: vLLM's OpenAI server, the simulated endpoint, or any server from ``command``.
ENGINES = ("vllm", "sim", "command")
#: Placeholders a ``command`` template may use.
COMMAND_FIELDS = ("python", "host", "port", "model", "served_model_name")
#: The variable each preset reads its API key from (``command``: ``api_key_env``).
PRESET_KEY_ENV = {"vllm": "VLLM_API_KEY", "sim": "MATRIX_SIM_API_KEY"}
CPU_BINDS = ("spread", "auto", "nobind")
EXECUTORS = ("auto", "mp", "ray")
#: The auth middleware (vllm_auth.py), importable under this name from the server's hook dir.
AUTH_MODULE = "matrix_hpc_vllm_auth"



@dataclass
class VLLMConf:
    """``llm.vllm``: vLLM replicas served from Ray actors."""

    # What each replica runs: 'vllm' (vLLM's OpenAI server), 'sim' (the simulated endpoint), or 'command':
    # any OpenAI-compatible server started from `command` (SGLang, TGI, llama.cpp's server, ...).
    engine: str = "vllm"
    # engine=command: the server's argv, words may hold {python} {host} {port} {model} {served_model_name}, e.g.
    # ["{python}", "-m", "sglang.launch_server", "--model-path", "{model}", "--host", "{host}", "--port", "{port}"].
    command: list[str] = field(default_factory=list)
    # engine=command: the environment variable the server reads its API key from (never argv).
    api_key_env: str = ""
    # GET path that answers 200 once the server is ready (and is open without the key).
    health_path: str = "/health"
    # Model directory or Hugging Face name (a relative path is resolved against the working directory).
    model: str = "models/tiny-llama"
    # Name clients send as "model"; '' = the model path or name as given.
    served_model_name: str = ""
    # GPUs per pipeline stage (vLLM --tensor-parallel-size).
    tensor_parallel_size: int = 1
    # Pipeline stages (vLLM --pipeline-parallel-size); > 1 spans nodes: vLLM's Ray executor places the
    # tensor x pipeline GPU workers through a Ray placement group on this cluster.
    pipeline_parallel_size: int = 1
    # vLLM --distributed-executor-backend: 'auto' = 'ray' when pipeline_parallel_size > 1, else vLLM's
    # own choice (one node, its processes); 'ray' lets even a tensor-parallel replica span nodes.
    distributed_executor_backend: str = "auto"
    # Replicas to start (each a Ray actor with its own server).
    num_replicas: int = 1
    # Context window in tokens (vLLM --max-model-len); 0 = the model's own.
    max_model_len: int = 2048
    # Fraction of each GPU's memory vLLM may use (ignored on CPU).
    gpu_memory_utilization: float = 0.9
    # Weights/activations dtype (vLLM --dtype): auto, bfloat16, float16, float32.
    dtype: str = "auto"
    # More engine flags, passed through: {"max-num-seqs": 256, "enforce-eager": true} or ["--flag", "value"].
    extra_engine_args: Any = field(default_factory=dict)  # Any: dict or list, both valid in YAML
    # Seconds a (re)start may take until /health answers; model download and compilation count.
    startup_timeout_s: float = 900.0
    # Seconds between health checks of a running server.
    health_interval_s: float = 5.0
    # Seconds one health check may take.
    health_timeout_s: float = 10.0
    # Consecutive failed health checks that make a server count as dead.
    health_failures_to_restart: int = 3
    # First wait before restarting a dead server; doubles per consecutive failure.
    restart_backoff_s: float = 2.0
    # Cap of that wait.
    restart_backoff_max_s: float = 60.0
    # Restarts per replica before it gives up (-1 = never give up).
    max_restarts: int = -1
    # Times Ray may restart a dead replica actor (process or node lost); -1 = always.
    max_actor_restarts: int = -1
    # Seconds a stopping server gets between SIGTERM and SIGKILL.
    stop_grace_s: float = 10.0
    # Interpreter that has vllm installed; '' = <repo>/.venv-vllm/bin/python if it exists, else this one.
    python_executable: str = ""
    # Extra environment variables of the server (e.g. HF_HOME, VLLM_CPU_KVCACHE_SPACE).
    env: dict[str, str] = field(default_factory=dict)
    # Registry name of this service (clients look replicas up under it).
    service: str = "default"
    # 'gpu', 'cpu' (vllm-cpu), or 'auto' = gpu when the Ray cluster has GPUs.
    device: str = "auto"
    # Address the server binds: 'auto' = 127.0.0.1 on a one-node cluster, else the node IP.
    host: str = "auto"
    # CPU only: KV cache size per replica in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_space_gb: int = 1
    # CPU only: 'spread' gives replicas disjoint cores of the node, 'auto' is vLLM's own choice, 'nobind'.
    cpu_bind: str = "spread"
    # Ray CPUs each replica actor reserves (its server's cores are not Ray-managed).
    actor_num_cpus: float = 0.0
    # Extra Ray resources each replica actor reserves, e.g. {"vllm_node": 1}.
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"llm.vllm.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "command":
            if not self.command or not isinstance(self.command, (list, tuple)):
                raise ValueError("llm.vllm.engine=command needs llm.vllm.command, the server's argv as a list, e.g. "
                                 "['{python}', '-m', 'sglang.launch_server', '--host', '{host}', '--port', '{port}']")
            if not self.api_key_env:
                raise ValueError("llm.vllm.engine=command needs llm.vllm.api_key_env: the environment variable "
                                 "the server reads its API key from (a key in argv would be readable in /proc)")
            bad = sorted({name for word in self.command for name in _placeholders(str(word))} - set(COMMAND_FIELDS))
            if bad:
                raise ValueError(f"llm.vllm.command has unknown placeholder(s) {bad}; valid: {list(COMMAND_FIELDS)}")
            if not any("{port}" in str(word) for word in self.command):
                raise ValueError("llm.vllm.command must pass {port} to the server (the replica picks a free port)")
        if self.num_replicas < 1:
            raise ValueError(f"llm.vllm.num_replicas must be >= 1, got {self.num_replicas}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"llm.vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"llm.vllm.pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        if self.distributed_executor_backend not in EXECUTORS:
            raise ValueError(f"llm.vllm.distributed_executor_backend must be one of {EXECUTORS}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.device not in DEVICES:
            raise ValueError(f"llm.vllm.device must be one of {DEVICES}, got {self.device!r}")
        if self.cpu_bind not in CPU_BINDS:
            raise ValueError(f"llm.vllm.cpu_bind must be one of {CPU_BINDS}, got {self.cpu_bind!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"llm.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.extra_engine_args, (Mapping, list, tuple)):
            raise ValueError(
                "llm.vllm.extra_engine_args must be a mapping {flag: value} or a list of CLI words, "
                f"got {type(self.extra_engine_args).__name__}"
            )
        if self.health_failures_to_restart < 1:
            raise ValueError(f"llm.vllm.health_failures_to_restart must be >= 1, got {self.health_failures_to_restart}")

    @property
    def model_name(self) -> str:
        """What clients send as ``model``."""
        return self.served_model_name or self.model

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ray_executor(self) -> bool:
        """The server's workers are Ray actors in their own placement group (they may span nodes): the
        replica actor then holds no GPU itself."""
        return self.distributed_executor_backend == "ray" or (
            self.distributed_executor_backend == "auto" and self.pipeline_parallel_size > 1)

    @property
    def key_env(self) -> str:
        """The variable the server reads its API key from."""
        return self.api_key_env or PRESET_KEY_ENV.get(self.engine, "")


def _placeholders(word: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(word) if name is not None]


def as_vllm_conf(conf: VLLMConf | Mapping[str, Any]) -> VLLMConf:
    """A :class:`VLLMConf` from itself or a plain/OmegaConf mapping; unknown keys are named."""
    if isinstance(conf, VLLMConf):
        return conf
    if hasattr(conf, "_metadata"):  # an OmegaConf node: resolve it into plain containers
        from omegaconf import OmegaConf

        conf = OmegaConf.to_container(conf, resolve=True)  # type: ignore[assignment]
    valid = {f.name: f.default for f in dataclasses.fields(VLLMConf)}
    unknown = sorted(set(conf) - set(valid))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in valid.items() if not isinstance(v, dataclasses._MISSING_TYPE))
        raise ValueError(f"unknown llm.vllm setting(s) {unknown}; valid ones (defaults): {listing}")
    return VLLMConf(**dict(conf))


# -- the server command ------------------------------------------------------------


def engine_args_list(extra: Mapping[str, Any] | list[Any] | tuple[Any, ...]) -> list[str]:
    """CLI words from ``{"max-num-seqs": 8, "enforce-eager": True}`` or a ready list."""
    if not isinstance(extra, Mapping):
        return [str(x) for x in extra]
    words: list[str] = []
    for key, value in extra.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is False:
            words.append("--no-" + flag[2:])
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            words += [flag, *[str(v) for v in value]]
        elif isinstance(value, Mapping):
            import json

            words += [flag, json.dumps(value)]
        else:
            words += [flag, str(value)]
    return words


def server_command(conf: VLLMConf, python: str, host: str, port: int, use_gpu: bool) -> list[str]:
    """The replica's server argv: the engine preset's, or the ``command`` template filled in."""
    if conf.engine == "command":
        values = {"python": python, "host": host, "port": str(port), "model": conf.model,
                  "served_model_name": conf.model_name}
        return [str(word).format(**values) for word in conf.command]
    if conf.engine == "sim":  # the simulated endpoint as a managed server; its key from MATRIX_SIM_API_KEY
        return [python, "-m", "matrix_hpc.services.llm.sim_server", "--host", host, "--port", str(port),
                *engine_args_list(conf.extra_engine_args)]
    cmd = [python, "-m", VLLM_ENTRYPOINT, "--model", conf.model, "--host", host, "--port", str(port)]
    cmd += ["--served-model-name", conf.model_name, "--dtype", conf.dtype]
    cmd += ["--middleware", f"{AUTH_MODULE}.RequireApiKey"]  # the key itself: VLLM_API_KEY in server_env
    if conf.max_model_len:
        cmd += ["--max-model-len", str(conf.max_model_len)]
    if use_gpu:
        cmd += ["--tensor-parallel-size", str(conf.tensor_parallel_size)]
        cmd += ["--gpu-memory-utilization", str(conf.gpu_memory_utilization)]
    if conf.pipeline_parallel_size > 1:
        cmd += ["--pipeline-parallel-size", str(conf.pipeline_parallel_size)]
    if conf.ray_executor:
        cmd += ["--distributed-executor-backend", "ray"]
    elif conf.distributed_executor_backend == "mp":
        cmd += ["--distributed-executor-backend", "mp"]
    return cmd + engine_args_list(conf.extra_engine_args)


def resolve_python(conf: VLLMConf, use_gpu: bool = False) -> str:
    if conf.python_executable:
        return conf.python_executable
    if conf.engine != "vllm":  # the sim (matrix_hpc itself), or a command whose {python} is this interpreter
        return sys.executable
    # The source checkout's venv (editable install), else one in the working directory.
    for root in (REPO_ROOT, Path.cwd()):
        venv = root / ".venv-vllm"
        # .ci/setup_vllm.sh stamps a vllm-cpu venv; a GPU replica needs the real vllm instead.
        if (venv / "bin" / "python").exists() and not (use_gpu and any(venv.glob(".vllm-cpu-*"))):
            return str(venv / "bin" / "python")
    return sys.executable


def cpu_bind_list(index: int, num_replicas: int, cpus: list[int]) -> str:
    """Disjoint cores for replica ``index`` of ``num_replicas`` on this node (wraps when cores run out)."""
    per_replica = max(1, len(cpus) // num_replicas)
    start = (index * per_replica) % len(cpus)
    return ",".join(str(c) for c in cpus[start : start + per_replica])


def server_env(conf: VLLMConf, index: int, use_gpu: bool, api_key: Secret | None = None,
               ray_address: str | None = None) -> dict[str, str]:
    """The server's environment. ``ray_address``: the cluster's GCS, which a server with the Ray
    executor joins (its Ray token settings come with this process's environment, as a node's)."""
    key_vars = {"VLLM_API_KEY", conf.key_env}
    env = {k: v for k, v in os.environ.items() if k not in key_vars}
    # Ray pins OMP_NUM_THREADS for its workers; vLLM sizes its own threads from the core binding.
    env.pop("OMP_NUM_THREADS", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not use_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(conf.cpu_kvcache_space_gb)
        if conf.cpu_bind == "spread":
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_list(index, conf.num_replicas, sorted(os.sched_getaffinity(0)))
        elif conf.cpu_bind == "nobind":
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    env.update({k: str(v) for k, v in conf.env.items()})
    if api_key:
        env[conf.key_env] = str(api_key.get())  # vLLM: read by vLLM and by vllm_auth.RequireApiKey
    if conf.ray_executor and ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def install_auth_middleware(hook_dir: Path) -> None:
    """Copy vllm_auth.py into ``hook_dir`` (on the server's PYTHONPATH) as AUTH_MODULE."""
    source = (Path(__file__).with_name("vllm_auth.py")).read_text()
    target = hook_dir / f"{AUTH_MODULE}.py"
    hook_dir.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != source:
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, target)
