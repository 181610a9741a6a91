"""Message routing, placement and batching, without Ray."""

from __future__ import annotations

import asyncio
import pickle

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
    assert {g.name: g.instances for g in groups} == {"teacher": 2, "answer_extractor": 1, "answer_matcher": 1, "student": 1}


def test_role_workers_naming_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['techer'\]"):
        plan_groups(ROLES, Placement.per_role, 1, {"techer": 2})


def test_router_is_stable_per_task_and_spreads_tasks() -> None:
    r = Router({"teacher": "teacher"}, {"teacher": 4})
    assert r.route("teacher", "task-1") == r.route("teacher", "task-1")
    used = {r.route("teacher", f"task-{i}")[1] for i in range(200)}
    assert used == {0, 1, 2, 3}


def test_task_state_round_trips_through_pickle() -> None:
    t = TaskState("x", {"q": 1}, "teacher")
    t.add_message("teacher", "hi", prompt_tokens=1)
    t.data["k"] = [1]
    u = pickle.loads(pickle.dumps(t))
    assert (u.id, u.input, u.role, u.history, u.data) == (t.id, t.input, t.role, t.history, t.data)


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
