"""Message routing, placement and batching, without Ray."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import pytest

from matrix_hpc.config.schema import Placement
from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.outbox import Outbox
from matrix_hpc.runtime.placement import plan_groups
from matrix_hpc.runtime.worker import Router

ROLES = ("teacher", "answer_extractor", "answer_matcher", "student")


def test_colocated_places_every_role_in_each_worker() -> None:
    groups = plan_groups(ROLES, Placement.colocated, 3, {})
    assert [(g.name, g.roles, g.instances) for g in groups] == [("all", ROLES, 3)]


def test_per_role_gives_each_role_its_own_workers() -> None:
    groups = plan_groups(ROLES, Placement.per_role, 1, {"teacher": 2})
    assert {g.name: g.instances for g in groups} == {"teacher": 2, "answer_extractor": 1, "answer_matcher": 1,
                                                     "student": 1}


def test_role_workers_naming_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['techer'\]"):
        plan_groups(ROLES, Placement.per_role, 1, {"techer": 2})


def test_router_is_stable_per_task_and_spreads_tasks() -> None:
    r = Router({"teacher": "teacher"}, {"teacher": 4})
    assert r.route("teacher", "task-1") == r.route("teacher", "task-1")
    used = {r.route("teacher", f"task-{i}")[1] for i in range(200)}
    assert used == {0, 1, 2, 3}


def _public_state(t: TaskState) -> dict[str, Any]:
    """Every slot's value, the history as the list a step sees."""
    state = {name: getattr(t, name) for name in TaskState.__slots__ if not name.startswith("_")}
    return {**state, "history": list(t.history)}


def test_task_state_round_trips_through_pickle() -> None:
    t = TaskState("x", {"q": 1}, "teacher", attempt=2, sample=3, seed=44)
    t.add_message("teacher", "hi", prompt_tokens=1)
    t.data["k"] = [1]
    t.result["r"] = "R"
    t.attempts, t.hops = 5, 6
    t.finish("failed", error_type="E", error="boom", reason="why")
    u = pickle.loads(pickle.dumps(t))
    assert _public_state(u) == _public_state(t)  # a slot missing from the pickled state would differ here
    assert len(TaskState.__slots__) == 19, "a new slot must travel: add it to __getstate__ and __setstate__"


def test_history_travels_sealed_and_reads_back_in_order_after_many_hops() -> None:
    t = TaskState("x", {"q": 1}, "teacher")
    for hop in range(5):
        t.add_message("teacher", f"turn {hop}")
        t.add_message("student", f"reply {hop}")
        t = pickle.loads(pickle.dumps(t))  # a hop between processes
        assert t.history_len == 2 * (hop + 1)
        assert t._sealed_len == 2 * (hop + 1) and not t._history  # not unpickled by the hop itself
    assert [m["content"] for m in t.history] == [f"{w} {h}" for h in range(5) for w in ("turn", "reply")]
    t.history[0]["content"] = "changed"  # a step that edits the history: the edit travels
    t.add_message("teacher", "last")
    u = pickle.loads(pickle.dumps(t))
    assert u.history[0]["content"] == "changed" and u.history[-1]["content"] == "last" and u.history_len == 11


def test_a_failed_step_is_undone_in_the_sealed_history_too() -> None:
    from matrix_hpc.runtime.worker import StepPolicy, run_step
    from matrix_hpc.runtime.workflow import AgentContext, Workflow

    t = TaskState("x", {}, "a")
    t.add_message("a", "kept")
    t = pickle.loads(pickle.dumps(t))
    tries = []

    async def flaky(task: TaskState, ctx: AgentContext) -> None:
        task.add_message("a", f"try {len(tries)}")
        tries.append(1)
        if len(tries) < 3:
            raise RuntimeError("transient")

    class One(Workflow):
        roles = ("a",)

    nxt = asyncio.run(run_step(One.__new__(One), flaky, "a", t, AgentContext(0), StepPolicy(3, 0.0, 0.0)))
    assert nxt is None  # the last role: the task ends
    assert [m["content"] for m in t.history] == ["kept", "try 2"]


