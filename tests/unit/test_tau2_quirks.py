"""Hand-written checks of tau2 behaviours we reproduce on purpose (see docs/tau2.md).

The golden tests already compare these against real tau2; here each quirk
is stated plainly so a reader sees what tau2 does.
"""

from __future__ import annotations

import json

import pytest

from matrix_hpc.workflows.tau2.calculate import calculate
from matrix_hpc.workflows.tau2.db import data_dir, domain_dir_env
from matrix_hpc.workflows.tau2.environment import EnvFunctionCall
from matrix_hpc.workflows.tau2.tasks import build_environment, load_tasks, new_environment, tasks_by_id
from matrix_hpc.workflows.tau2.tools import caller_text

PENDING, PENDING_USER = "#W6779827", "ethan_lopez_6291"
DELIVERED = "#W4817420"


def test_modify_pending_items_stores_the_unrounded_sum_and_the_last_variant_everywhere() -> None:
    env = new_environment("retail")
    out = env.call(
        "modify_pending_order_items",
        {
            "order_id": PENDING,
            "item_ids": ["7896397433", "3379843752"],
            "new_item_ids": ["2444431651", "3709608322"],
            "payment_method_id": "credit_card_9789590",
        },
    )
    assert out.ok
    order = json.loads(out.text)
    expected_sum = (534.84 - 457.81) + (2744.7 - 3203.76)  # float sum, never rounded
    assert order["payment_history"][-1] == {
        "transaction_type": "refund",
        "amount": abs(expected_sum),
        "payment_method_id": "credit_card_9789590",
    }
    swapped = [item for item in order["items"] if item["item_id"] in ("2444431651", "3709608322")]
    assert [item["price"] for item in swapped] == [2744.7, 2744.7]  # both get the last variant's price
    assert order["status"] == "pending (item modified)"


def test_empty_item_lists_are_not_refused() -> None:
    env = new_environment("retail")
    out = env.call(
        "return_delivered_order_items",
        {"order_id": DELIVERED, "item_ids": [], "payment_method_id": "gift_card_8168843"},
    )
    assert out.ok and json.loads(out.text)["status"] == "return requested"


def test_lookups_fold_case_only_where_tau2_does() -> None:
    env = new_environment("retail")
    by_name = {"first_name": "ETHAN", "last_name": "lopez", "zip": "43275"}
    assert env.call("find_user_id_by_name_zip", by_name).text == PENDING_USER
    assert env.call("find_user_id_by_name_zip", {**by_name, "zip": " 43275"}).text == "Error: User not found"
    assert env.call("find_user_id_by_email", {"email": "ETHAN.LOPEZ8943@example.com"}).text == PENDING_USER
    assert env.call("find_user_id_by_email", {"email": " ethan.lopez8943@example.com"}).text == "Error: User not found"


def test_error_texts_are_tau2s_bare_messages() -> None:
    env = new_environment("retail")
    assert env.call("get_order_details", {"order_id": "W6779827"}).text == "Error: Order not found"
    assert env.call("no_such_tool", {}).text == "Error: Tool 'no_such_tool' not found."
    assert env.call("get_order_details", {}).text == (
        "Error: RetailTools.get_order_details() missing 1 required positional argument: 'order_id'"
    )
    assert env.call("get_user_details", {"user_id": PENDING_USER}, requestor="user").text == (
        "Error: User tools not available"
    )


@pytest.mark.parametrize(
    ("expression", "text"),
    [("2 ** 10", "1024.0"), ("7 // 2", "3.0"), ("0.1+0.2", "0.3"), ("  3 + 4", "7.0"), ("10 / 4 * 3", "7.5")],
)
def test_calculate_accepts_what_tau2_accepts(expression: str, text: str) -> None:
    assert calculate(expression) == text


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("abs(-1)", "Invalid characters in expression"),
        ("1/0", "division by zero"),
        ("2(3)", "'int' object is not callable"),
        ("9 ** 9 ** 9", "Result too large"),  # tau2's eval would hang here
    ],
)
def test_calculate_refuses_as_tau2_does(expression: str, error: str) -> None:
    with pytest.raises(Exception, match=error):
        calculate(expression)


