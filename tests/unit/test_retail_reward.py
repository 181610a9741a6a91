"""Gold replays and the reward on tau2-bench's real retail data (114 tasks)."""

from __future__ import annotations

import json

import pytest

from matrix_hpc.workflows.retail.client import LocalToolClient, evaluate_client
from matrix_hpc.workflows.retail.db import DATA_DIR_ENV, RetailSnapshot, db_hash, default_data_dir
from matrix_hpc.workflows.retail.env import RetailEnv, is_write_tool, tool_schemas
from matrix_hpc.workflows.retail.reward import (
    GoldHashCache,
    communicate_checks,
    compute_reward,
    evaluate_env,
    replay_gold,
)
from matrix_hpc.workflows.retail.tasks import RetailTask, load_tasks
from tests.conftest import require_component

# Gold trajectories that deliberately hit an error (a wrong email or zip tried
# first, an order id without its 'W', an exchange tried on a pending order, an
# exchange the gift card cannot cover): action id -> expected error text.
EXPECTED_GOLD_ERRORS = {
    "2_1": "Product not found", "3_1": "Product not found", "4_1": "Product not found",
    "35_0": "User not found", "37_0": "User not found", "38_0": "User not found",
    "54_0": "User not found", "55_0": "User not found",
    "39_0": "User not found", "67_0": "User not found", "67_1": "User not found", "68_0": "User not found",
    "46_1": "Order not found", "46_2": "Order not found", "47_1": "Order not found", "47_2": "Order not found",
    "64_6": "Non-delivered order cannot be exchanged",
    "106_0": "Insufficient gift card balance",
}


@pytest.fixture(scope="module")
def snapshot() -> RetailSnapshot:
    path = default_data_dir() / "db.json"
    require_component(path.exists(), "tau2-bench retail data",
                      f"put db.json/tasks.json in ../shared/data/tau2_retail or set ${DATA_DIR_ENV}")
    return RetailSnapshot.from_file(path)


@pytest.fixture(scope="module")
def tasks(snapshot: RetailSnapshot) -> list[RetailTask]:
    return load_tasks()


@pytest.fixture(scope="module")
def gold(snapshot: RetailSnapshot) -> GoldHashCache:
    return GoldHashCache(snapshot)


def say_everything(task: RetailTask) -> list[str]:
    """Agent messages that communicate every required string (with formatting tau2 forgives)."""
    return ["Hello, how can I help you today?"] + [f"Done. FYI: {info.upper()}." for info in task.communicate_info]


def test_every_gold_trajectory_replays(tasks: list[RetailTask], snapshot: RetailSnapshot) -> None:
    assert len(tasks) == 114
    seen = {}
    for task in tasks:
        env = RetailEnv(snapshot)
        for action in task.actions:
            outcome = env.call_detailed(action.name, action.arguments)
            if outcome.error:
                seen[action.action_id] = outcome.content
            elif action.name.startswith(("get_", "modify_", "cancel_", "return_", "exchange_")):
                assert isinstance(json.loads(outcome.content), dict)  # records come back as JSON
    assert set(seen) == set(EXPECTED_GOLD_ERRORS), "gold actions failed that should succeed, or the reverse"
    for action_id, phrase in EXPECTED_GOLD_ERRORS.items():
        assert phrase in seen[action_id], (action_id, seen[action_id])


def test_tool_schemas_fit_gold_actions(tasks: list[RetailTask]) -> None:
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in tool_schemas()}
    for task in tasks:
        for action in task.actions:
            assert action.name in schemas, action.name
            assert set(action.arguments) == set(schemas[action.name]["required"]), action


def test_gold_agent_scores_one_on_every_task(tasks: list[RetailTask], snapshot: RetailSnapshot, gold: GoldHashCache) -> None:
    for task in tasks:
        env = RetailEnv(snapshot)
        for name, arguments in task.gold_calls:
            env.call(name, json.dumps(arguments))  # as an LLM sends them: a JSON string
        info = evaluate_env(task, env, say_everything(task), gold, termination_reason="user_stop")
        assert info.reward == 1.0, (task.id, info)
        assert info.db_match and info.final_db_hash == info.gold_db_hash


def test_skipping_a_write_scores_zero(tasks: list[RetailTask], snapshot: RetailSnapshot, gold: GoldHashCache) -> None:
    checked = 0
    for task in tasks:
        writes = [i for i, a in enumerate(task.actions)
                  if is_write_tool(a.name) and a.action_id not in EXPECTED_GOLD_ERRORS]
        if not writes:
            continue
        skip = writes[-1]
        env = RetailEnv(snapshot)
        env.replay(call for i, call in enumerate(task.gold_calls) if i != skip)
        info = evaluate_env(task, env, say_everything(task), gold)
        assert info.reward == 0.0 and not info.db_match and info.db_reward == 0.0, task.id
        checked += 1
    assert checked == 103  # every task whose gold trajectory writes