def test_packed_batches_unpack_to_equal_tasks_and_fall_back_for_what_only_cloudpickle_handles() -> None:
    from matrix_hpc.runtime.message import pack_tasks, unpack_tasks

    tasks = [TaskState(f"t{i}", {"q": i}, "a") for i in range(3)]
    tasks[1].add_message("a", "hello")
    packed = pack_tasks(tasks)
    assert isinstance(packed, bytes)
    assert [_public_state(t) for t in unpack_tasks(packed)] == [_public_state(t) for t in tasks]
    tasks[2].data["f"] = lambda: 1  # the C pickler refuses a lambda: the list goes as is, to Ray's cloudpickle
    assert unpack_tasks(pack_tasks(tasks)) is tasks


def test_outbox_sends_full_batches_at_once_and_partial_ones_after_the_delay() -> None:
    sent: list[list[int]] = []

    async def go() -> None:
        box = Outbox(lambda b: sent.append(b), batch_size=3, delay_s=0.01)
        for i in range(7):
            box.put(i)
        assert sent == [[0, 1, 2], [3, 4, 5]]
        await asyncio.sleep(0.05)
        assert sent[-1] == [6]

    asyncio.run(go())


def test_outbox_hands_a_failed_batch_to_its_owner() -> None:
    failed: list[tuple[list[int], str]] = []

    async def refuse(batch: list[int]) -> None:
        raise ConnectionError("peer gone")

    async def go() -> None:
        box = Outbox(lambda b: asyncio.ensure_future(refuse(b)), batch_size=2, delay_s=10,
                     on_failed=lambda batch, e: failed.append((batch, str(e))), name="worker all/0")
        box.put(1)
        box.put(2)
        box.put(3)
        await box.drain()

    asyncio.run(go())
    assert failed == [([1, 2], "peer gone"), ([3], "peer gone")]


def test_outbox_treats_a_send_that_raises_at_once_as_failed() -> None:
    failed: list[list[int]] = []

    def broken(batch: list[int]) -> None:
        raise RuntimeError("handle unusable")

    async def go() -> None:
        box = Outbox(broken, batch_size=1, delay_s=10, on_failed=lambda batch, e: failed.append(batch))
        box.put(7)

    asyncio.run(go())
    assert failed == [[7]]


def test_run_retry_names_its_valid_choices() -> None:
    from matrix_hpc.config.schema import RunConf

    assert RunConf(retry="failed").retry == "failed"
    with pytest.raises(ValueError, match=r"run.retry='all'; valid choices: none, failed"):
        RunConf(retry="all")
    with pytest.raises(ValueError, match=r"run.verify_rounds=-1"):
        RunConf(verify_rounds=-1)


def test_standby_tasks_follow_the_concurrency_and_need_one_placement_group() -> None:
    from matrix_hpc.runtime.conf import STANDBY_AUTO_MAX, RunConf, standby_size
    from matrix_hpc.runtime.driver import in_flight_cap

    assert standby_size(RunConf(max_concurrent_tasks=1), 1) == 1
    assert standby_size(RunConf(max_concurrent_tasks=64), 1) == 64
    assert standby_size(RunConf(max_concurrent_tasks=10_000), 1) == STANDBY_AUTO_MAX
    assert standby_size(RunConf(max_concurrent_tasks=64, standby_tasks=5), 1) == 5
    assert standby_size(RunConf(max_concurrent_tasks=64, standby_tasks=0), 1) == 0
    # roles in several groups: a task ends on another worker than it starts on
    assert standby_size(RunConf(max_concurrent_tasks=64, standby_tasks=5), 2) == 0
    with pytest.raises(ValueError, match=r"run.standby_tasks=-1 must be >= 0"):
        RunConf(standby_tasks=-1)
    # standby tasks are in flight: the cap makes room for them besides the uncommitted rows
    assert in_flight_cap(RunConf(max_concurrent_tasks=64), 64) == 64 + 64 + 1024


