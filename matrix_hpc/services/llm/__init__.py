"""LLM services: replicas (vLLM, simulated, external) and the client that routes to them.

Contract, in the order a run uses it::

    from matrix_hpc.services.llm import LLMConf, start_llm_service

    service = start_llm_service(LLMConf(backend="sim"), run_dir)   # driver
    make_client = service.client_factory()                          # picklable; to workers
    client = make_client()                                          # once per worker process
    result = await client.chat(messages, sticky_key=task.id, max_tokens=256)
    await client.close(); service.stop()

Names resolve lazily so that ``import matrix_hpc.services.llm`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClientConf": "config",
    "LLMConf": "config",
    "OpenAIConf": "config",
    "SimConf": "config",
    "VLLMConf": "vllm_replica",
    "ChatResult": "client",
    "Choice": "client",
    "LLMClient": "client",
    "LLMError": "client",
    "LLMRequestError": "client",
    "LLMUnavailableError": "client",
    "Usage": "client",
    "EndpointSource": "endpoints",
    "RegistryEndpoints": "endpoints",
    "StaticEndpoints": "endpoints",
    "LLMClientFactory": "service",
    "LLMService": "service",
    "start_llm_service": "service",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
