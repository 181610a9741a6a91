"""A replica that cannot start fails the service start with a usable message (real Ray, no vLLM needed)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration]


def test_server_that_exits_fails_start_with_log_tail(local_ray: Any, tmp_path: Path) -> None:
    from matrix_hpc.services.llm.vllm_replica import ReplicaStartError, VLLMConf, start_vllm_service

    # An interpreter without vllm: the server exits at once, like a bad model or flag would.
    service = f"err-{uuid.uuid4().hex[:6]}"
    conf = VLLMConf(model="no-such-model", python_executable=sys.executable, service=service, startup_timeout_s=60)
    with pytest.raises(ReplicaStartError) as info:
        start_vllm_service(conf, tmp_path)
    message = str(info.value)
    log = tmp_path / "logs" / f"vllm-{service}-0.log"
    assert f"vLLM replica {service}-0 (model 'no-such-model') exited with code 1 while starting" in message
    assert str(log) in message and "No module named 'vllm'" in message
    assert "=== " in log.read_text() and "--model no-such-model" in log.read_text()
    # The failed start cleaned up: the same service name can be started again.
    with pytest.raises(ReplicaStartError):
        start_vllm_service(conf, tmp_path)


def test_missing_interpreter_is_named(local_ray: Any, tmp_path: Path) -> None:
    from matrix_hpc.services.llm.vllm_replica import ReplicaStartError, VLLMConf, start_vllm_service

    conf = VLLMConf(python_executable="/nonexistent/bin/python", service=f"err-{uuid.uuid4().hex[:6]}")
    with pytest.raises(ReplicaStartError, match=r"python_executable '/nonexistent/bin/python' of llm.vllm does not exist"):
        start_vllm_service(conf, tmp_path)