def test_resume_identity_holds_resolved_values_and_the_dataclass_defaults() -> None:
    from matrix_hpc.runtime.identity import resume_identity
    from matrix_hpc.store.input import DatasetConf
    from matrix_hpc.workflows.overhead import OverheadConf

    identity, defaults = resume_identity(OverheadConf(agree_prob=0.9), DatasetConf(path="data/in.jsonl", limit=5))
    assert identity["workflow"]["agree_prob"] == 0.9 and defaults["workflow"]["agree_prob"] == 0.45
    assert set(identity["workflow"]) == set(defaults["workflow"])  # every key has a default to compare with
    assert identity["dataset"]["path"].endswith("/data/in.jsonl") and identity["dataset"]["path"].startswith("/")
    assert identity["dataset"]["id_column"] == "id" and "limit" not in identity["dataset"]


class _FakeSink:
    """A sink actor's handle, as far as the watch uses it (``health.remote()``)."""

    def __init__(self, incarnation: str, failures: int = 0) -> None:
        self.state = {"incarnation": incarnation, "commit_failures": failures, "last_error": None}
        self.health = self

    def remote(self) -> Any:
        async def answer() -> dict[str, Any]:
            return dict(self.state)

        return answer()


def test_the_watch_reports_a_restarted_sink_once_and_a_sink_that_cannot_commit() -> None:
    from matrix_hpc.runtime.peers import PeerEvents, PeerWatch

    restarted: list[int] = []
    stalled: list[tuple[int, str]] = []
    sinks = [_FakeSink("a"), _FakeSink("b")]

    async def go() -> None:
        events = PeerEvents(lambda ids: None, lambda key: None, restarted.append,
                            lambda n, why: stalled.append((n, why)))
        watch = PeerWatch({}, sinks, (), events, {}, ["a", "b"], commit_stall_timeout_s=0.05)
        await watch._check_sink(0)
        sinks[1].state["incarnation"] = "b2"
        await watch._check_sink(1)
        await watch._check_sink(1)
        sinks[0].state.update(commit_failures=3, last_error="[Errno 28] No space left on device")
        await watch._check_sink(0)
        await asyncio.sleep(0.1)
        await watch._check_sink(0)

    asyncio.run(go())
    assert restarted == [1]
    assert len(stalled) == 1 and stalled[0][0] == 0 and "No space left on device" in stalled[0][1]


def _result(outcome: str, missing: int = 0, duplicates: int = 0, problems: tuple[str, ...] = ()) -> Any:
    from matrix_hpc.runtime.driver import RunResult
    from matrix_hpc.runtime.progress import RunStats
    from matrix_hpc.runtime.verify import MissingIds
    from matrix_hpc.store.input import InputItem
    from matrix_hpc.store.verify import OutputSummary

    stats = RunStats()
    stats.record("ok", None, None, 999)  # acks: the summary must not use them
    disk = OutputSummary({"ok": 7, "failed": 2}, 120, 30 + duplicates, 30, duplicates,
                         ["q1"] if duplicates else [])
    gaps = MissingIds([InputItem(f"q{i}", {}, where=f"in.jsonl:{i}") for i in range(missing)])
    return RunResult("/out", "run-1", stats, outcome != "finished", [], outcome, disk, gaps, list(problems))


def test_the_summary_counts_what_is_on_disk_not_the_acks() -> None:
    from matrix_hpc.runtime.progress import render_summary

    text = render_summary(_result("finished"))
    assert "finished: every input id is in the output, once" in text
    assert "9 written by this run, read back from disk  (ok 7, filtered 0, failed 2)" in text
    assert "30 rows, 30 distinct ids" in text and "120 tokens" in text and "999" not in text