def test_results_render_as_tau2_renders_them() -> None:
    # numbers outside a model become strings, dates outside a model ISO strings
    assert caller_text({"n": 1.5, "ok": True}) == '{"n": "1.5", "ok": "True"}'
    assert caller_text(3) == '"3"'
    assert caller_text("plain") == "plain"


def test_airline_onestop_search_pads_no_day_after_plus_one() -> None:
    env = new_environment("airline")
    pairs = json.loads(
        env.call("search_onestop_flight", {"origin": "LGA", "destination": "PHX", "date": "2024-05-09"}).text
    )
    overnight = [second for first, second in pairs if "+1" in first["scheduled_arrival_time_est"]]
    assert all(second["date"] == "2024-05-10" for second in overnight)
    assert (
        json.loads(
            env.call("search_direct_flight", {"origin": "PHL", "destination": "LGA", "date": "2024-05-16"}).text
        )[0]["date"]
        is None
    )


def test_telecom_user_and_agent_sides_sync_as_tau2_does() -> None:
    task = tasks_by_id("telecom")["[service_issue]airplane_mode_on|overdue_bill_suspension[PERSONA:None]"]
    env = build_environment("telecom", task)
    assert env.call("send_payment_request", {"customer_id": "C1001", "bill_id": "B1234321"}).ok
    # no sync between calls (how gold actions replay): the phone has no request yet
    assert env.call("make_payment", {}, requestor="user").text == "You do not have a payment request."
    env.sync()  # what a live dialogue does after every call
    assert env.step("make_payment", {}, requestor="user").text.startswith("Payment of ")
    assert env.run_assertion(EnvFunctionCall("assistant", "assert_no_overdue_bill", {"overdue_bill_id": "B1234321"}))


def test_telecom_break_vpn_degrades_the_default_vpn_of_that_environment() -> None:
    env = build_environment("telecom", tasks_by_id("telecom")["[mobile_data_issue]bad_vpn[PERSONA:None]"])
    env.call("disconnect_vpn", {}, requestor="user")
    env.call("connect_vpn", {}, requestor="user")
    assert "'server_performance': <PerformanceLevel.POOR: 'poor'>" in env.call("check_vpn_status", {}, "user").text
    fresh = new_environment("telecom")
    fresh.call("connect_vpn", {}, requestor="user")
    assert "EXCELLENT" in fresh.call("check_vpn_status", {}, "user").text


def test_telecom_setup_functions_are_not_tools() -> None:
    env = new_environment("telecom")
    args = {"customer_id": "C1001", "line_id": "L1002", "data_used_gb": 1}
    assert env.call("set_data_usage", args).text == "Error: Tool 'set_data_usage' not found."
    with pytest.raises(ValueError, match="Function no_such not found in user tools"):
        env.run_function(EnvFunctionCall("user", "no_such", {}))


def test_tool_counts_are_tau2s() -> None:
    env = new_environment("telecom")
    assert len(env.tools.tool_names()) == 13 and len(env.user_tools.tool_names()) == 30  # type: ignore[union-attr]
    assert len(new_environment("retail").tools.tool_names()) == 16
    assert len(new_environment("airline").tools.tool_names()) == 14


def test_missing_data_names_the_places_looked_at(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(domain_dir_env("retail"), str(tmp_path / "nowhere"))
    monkeypatch.setattr("matrix_hpc.workflows.tau2.db._REPO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="MATRIX_HPC_TAU2_RETAIL_DIR") as info:
        data_dir("retail")
    assert str(tmp_path / "nowhere") in str(info.value)
    with pytest.raises(ValueError, match="unknown tau2 domain 'banking'"):
        data_dir("banking")


def test_splits_are_tau2s() -> None:
    assert len(load_tasks("telecom")) == 114  # tau2's default split is base
    assert len(load_tasks("telecom", None)) == 2285
    with pytest.raises(ValueError, match="unknown retail split 'nope'"):
        load_tasks("retail", "nope")
