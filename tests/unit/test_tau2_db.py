"""tau2's DB hash and the copy-on-access template that makes fresh environments cheap."""

from __future__ import annotations

from matrix_hpc.workflows.tau2.db import data_dir, db_hash, dict_hash
from matrix_hpc.workflows.tau2.replay import Action, replay_task
from matrix_hpc.workflows.tau2.tasks import _base, load_tasks, new_environment

# tau2's get_db_hash() of the untouched DBs, as tau2-bench a2c02472 computes it.
RETAIL_START = "b25c9cb211f5efcaee5dd646054a73c4a9f43f4f5acc32c10713cd9f9ac20e9c"
AIRLINE_START = "124e39a664b56402bcd09cb8a6a9cece6acb8462337c969799d5658e3250f263"


def test_dict_hash_is_sorted_json_with_str_for_the_rest() -> None:
    import datetime
    import hashlib

    data = {"b": datetime.date(2025, 2, 25), "a": 1.0}
    assert dict_hash(data) == hashlib.sha256(b'{"a": 1.0, "b": "2025-02-25"}').hexdigest()


def test_fast_hash_equals_the_full_dump_hash() -> None:
    for domain, start in (("retail", RETAIL_START), ("airline", AIRLINE_START)):
        env = new_environment(domain)
        assert env.db_hash() == db_hash(env.tools.db) == start


def test_fast_hash_follows_changes() -> None:
    env = new_environment("retail")
    env.call("cancel_pending_order", {"order_id": "#W6779827", "reason": "no longer needed"})
    assert env.db_hash() == db_hash(env.tools.db) != RETAIL_START


def test_tasks_never_write_into_the_shared_template() -> None:
    for domain in ("retail", "airline"):
        for task in load_tasks(domain):
            criteria = task.get("evaluation_criteria") or {}
            replay_task(domain, task, [Action(a["name"], a["arguments"]) for a in criteria.get("actions") or []])
        template = _base(domain, data_dir(domain))
        assert db_hash(template.db) == (RETAIL_START if domain == "retail" else AIRLINE_START)


def test_state_dict_is_plain_json() -> None:
    import json

    state = new_environment("telecom").state_dict()
    assert json.loads(json.dumps(state))["user_db"]["device"]["sim_card_status"] == "active"


def test_copy_on_access_tables_track_every_way_of_changing_them() -> None:
    from matrix_hpc.workflows.tau2.db import CopyOnAccessDict
    from matrix_hpc.workflows.tau2.domains.retail.models import UserName

    shared = {"a": UserName(first_name="A", last_name="B"), "b": UserName(first_name="C", last_name="D")}
    table = CopyOnAccessDict(shared)
    assert table.untouched and table["a"] is not shared["a"] and not table.untouched
    for change in (
        lambda t: t.update(b=UserName(first_name="X", last_name="Y")),
        lambda t: t.setdefault("c", UserName(first_name="X", last_name="Y")),
        lambda t: t.pop("b"),
        lambda t: t.popitem(),
        lambda t: t.clear(),
        lambda t: t.__delitem__("a"),
    ):
        fresh = CopyOnAccessDict(shared)
        change(fresh)
        assert not fresh.untouched
    assert shared["a"].first_name == "A" and len(shared) == 2