def test_an_incomplete_run_says_what_is_missing_and_why() -> None:
    from matrix_hpc.runtime.progress import render_summary

    text = render_summary(_result("incomplete", missing=3, duplicates=1, problems=("sink 0 cannot commit: ENOSPC",)))
    assert "INCOMPLETE: 3 input ids missing, 1 ids written twice, stopped by an error" in text
    assert "MISSING:    3 input ids have no row (e.g. q0 (in.jsonl:0), q1 (in.jsonl:1), q2 (in.jsonl:2))" in text
    assert "1 DUPLICATE ids (e.g. q1)" in text and "PROBLEM:    sink 0 cannot commit: ENOSPC" in text
    assert "finished" not in text


class _Box:
    """Stands in for an Outbox: records what the driver sends."""

    def __init__(self) -> None:
        self.sent: list[TaskState] = []

    def put(self, task: TaskState) -> None:
        self.sent.append(task)

    def flush(self) -> None:
        pass


def _driver_with_tasks(tmp_path: Any, n: int, max_attempts: int = 3) -> Any:
    from matrix_hpc.config.schema import OutputConf, RunConf
    from matrix_hpc.runtime.driver import Driver, RunPlan
    from matrix_hpc.store.input import DatasetConf, InputItem
    from matrix_hpc.workflows.overhead import OverheadConf

    plan = RunPlan(OverheadConf(), DatasetConf(path="x"), OutputConf(dir=str(tmp_path), num_shards=4, num_sinks=2),
                   RunConf(max_attempts=max_attempts))
    d = Driver(plan, run_id="r")
    d.router = Router({r: "all" for r in ROLES}, {"all": 2})
    d.handles = {"all": [object(), object()]}
    d.sinks = [object(), object()]
    d._first_boxes = {("all", 0): _Box(), ("all", 1): _Box()}
    d._sink_boxes = [_Box(), _Box()]
    for i in range(n):
        d.inflight[f"t{i}"] = InputItem(f"t{i}", {"question": "q"}, where=f"in.jsonl:{i + 1}")
    return d


def _sent(d: Any) -> list[TaskState]:
    return [t for box in [*d._first_boxes.values(), *d._sink_boxes] for t in box.sent]


def test_a_restarted_sink_brings_back_exactly_the_tasks_routed_to_it(tmp_path: Any) -> None:
    from matrix_hpc.store.layout import sink_of

    d = _driver_with_tasks(tmp_path, 40)
    d._on_sink_restarted(1)
    again = sorted(t.id for t in _sent(d))
    assert again == sorted(i for i in d.inflight if sink_of(i, 4, 2) == 1) and again
    assert all(t.attempt == 2 and t.role == "teacher" for t in _sent(d))


def test_a_task_that_keeps_losing_its_worker_fails_as_task_lost_but_lost_sends_do_not_count(tmp_path: Any) -> None:
    d = _driver_with_tasks(tmp_path, 1, max_attempts=2)
    for _ in range(5):
        d._readmit("t0", loss=False)  # failed sends, lost sinks: not the task's doing
    assert [t.status for t in _sent(d)] == [None] * 5
    d._readmit("t0", loss=True)
    d._readmit("t0", loss=True)
    last = _sent(d)[-1]
    assert last.status == "failed" and last.error_type == "TaskLost" and "run.retry=failed" in last.error


def test_spread_nodes_puts_workers_round_robin_on_every_node_in_a_stable_order() -> None:
    from matrix_hpc.runtime.placement import spread_nodes

    assert spread_nodes(["c", "a", "b"], 5) == ["a", "b", "c", "a", "b"]
    assert spread_nodes(["b", "a", "c"], 5) == spread_nodes(["c", "b", "a"], 5)  # order of ray.nodes() is not kept
    assert spread_nodes(["a", "b", "c"], 2) == ["a", "b"]
    assert spread_nodes([], 3) == []