def test_read_only_tasks_match_the_initial_db(tasks: list[RetailTask], snapshot: RetailSnapshot, gold: GoldHashCache) -> None:
    initial = db_hash(snapshot.tables)
    read_only = [t for t in tasks if gold.get(t).db_hash == initial]
    assert {t.id for t in read_only} >= {"10", "105"}  # 105: the gold exchange is refused
    for task in read_only:  # doing nothing is right for them (when nothing must be said)
        info = evaluate_env(task, RetailEnv(snapshot), say_everything(task), gold)
        assert info.db_match and info.reward == 1.0


def test_wrong_write_scores_zero(tasks: list[RetailTask], snapshot: RetailSnapshot, gold: GoldHashCache) -> None:
    task = next(t for t in tasks if t.id == "0")
    env = RetailEnv(snapshot)
    env.replay(task.gold_calls[:-1])
    # exchange the keyboard only, not the thermostat as well
    last = task.actions[-1].arguments
    out = env.call("exchange_delivered_order_items", {**last, "item_ids": last["item_ids"][:1], "new_item_ids": last["new_item_ids"][:1]})
    assert not out.startswith("Error")
    assert evaluate_env(task, env, [], gold).reward == 0.0


def test_gold_replay_is_cached_and_reported(tasks: list[RetailTask], gold: GoldHashCache, snapshot: RetailSnapshot) -> None:
    task = next(t for t in tasks if t.id == "64")
    state = gold.get(task)
    assert gold.get(task) is state
    assert state.write_failed and state.replay_errors[0].startswith("64_6 exchange_delivered_order_items: Error:")
    assert replay_gold(task, snapshot) == state


def test_communicate_check_normalises_like_tau2() -> None:
    checks = communicate_checks(["8276.23", "camera", "20 hours"], ["Your total is $8,276.23.", "The CAMERA is in stock."])
    assert [(c.info, c.met) for c in checks] == [("8276.23", True), ("camera", True), ("20 hours", False)]
    assert communicate_checks(["10"], [])[0].met is False
    assert communicate_checks([], ["anything"]) == []


def test_communicate_info_gates_the_reward(tasks: list[RetailTask], snapshot: RetailSnapshot, gold: GoldHashCache) -> None:
    task = next(t for t in tasks if t.communicate_info and any(is_write_tool(a.name) for a in t.actions))
    env = RetailEnv(snapshot)
    env.replay(task.gold_calls)
    silent = evaluate_env(task, env, ["Done."], gold)
    assert silent.db_match and silent.db_reward == 1.0
    assert silent.communicate_reward == 0.0 and silent.reward == 0.0
    assert [c.met for c in silent.communicate_checks] == [False] * len(task.communicate_info)
    told = evaluate_env(task, env, say_everything(task), gold)
    assert told.reward == 1.0 and all(c.met for c in told.communicate_checks)


def test_abnormal_end_scores_zero_but_keeps_parts(tasks: list[RetailTask], snapshot: RetailSnapshot, gold: GoldHashCache) -> None:
    task = tasks[0]
    env = RetailEnv(snapshot)
    env.replay(task.gold_calls)
    info = compute_reward(task, env.db_hash(), [], gold.get(task), termination_reason="max_steps")
    assert info.reward == 0.0 and info.db_match and info.db_reward == 1.0
    assert info.notes == ["dialogue ended with 'max_steps': reward 0"]
    row = info.to_dict()
    assert json.loads(json.dumps(row)) == row  # goes into an output row as is
    assert set(row) >= {"reward", "db_match", "db_reward", "communicate_reward", "communicate_checks",
                        "final_db_hash", "gold_db_hash", "gold_replay_errors", "termination_reason"}


def test_many_environments_share_one_snapshot(snapshot: RetailSnapshot, tasks: list[RetailTask]) -> None:
    envs = [RetailEnv(snapshot) for _ in range(1000)]  # copy-on-write: cheap even at this count
    envs[0].replay(tasks[0].gold_calls)
    assert envs[0].db.written_keys() == {"orders": ["#W2378156"]}
    assert envs[1].db_hash() == db_hash(snapshot.tables) != envs[0].db_hash()


async def test_local_client_scores_like_the_env(tasks: list[RetailTask], snapshot: RetailSnapshot, gold: GoldHashCache) -> None:
    task = next(t for t in tasks if t.communicate_info and any(is_write_tool(a.name) for a in t.actions))
    client = LocalToolClient(RetailEnv(snapshot))
    for name, arguments in task.gold_calls:
        await client.call(name, arguments)
    info = await evaluate_client(client, task, say_everything(task), termination_reason="agent_stop")
    assert info.reward == 1.0 and info.gold_db_hash == gold.get(task).db_hash
    assert (await evaluate_client(client, task, [], gold=gold.get(task))).reward == 0.0  # said nothing
