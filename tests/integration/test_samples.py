"""N samples per input on coral with the simulated LLM, its input streamed
from a Hugging Face dataset by name with the hub off (the cache made by
tests/integration/hf_cache.py): kill -9 mid-run, rerun, and each (input,
sample) is in the output once, with distinct seeds and distinct dialogues;
``inspect`` counts them per sample."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from tests.integration.hf_cache import offline_env, put_in_hf_cache
from tests.integration.runs import (
    REPO,
    assert_each_id_once,
    ids_on_disk,
    kill_tree,
    log_of,
    read_rows,
    run_cli,
    start_cli,
    wait_for_rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray")]

INPUTS, SAMPLES = 20, 3
#: Slow enough (each LLM call ~0.1 s, 12 dialogues at once) that the kill lands mid-run.
SIM = ["llm=sim", "llm.sim.ttft_s=0.03", "llm.sim.time_per_output_token_s=0.004", "llm.sim.output_tokens=16",
       "llm.sim.output_tokens_jitter=8"]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_workflow_samples import mmlu_pro_rows
    finally:
        sys.path.pop(0)
    home = tmp_path_factory.mktemp("hf") / "home"
    put_in_hf_cache(home, "tester/mmlu_like", "default", {"test": pa.Table.from_pylist(list(mmlu_pro_rows(2000)))})
    return home


def test_three_samples_per_input_survive_kill_9_each_once_with_distinct_seeds(
        hf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.cli.inspect_cmd import inspect_command

    out, log = tmp_path / "out", tmp_path / "first.log"
    args = ("workflow=coral", "dataset=hf", "dataset.hf.name=tester/mmlu_like", "dataset.hf.split=test",
            "dataset.hf.streaming=true", "dataset.id_column=question_id", f"dataset.limit={INPUTS}",
            f"run.samples_per_input={SAMPLES}", "run.max_concurrent_tasks=12", "workflow.max_turns=6", f"output.dir={out}", *SIM)
    proc = start_cli(*args, stderr=log, env=offline_env(hf_home))
    try:
        wait_for_rows(out, 12, timeout_s=180, while_running=proc)
    finally:
        kill_tree(proc)
    before = ids_on_disk(out)
    assert max(before.values()) == 1 and len(before) < INPUTS * SAMPLES, (len(before), log.read_text()[-2000:])

    rerun = run_cli(*args, env=offline_env(hf_home))
    assert rerun.returncode == 0, log_of(rerun)[-3000:]
    assert f"{len(before)} ids already done" in rerun.stderr
    expected = [f"{q}#s{k}" if k else str(q) for q in range(INPUTS) for k in range(SAMPLES)]
    assert_each_id_once(out, expected)

    rows = read_rows(out)
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["status"] != "ok"][:3]
    by_input: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        input_id, _, k = r["id"].partition("#s")
        assert r["sample"] == int(k or 0)
        by_input[input_id].append(r)
    for input_id, samples in by_input.items():
        assert sorted(r["sample"] for r in samples) == list(range(SAMPLES))
        assert len({r["seed"] for r in samples}) == SAMPLES and None not in {r["seed"] for r in samples}
        teacher_turns = {next(m["content"] for m in r["messages"] if m["agent"] == "teacher") for r in samples}
        assert len(teacher_turns) == SAMPLES, f"input {input_id}: samples share a dialogue"

    capsys.readouterr()
    assert inspect_command([str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"samples: {SAMPLES} per input (run.samples_per_input); rows by sample: 0: {INPUTS}, 1: {INPUTS}, " \
           f"2: {INPUTS}" in shown
    assert f"inputs: {INPUTS} with rows, {INPUTS} with all {SAMPLES} samples" in shown

    # report shows the same per-sample counts (from inspect's code)
    from matrix_hpc.cli.report_cmd import report_command

    html_path = tmp_path / "report.html"
    assert report_command([str(out), "--out", str(html_path)]) == 0
    html = html_path.read_text()
    assert f'data-key="workflow.samples_per_input">{SAMPLES}<' in html
    assert f'data-key="workflow.inputs_with_all_samples">{INPUTS}<' in html