def test_admission_counts_running_tasks_and_caps_the_uncommitted_ones(tmp_path: Any) -> None:
    """A credit returns when a worker reports a task ended; its row stays in
    flight until committed, and a full in-flight cap stops admission too (a
    sink that cannot commit)."""
    from matrix_hpc.store.input import InputItem

    d = _driver_with_tasks(tmp_path, 0)
    d.plan.run.max_concurrent_tasks, d.max_in_flight = 2, 3

    async def scenario() -> list[tuple[int, int, int]]:
        d._credit_event = asyncio.Event()
        d._loop = asyncio.get_running_loop()
        seen = []

        async def admit_all() -> None:
            for i in range(5):
                if not await d._take_credit():
                    return
                d._admit(InputItem(f"t{i}", {"question": "q"}, where=f"in.jsonl:{i + 1}"))

        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)
            seen.append((len(_sent(d)), len(d.running), len(d.inflight)))

        admitting = asyncio.ensure_future(admit_all())
        await settle()  # 2 running: the 3rd waits
        d.running.difference_update(["t0"])  # a worker reports t0 ended (its row not committed yet)
        d._credit_event.set()
        await settle()  # t2 admitted: 2 running, 3 in flight = the cap
        d.running.difference_update(["t1"])
        d._credit_event.set()
        await settle()  # a running slot is free but the cap holds
        d._on_ack("t0", "ok", None, None, 0)  # t0's row committed
        d._credit_event.set()
        await settle()  # t3 admitted
        d._stopping = True
        d._credit_event.set()
        await admitting
        return seen

    assert asyncio.run(scenario()) == [(2, 2, 2), (3, 2, 3), (3, 1, 3), (4, 2, 3)]


def test_standby_tasks_swap_credits_at_their_worker_and_take_credits_that_come_back(tmp_path: Any) -> None:
    """Running tasks stay at max_concurrent_tasks with standby tasks beside them:
    a report of a standby task that started and ended since the last one
    leaves it running nowhere; a credit that comes back with no swap starts a
    standby task (promoted by id) before any new admission."""
    from matrix_hpc.store.input import InputItem

    d = _driver_with_tasks(tmp_path, 0)
    d.router = Router({r: "all" for r in ROLES}, {"all": 1})
    d.plan.run.max_concurrent_tasks, d.standby_limit, d.max_in_flight = 2, 2, 100
    key = ("all", 0)
    d._first_boxes, d._standby_boxes, d._promote_boxes = {key: _Box()}, {key: _Box()}, {key: _Box()}
    d._standby = {key: {}}

    async def scenario() -> list[tuple[list[str], list[str], list[str]]]:
        d._credit_event = asyncio.Event()
        d._loop = asyncio.get_running_loop()
        seen = []

        async def admit_all() -> None:
            for i in range(8):
                how = await d._take_credit()
                if not how:
                    return
                d._admit(InputItem(f"t{i}", {"question": "q"}, where=f"in.jsonl:{i + 1}"), standby=how == "standby")

        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)
            seen.append((sorted(d.running), list(d._standby[key]), list(d._promote_boxes[key].sent)))

        admitting = asyncio.ensure_future(admit_all())
        await settle()  # t0, t1 running; t2, t3 waiting at the worker; t4 waits for a credit
        d._on_finished(["t0", "t2"], ["t2", "t3"])  # t2 took t0's slot and ended; t3 took t2's
        await settle()  # running t1, t3; t4, t5 admitted to wait
        d._on_finished(["t1"], [])  # t1 ended with nothing waiting there (e.g. t4 not arrived yet)
        await settle()  # its credit starts t4 (promoted); t6 admitted to wait
        d._stopping = True
        d._credit_event.set()
        await admitting
        return seen

    assert asyncio.run(scenario()) == [(["t0", "t1"], ["t2", "t3"], []),
                                       (["t1", "t3"], ["t4", "t5"], []),
                                       (["t3", "t4"], ["t5", "t6"], ["t4"])]
    assert [t.id for t in d._first_boxes[key].sent] == ["t0", "t1"]
    assert [t.id for t in d._standby_boxes[key].sent] == ["t2", "t3", "t4", "t5", "t6"]


