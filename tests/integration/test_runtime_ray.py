"""The runtime on a real local Ray: placements, kill -9 resume, bad input,
the resume check, retries, admission. Faults of one part while the rest
runs on (a sink, a worker, a commit...) are in test_faults.py."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from matrix_hpc.store.conf import SMALL_CLUSTER_CPUS
from tests.integration.fault_workflows import EVOLVING_RELEASE_ENV
from tests.integration.fault_workflows import MODULE as FAULT_WORKFLOWS
from tests.integration.runs import (
    kill_tree,
    log_of,
    read_rows,
    run_cli,
    start_cli,
    wait_for_rows,
    without_timing,
    write_jsonl,
)

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray")]


def _rows(n: int) -> list[dict]:
    return [{"id": f"q{i:05d}", "question": f"Q{i}?"} for i in range(n)]


def test_both_placements_write_identical_rows(tmp_path: Path) -> None:
    """Colocated, this small machine's one sink runs inside the one worker (output.sink_host=auto),
    and standby tasks start where tasks end (two workers: also where credits come back from the
    other); per role (no standby tasks), the sink is an actor; and with the sinks inside worker processes across roles
    (output.sink_host=workers) a row ending on one role's worker reaches the sink hosted by
    another through that worker."""
    data = write_jsonl(tmp_path / "in.jsonl", _rows(300))
    outs = {}
    cases = {"colocated": ["run.placement=colocated"], "per_role": ["run.placement=per_role"],
             "two_workers": ["run.placement=colocated", "run.num_workers=2"],
             "sinks_in_workers": ["run.placement=per_role", "output.sink_host=workers", "output.num_sinks=2"]}
    for case, overrides in cases.items():
        out = tmp_path / case
        r = run_cli(f"dataset.path={data}", f"output.dir={out}", *overrides, "run.seed=7",
                    "run.max_concurrent_tasks=64")
        assert r.returncode == 0, r.stderr[-3000:]
        hosted = "sink(s) write the 4 shards inside the worker process(es)" in log_of(r)
        small = (os.cpu_count() or 1) <= SMALL_CLUSTER_CPUS  # auto: inside the one worker (colocated) on such a Ray
        assert hosted == (case == "sinks_in_workers" or (case == "colocated" and small)), log_of(r)[-3000:]
        outs[case] = sorted((without_timing(x) for x in read_rows(out)), key=lambda x: x["id"])
    assert len(outs["colocated"]) == 300
    assert outs["colocated"] == outs["per_role"] == outs["sinks_in_workers"] == outs["two_workers"]
    turns = Counter(len(r["messages"]) for r in outs["colocated"])
    assert len(turns) > 1  # dialogues of different lengths: the comparison is not trivial


def test_kill_9_at_random_points_then_rerun_gives_each_input_id_once(tmp_path: Path) -> None:
    n = 4000
    data = write_jsonl(tmp_path / "in.jsonl", _rows(n))
    out = tmp_path / "out"
    args = (f"dataset.path={data}", f"output.dir={out}", "run.max_concurrent_tasks=50",
            "output.flush_interval_s=0.2", "workflow.step_delay_ms=20")
    rng = random.Random(1234)
    committed = []
    # Kill points: during start-up, then after a random share of rows, plus a random sub-second delay
    # (so the kill lands anywhere: mid-step, mid-batch, mid-commit).
    for min_rows in (None, rng.randrange(200, 1200), rng.randrange(1500, 3000)):
        proc = start_cli(*args)
        if min_rows is None:
            time.sleep(rng.uniform(1.0, 3.0))
        else:
            wait_for_rows(out, min_rows)
            time.sleep(rng.uniform(0.0, 1.0))
        kill_tree(proc)
        ids = [r["id"] for r in read_rows(out)]  # every visible file is readable
        assert len(ids) == len(set(ids)), "duplicates after a kill"
        committed.append(len(ids))
    assert 0 < committed[1] < committed[2] < n, committed
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = [r["id"] for r in read_rows(out)]
    assert Counter(ids) == Counter(x["id"] for x in _rows(n))
    assert f"{committed[2]} ids already done" in r.stderr


def test_malformed_input_lines_fail_alone(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", _rows(20), extra_lines=["{broken json", '{"question": "no id"}'])
    out = tmp_path / "out"
    r = run_cli(f"dataset.path={data}", f"output.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["id"]: x for x in read_rows(out)}
    assert len(rows) == 22
    assert Counter(x["status"] for x in rows.values()) == {"ok": 20, "failed": 2}
    bad = rows["in.jsonl:21"]
    assert bad["error_type"] == "InputError" and f"{data}:21: not valid JSON" in bad["error"]
    assert bad["input"] == "{broken json\n"
    assert "missing required column(s) ['id']" in rows["in.jsonl:22"]["error"]


# slow: five runs end to end; the comparison itself is unit-tested (tests/unit/test_store_resume.py)
@pytest.mark.slow
def test_resume_compares_config_values_new_keys_at_their_default_resume(tmp_path: Path) -> None:
    """Release 2 of a workflow adds a key: at its default the old output resumes;
    a changed value, or another id column, is refused naming the setting."""
    data = write_jsonl(tmp_path / "in.jsonl", _rows(30))
    out = tmp_path / "out"
    args = ("workflow=evolving", f"dataset.path={data}", f"output.dir={out}")
    release1 = {**os.environ, "MATRIX_HPC_WORKFLOWS": FAULT_WORKFLOWS}
    release2 = {**release1, EVOLVING_RELEASE_ENV: "2"}
    assert run_cli(*args, env=release1).returncode == 0
    r = run_cli(*args, env=release2)
    assert r.returncode == 0 and "30 ids already done" in r.stderr, r.stderr[-3000:]
    r = run_cli(*args, "workflow.shout=true", env=release2)
    assert r.returncode == 2 and "workflow.shout: recorded (absent) -> now True" in r.stderr, r.stderr[-3000:]
    assert "run.resume=force" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(*args, "dataset.id_column=question", env=release2)
    assert r.returncode == 2 and "dataset.id_column: recorded 'id' -> now 'question'" in r.stderr, r.stderr[-3000:]
    forced = run_cli(*args, "workflow.shout=true", "run.resume=force", env=release2)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert len(read_rows(out)) == 30


def test_a_bad_input_path_is_reported_before_ray_starts(tmp_path: Path) -> None:
    r = run_cli(f"dataset.path={tmp_path}/nowhere/*.jsonl", f"output.dir={tmp_path / 'out'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"dataset.path='{tmp_path}/nowhere/*.jsonl' matches no file" in r.stderr
    assert "Traceback" not in r.stderr and "Ray" not in r.stdout + r.stderr  # refused before Ray started
    r = run_cli(f"dataset.path={tmp_path}", f"output.dir={tmp_path / 'out'}")
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr


def test_failed_steps_are_retried_then_fail_the_row_with_the_error(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", _rows(60))
    flaky, broken = tmp_path / "flaky", tmp_path / "broken"
    r = run_cli(f"dataset.path={data}", f"output.dir={flaky}", "workflow.failure_rate=0.3",
                "run.max_attempts=10", "run.backoff_base_s=0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(flaky)
    assert all(x["status"] == "ok" for x in rows)
    assert any(x["attempts"] > 1 for x in rows)
    r = run_cli(f"dataset.path={data}", f"output.dir={broken}", "workflow.failure_rate=1.0",
                "run.max_attempts=2", "run.backoff_base_s=0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(broken)
    assert len(rows) == 60 and all(x["status"] == "failed" for x in rows)
    assert rows[0]["error_type"] == "InjectedFailure" and "teacher: injected failure" in rows[0]["error"]
    assert rows[0]["attempts"] == 2


def test_unknown_keys_and_bad_values_are_refused_naming_them(tmp_path: Path) -> None:
    r = run_cli("dataset.path=x", f"output.dir={tmp_path}", "run.max_concurent_tasks=5")
    assert r.returncode == 2 and "unknown config key 'run.max_concurent_tasks'" in r.stderr
    assert "max_concurrent_tasks" in r.stderr
    r = run_cli("dataset.path=x", f"output.dir={tmp_path}", "run.placement=everywhere")
    assert r.returncode == 2 and "expected one of [colocated, per_role]" in r.stderr
    r = run_cli("dataset.path=x", f"output.dir={tmp_path}", "workflow=nope")
    assert r.returncode == 2 and "valid choices for workflow" in r.stderr and "overhead" in r.stderr


def test_more_sinks_than_workers_to_host_them_is_refused_naming_the_settings(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", _rows(5))
    r = run_cli(f"dataset.path={data}", f"output.dir={tmp_path / 'out'}", "output.sink_host=workers",
                "output.num_sinks=2", "run.num_workers=1")
    assert r.returncode == 2, log_of(r)[-3000:]
    assert "output.sink_host=workers needs a worker process per sink: 2 sinks, 1 worker(s)" in r.stderr
    assert "Traceback" not in log_of(r)
    assert not list((tmp_path / "out").glob("shard=*"))  # refused before any row


def test_an_unknown_role_in_role_workers_is_refused_before_ray_starts(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", _rows(5))
    r = run_cli(f"dataset.path={data}", f"output.dir={tmp_path / 'out'}", "run.placement=per_role",
                "+run.role_workers.nope=2")
    assert r.returncode == 2, log_of(r)[-3000:]
    assert "run.role_workers names unknown role(s) ['nope']" in r.stderr and "roles of this workflow" in r.stderr
    assert "Traceback" not in log_of(r) and "retrying" not in log_of(r)
    assert not (tmp_path / "out" / "_matrix" / "lock").exists()  # refused before the output dir is locked
    assert "Ray" not in log_of(r)  # nor did Ray start
