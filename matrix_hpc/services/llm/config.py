"""Typed configuration of the LLM service: which backend, and how clients talk to it.

``LLMConf.backend`` picks one of the sibling confs (``sim``, ``openai``,
``vllm``); ``client`` applies to all of them. Defaults run on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from matrix_hpc.services.llm.vllm_conf import VLLMConf

BACKENDS = ("sim", "openai", "vllm", "deployed", "none")
DIALECTS = ("vllm", "openai")


@dataclass
class ClientConf:
    """How each worker process's :class:`LLMClient` sends and routes requests."""

    # Wall-clock limit of one HTTP attempt (a hung replica is cut after this).
    timeout_s: float = 600.0
    # Limit on establishing a TCP connection. Generous: a dead server refuses at
    # once, while thousands of clients connecting together can wait seconds for
    # accept(), and retrying them early only adds connections to the pile.
    connect_timeout_s: float = 60.0
    # Attempts per chat call, the first included (1 = no retry).
    max_attempts: int = 6
    # First retry waits up to this long; it doubles per attempt (full jitter).
    backoff_base_s: float = 0.25
    # Cap of one retry wait.
    backoff_max_s: float = 10.0
    # Open connections per process over all replicas; 0 = unlimited.
    max_connections: int = 0
    # A sticky task leaves its replica when that one has more than this
    # factor times the average outstanding requests (bounded-load stickiness).
    sticky_max_load_factor: float = 1.5
    # Sticky pins remembered per process (least recently used ones are forgotten).
    sticky_max_keys: int = 200_000
    # How often replicas marked down are probed (GET /health) to bring them back.
    health_probe_interval_s: float = 2.0
    # How often the replica list is refreshed from the registry.
    refresh_interval_s: float = 1.0
    # How long a call waits for a first replica to register before failing.
    wait_for_replicas_s: float = 900.0
    # Structured-output request format the server understands: 'vllm' | 'openai'.
    dialect: str = "vllm"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"llm.client.max_attempts must be >= 1, got {self.max_attempts}")
        if self.timeout_s <= 0:
            raise ValueError(f"llm.client.timeout_s must be > 0, got {self.timeout_s}")
        if self.sticky_max_load_factor < 1.0:
            raise ValueError(
                f"llm.client.sticky_max_load_factor must be >= 1.0, got {self.sticky_max_load_factor}"
            )
        if self.dialect not in DIALECTS:
            raise ValueError(f"llm.client.dialect must be one of {DIALECTS}, got {self.dialect!r}")


@dataclass
class SimConf:
    """The simulated OpenAI-compatible endpoint: latency model and fault injection."""

    # Replicas (sim servers) to start, each with its own capacity.
    num_replicas: int = 1
    # Model name the sim serves (clients send it; any name is accepted).
    model: str = "sim"
    # Time to first token of one request once it holds a capacity slot.
    ttft_s: float = 0.05
    # Decode time per output token.
    time_per_output_token_s: float = 0.002
    # Mean output length in tokens (for free text; capped by max_tokens).
    output_tokens: int = 64
    # Output length varies uniformly by +/- this many tokens.
    output_tokens_jitter: int = 32
    # Requests served at once per replica (like a batch); further requests queue.
    capacity: int = 256
    # Context window in tokens (prompt + completion); longer requests get a 400. 0 = no limit.
    max_model_len: int = 0
    # Fraction of requests answered with a retryable error (half 500, half 429).
    error_rate: float = 0.0
    # Fraction answered 400 "maximum context length exceeded" (not retryable).
    bad_request_rate: float = 0.0
    # Fraction that is never answered (the client's timeout must cut it).
    hang_rate: float = 0.0
    # Fraction whose connection is aborted without a response.
    reset_rate: float = 0.0
    # Probability of answering with a tool call when the request offers tools.
    tool_call_rate: float = 0.5
    # Seed of the fault and content generators (same seed, same choices).
    seed: int = 0
    # Address to bind; 0.0.0.0 to serve other nodes (the node IP is advertised).
    host: str = "127.0.0.1"
    # Port of the first replica; 0 picks a free port per replica.
    port: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "bad_request_rate", "hang_rate", "reset_rate", "tool_call_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"llm.sim.{name} must be within [0, 1], got {value}")
        if self.error_rate + self.bad_request_rate + self.hang_rate + self.reset_rate > 1.0:
            raise ValueError("llm.sim: error_rate + bad_request_rate + hang_rate + reset_rate must be <= 1")
        if self.capacity < 1:
            raise ValueError(f"llm.sim.capacity must be >= 1, got {self.capacity}")
        if self.num_replicas < 1:
            raise ValueError(f"llm.sim.num_replicas must be >= 1, got {self.num_replicas}")


@dataclass
class OpenAIConf:
    """An external OpenAI-compatible endpoint (OpenAI, a hosted vLLM, a gateway)."""

    # Base URL including the API prefix, e.g. https://api.openai.com/v1.
    base_url: str = "https://api.openai.com/v1"
    # Environment variable holding the API key ('' = send no key).
    api_key_env: str = "OPENAI_API_KEY"
    # Model name sent with each request.
    model: str = "gpt-4o-mini"
    # Structured-output format of that server: 'openai' (response_format) or 'vllm'.
    dialect: str = "openai"

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"llm.openai.dialect must be one of {DIALECTS}, got {self.dialect!r}")


@dataclass
class AutoscaleConf:
    """Replicas of a deployed service (`matrix-hpc serve up`) that follow the load; off unless max_replicas > 0."""

    # Fewest and most replicas; max_replicas 0 = no autoscaling (num_replicas is kept).
    min_replicas: int = 1
    max_replicas: int = 0
    # Outstanding requests per replica the scaler aims at (sim: in flight; vLLM: running + waiting).
    target_outstanding: float = 64.0
    # Seconds between two changes of the replica count (a change waits this long after the previous one).
    cooldown_s: float = 60.0
    # Seconds between two looks at the load.
    interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_replicas and not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"llm.autoscale: need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                             f"{self.max_replicas}")
        if self.target_outstanding <= 0 or self.interval_s <= 0 or self.cooldown_s < 0:
            raise ValueError("llm.autoscale: target_outstanding and interval_s must be > 0, cooldown_s >= 0")


@dataclass
class LLMConf:
    """The ``llm=`` config group: a backend, its settings, and the client settings.

    Only the conf named by ``backend`` is used; ``service`` names the replica
    registry (and the vLLM replicas' registry too, unless left at 'default').
    """

    # Which backend serves the run: 'sim' | 'openai' | 'vllm' | 'deployed' | 'none'.
    backend: str = "sim"
    # Name of the replica registry of this service (one per run).
    service: str = "default"
    # Name of a deployed service (`matrix-hpc serve up ... llm.name=NAME`; llm=deployed attaches to it).
    name: str = ""
    # Client behaviour (timeouts, retries, routing), all backends.
    client: ClientConf = field(default_factory=ClientConf)
    # Settings of backend 'sim'.
    sim: SimConf = field(default_factory=SimConf)
    # Settings of backend 'openai'.
    openai: OpenAIConf = field(default_factory=OpenAIConf)
    # Settings of backend 'vllm' (see vllm_replica.py).
    vllm: VLLMConf = field(default_factory=VLLMConf)
    # Deployed services only (serve up): replicas between min and max with the load (docs/serve.md).
    autoscale: AutoscaleConf = field(default_factory=AutoscaleConf)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"llm.backend must be one of {BACKENDS}, got {self.backend!r}")