def test_a_worker_starts_promoted_standby_tasks_once_and_forgets_what_it_started(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A promotion that comes before its task starts it on arrival; a late
    promotion of a task already started here is ignored; what the worker
    remembers for that stays bounded by STANDBY_MEMORY_S."""
    from matrix_hpc.runtime import worker as worker_mod
    from matrix_hpc.runtime.worker import StepPolicy, Worker, WorkerSpec
    from matrix_hpc.workflows.overhead import OverheadConf

    w = Worker(WorkerSpec("all", 0, ROLES, OverheadConf(), 0, StepPolicy(), 256, 0.002, 4))
    w.router = Router({r: "all" for r in ROLES}, {"all": 1})
    started: list[str] = []
    w._start = lambda task: started.append(task.id)  # type: ignore[method-assign]
    tasks = [TaskState(f"t{i}", {"question": "q"}, "teacher") for i in range(4)]

    async def scenario() -> None:
        await w.promote(["t1"])  # its delivery is still on the way
        await w.deliver_standby(tasks)  # t1 starts at once; t0, t2, t3 wait
        w._start_standby()  # a task ended here: t0 takes its slot
        await w.promote(["t0", "t2"])  # t0 already started here: ignored; t2 starts
        w._start_standby()  # t3
        w._start_standby()  # nothing left waiting

    asyncio.run(scenario())
    assert started == ["t1", "t0", "t2", "t3"]
    assert w._standby_started == ["t0", "t3"] and w.standby_starts == 2 and not w._standby and not w._early
    monkeypatch.setattr(worker_mod, "STANDBY_MEMORY_S", -1.0)  # everything is old now
    w._standby = {t.id: t for t in [TaskState("t9", {"question": "q"}, "teacher")]}
    w._start_standby()
    assert w._started_ids == {"t9"} and len(w._started_recently) == 1


class _Remote:
    """Stands in for a Ray actor method: ``.remote()`` returns an awaitable."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return asyncio.ensure_future(self.fn(*args))


def test_the_tail_commits_rows_still_in_a_worker_at_once_and_a_silent_worker_holds_it_back_briefly(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing runs, one row is still in a worker on its way to its sink:
    the driver has the workers drain to the sinks, then the sinks commit
    (not a flush that misses the row and a later one, 250-500 ms apart). A
    worker that does not answer its drain delays the commit by at most
    TAIL_DRAIN_TIMEOUT_S."""
    from matrix_hpc.runtime import driver as driver_mod

    monkeypatch.setattr(driver_mod, "TAIL_DRAIN_TIMEOUT_S", 0.2)
    d = _driver_with_tasks(tmp_path, 1)
    events: list[str] = []
    in_worker, in_sink = ["t0"], []

    async def drain() -> None:
        events.append("drain")
        in_sink.extend(in_worker)
        in_worker.clear()

    async def never() -> None:
        await asyncio.sleep(3600)

    async def flush() -> None:
        events.append(f"flush {list(in_sink)}")
        for task_id in in_sink:
            d._on_ack(task_id, "ok", None, None, 0)
        in_sink.clear()

    worker = type("W", (), {"drain_sinks": _Remote(drain)})()
    silent = type("W", (), {"drain_sinks": _Remote(never)})()
    sink = type("S", (), {"flush": _Remote(flush)})()
    d.handles = {"all": [worker, silent]}
    d.sinks = [sink]

    async def scenario() -> float:
        d._credit_event = asyncio.Event()
        d._loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        await asyncio.wait_for(d._wait_in_flight(), 5.0)
        return time.monotonic() - t0

    took_s = asyncio.run(scenario())
    assert not d.inflight and events[:2] == ["drain", "flush ['t0']"]
    assert 0.2 <= took_s < 1.0, took_s  # the silent worker's drain timeout, then the commit at once
