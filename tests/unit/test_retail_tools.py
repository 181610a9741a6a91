"""Retail tools on a small hand-made DB whose numbers are easy to check by hand."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from matrix_hpc.workflows.retail.db import RetailSnapshot, db_hash
from matrix_hpc.workflows.retail.env import RetailEnv, is_write_tool, tool_schemas
from matrix_hpc.workflows.retail.tools import TOOL_SPECS, calculate_expression


def _addr(zip_code: str) -> dict[str, str]:
    return {"address1": "1 Main St", "address2": "", "city": "Town", "country": "USA", "state": "NY", "zip": zip_code}


def _item(item_id: str, price: float, color: str, product_id: str = "P1", name: str = "Kettle") -> dict[str, Any]:
    return {"name": name, "product_id": product_id, "item_id": item_id, "price": price, "options": {"color": color}}


def _order(order_id: str, user: str, status: str, items: list[dict[str, Any]], method: str) -> dict[str, Any]:
    total = round(sum(i["price"] for i in items), 2)
    return {
        "order_id": order_id, "user_id": user, "address": _addr("10001"), "items": items, "status": status,
        "fulfillments": [],
        "payment_history": [{"transaction_type": "payment", "amount": total, "payment_method_id": method}],
    }


def _variant(item_id: str, color: str, price: float, available: bool = True) -> dict[str, Any]:
    return {"item_id": item_id, "options": {"color": color}, "available": available, "price": price}


MINI_DB: dict[str, Any] = {
    "products": {
        "P1": {"name": "Kettle", "product_id": "P1", "variants": {
            "I1": _variant("I1", "red", 100.0), "I2": _variant("I2", "blue", 120.5),
            "I3": _variant("I3", "green", 90.0, available=False), "I4": _variant("I4", "white", 80.0)}},
        "P2": {"name": "Lamp", "product_id": "P2", "variants": {
            "L1": _variant("L1", "black", 30.0), "L2": _variant("L2", "gold", 35.0)}},
    },
    "users": {
        "ann_1": {"user_id": "ann_1", "name": {"first_name": "Ann", "last_name": "Lee"}, "address": _addr("10001"),
                  "email": "ann.lee@example.com", "orders": ["#W1", "#W2", "#W3", "#W4"], "payment_methods": {
                      "gift_card_1": {"source": "gift_card", "id": "gift_card_1", "balance": 10.0},
                      "credit_card_1": {"source": "credit_card", "id": "credit_card_1", "brand": "visa", "last_four": "1234"},
                      "paypal_1": {"source": "paypal", "id": "paypal_1"}}},
        "bob_2": {"user_id": "bob_2", "name": {"first_name": "José", "last_name": "Núñez"}, "address": _addr("20002"),
                  "email": "bob@example.com", "orders": [], "payment_methods": {
                      "gift_card_2": {"source": "gift_card", "id": "gift_card_2", "balance": 500.0}}},
    },
    "orders": {
        "#W1": _order("#W1", "ann_1", "pending", [_item("I1", 100.0, "red"), _item("L1", 30.0, "black", "P2", "Lamp")], "gift_card_1"),
        "#W2": _order("#W2", "ann_1", "pending", [_item("I1", 100.0, "red")], "credit_card_1"),
        "#W3": _order("#W3", "ann_1", "delivered", [_item("I1", 100.0, "red"), _item("I1", 100.0, "red")], "paypal_1"),
        "#W4": _order("#W4", "ann_1", "processed", [_item("I1", 100.0, "red")], "paypal_1"),
    },
}


@pytest.fixture
def env() -> RetailEnv:
    return RetailEnv(MINI_DB)


def call_json(env: RetailEnv, tool: str, **args: Any) -> dict[str, Any]:
    out = env.call(tool, args)
    assert not out.startswith("Error"), out
    result: dict[str, Any] = json.loads(out)
    return result


def assert_error(env: RetailEnv, tool: str, phrase: str, **args: Any) -> None:
    """The call fails with ``phrase`` in the message and changes nothing."""
    before = env.db_hash()
    outcome = env.call_detailed(tool, args)
    assert outcome.error and outcome.content.startswith("Error: "), outcome
    assert phrase in outcome.content, outcome.content
    assert env.db_hash() == before


def gift_balance(env: RetailEnv, user: str = "ann_1", card: str = "gift_card_1") -> float:
    return float(call_json(env, "get_user_details", user_id=user)["payment_methods"][card]["balance"])


# ---- schemas and arguments -----------------------------------------------------
def test_sixteen_tools_with_openai_schemas() -> None:
    schemas = tool_schemas()
    names = [s["function"]["name"] for s in schemas]
    # the issue says "15" but lists 16: tau2 added get_item_details, which gold actions use
    assert len(names) == 16 == len(set(names))
    for s in schemas:
        assert s["type"] == "function"
        params = s["function"]["parameters"]
        assert params["type"] == "object" and set(params["required"]) == set(params["properties"])
        assert s["function"]["description"]
    writes = {s.name for s in TOOL_SPECS if s.writes}
    assert writes == {"cancel_pending_order", "exchange_delivered_order_items", "modify_pending_order_address",
                      "modify_pending_order_items", "modify_pending_order_payment", "modify_user_address",
                      "return_delivered_order_items"}
    assert is_write_tool("cancel_pending_order") and not is_write_tool("get_order_details")
    assert not is_write_tool("no_such_tool")


def test_argument_errors_name_the_problem(env: RetailEnv) -> None:
    assert_error(env, "get_order_details", "Missing argument(s) for get_order_details: order_id")
    assert_error(env, "get_order_details", "Unexpected argument(s) for get_order_details: foo; expected: order_id",
                 order_id="#W1", foo=1)
    assert_error(env, "find_user_id_by_name_zip", "Argument 'zip' of find_user_id_by_name_zip must be a string",
                 first_name="Ann", last_name="Lee", zip=10001)
    assert_error(env, "return_delivered_order_items", "must be a list of strings",
                 order_id="#W3", item_ids="I1", payment_method_id="paypal_1")
    assert_error(env, "drop_database", "Unknown tool 'drop_database'; available tools: calculate")


def test_arguments_as_openai_json_string(env: RetailEnv) -> None:
    assert env.call("get_user_details", '{"user_id": "ann_1"}').startswith('{"user_id": "ann_1"')
    assert env.call("list_all_product_types", "") == '{"Kettle": "P1", "Lamp": "P2"}'
    assert env.call("get_user_details", "{not json").startswith("Error: Tool arguments are not valid JSON")
    assert env.call("get_user_details", "[1]") == "Error: Tool arguments must be a JSON object"


# ---- read tools ----------------------------------------------------------------
def test_find_user(env: RetailEnv) -> None:
    assert env.call("find_user_id_by_email", {"email": "ANN.LEE@example.com"}) == "ann_1"
    assert env.call("find_user_id_by_email", {"email": "nobody@example.com"}) == "Error: User not found"
    assert env.call("find_user_id_by_name_zip", {"first_name": "ann", "last_name": "LEE", "zip": "10001"}) == "ann_1"
    # accents are optional: a spoken name carries none
    assert env.call("find_user_id_by_name_zip", {"first_name": "Jose", "last_name": "Nunez", "zip": "20002"}) == "bob_2"
    assert env.call("find_user_id_by_name_zip", {"first_name": "Ann", "last_name": "Lee", "zip": "10002"}) == "Error: User not found"


def test_get_details(env: RetailEnv) -> None:
    order = call_json(env, "get_order_details", order_id="#W2")
    assert order["status"] == "pending" and order["cancel_reason"] is None and order["return_items"] is None
    assert call_json(env, "get_item_details", item_id="I2") == _variant("I2", "blue", 120.5)
    assert set(call_json(env, "get_product_details", product_id="P1")["variants"]) == {"I1", "I2", "I3", "I4"}
    assert env.call("get_order_details", {"order_id": "W2"}).startswith("Error: Order not found: 'W2'")
    assert env.call("get_product_details", {"product_id": "I1"}).startswith("Error: Product not found")
    assert env.call("get_item_details", {"item_id": "P1"}).startswith("Error: Item not found")
    assert env.call("get_user_details", {"user_id": "zed"}) == "Error: User not found: 'zed'"


def test_calculate_and_transfer(env: RetailEnv) -> None:
    assert env.call("calculate", {"expression": "(19.99 + 5) * 2"}) == "49.98"
    assert env.call("calculate", {"expression": "10 / 3"}) == "3.33"
    assert env.call("calculate", {"expression": "-4 + 1"}) == "-3.0"
    assert env.call("calculate", {"expression": "1 / 0"}) == "Error: Division by zero in expression"
    assert env.call("calculate", {"expression": "__import__('os')"}) == "Error: Invalid characters in expression"
    assert env.call("calculate", {"expression": "9**9**9"}).startswith("Error: Unsupported expression")
    assert env.call("calculate", {"expression": "(1 +"}).startswith("Error: Invalid expression")
    assert calculate_expression("100 - 79.5") == "20.5"
    assert env.call("transfer_to_human_agents", {"summary": "wants a manager"}) == "Transfer successful"


# ---- cancel --------------------------------------------------------------------
def test_cancel_gift_card_order_refunds_card_immediately(env: RetailEnv) -> None:
    order = call_json(env, "cancel_pending_order", order_id="#W1", reason="no longer needed")
    assert order["status"] == "cancelled" and order["cancel_reason"] == "no longer needed"
    assert order["payment_history"][-1] == {"transaction_type": "refund", "amount": 130.0, "payment_method_id": "gift_card_1"}
    assert gift_balance(env) == 140.0
    assert_error(env, "cancel_pending_order", "Non-pending order cannot be cancelled (status: cancelled)",
                 order_id="#W1", reason="no longer needed")


def test_cancel_card_order_leaves_gift_cards(env: RetailEnv) -> None:
    order = call_json(env, "cancel_pending_order", order_id="#W2", reason="ordered by mistake")
    assert [p["transaction_type"] for p in order["payment_history"]] == ["payment", "refund"]
    assert gift_balance(env) == 10.0


def test_cancel_errors(env: RetailEnv) -> None:
    assert_error(env, "cancel_pending_order", "Invalid reason 'too expensive'", order_id="#W2", reason="too expensive")
    assert_error(env, "cancel_pending_order", "Non-pending order cannot be cancelled (status: processed)",
                 order_id="#W4", reason="no longer needed")
    assert_error(env, "cancel_pending_order", "Order not found", order_id="#W9", reason="no longer needed")


# ---- modify pending ------------------------------------------------------------
def test_modify_items_charges_difference_and_locks_order(env: RetailEnv) -> None:
    assert_error(env, "modify_pending_order_items", "Insufficient gift card balance",
                 order_id="#W2", item_ids=["I1"], new_item_ids=["I2"], payment_method_id="gift_card_1")
    order = call_json(env, "modify_pending_order_items", order_id="#W2", item_ids=["I1"], new_item_ids=["I2"],
                      payment_method_id="credit_card_1")
    assert order["status"] == "pending (item modified)"
    assert order["items"][0] == _item("I2", 120.5, "blue")
    assert order["payment_history"][-1] == {"transaction_type": "payment", "amount": 20.5, "payment_method_id": "credit_card_1"}
    # items can be modified once; the order can no longer be cancelled, but its address can change
    assert_error(env, "modify_pending_order_items", "Non-pending order cannot be modified",
                 order_id="#W2", item_ids=["I2"], new_item_ids=["I1"], payment_method_id="credit_card_1")
    assert_error(env, "cancel_pending_order", "Non-pending order cannot be cancelled", order_id="#W2", reason="no longer needed")
    assert call_json(env, "modify_pending_order_address", order_id="#W2", **_addr("99999"))["address"]["zip"] == "99999"


def test_modify_items_refund_to_gift_card(env: RetailEnv) -> None:
    order = call_json(env, "modify_pending_order_items", order_id="#W1", item_ids=["I1", "L1"],
                      new_item_ids=["I4", "L2"], payment_method_id="gift_card_1")
    # (80 - 100) + (35 - 30) = -15: refunded to the card
    assert order["payment_history"][-1] == {"transaction_type": "refund", "amount": 15.0, "payment_method_id": "gift_card_1"}
    assert [(i["item_id"], i["price"], i["options"]) for i in order["items"]] == [
        ("I4", 80.0, {"color": "white"}), ("L2", 35.0, {"color": "gold"})]
    assert gift_balance(env) == 25.0


def test_modify_items_errors(env: RetailEnv) -> None:
    common = {"order_id": "#W2", "payment_method_id": "credit_card_1"}
    assert_error(env, "modify_pending_order_items", "New item I3 not found or available", item_ids=["I1"], new_item_ids=["I3"], **common)
    assert_error(env, "modify_pending_order_items", "item 'L2' is not a variant of product 'P1'", item_ids=["I1"], new_item_ids=["L2"], **common)
    assert_error(env, "modify_pending_order_items", "should be different", item_ids=["I1"], new_item_ids=["I1"], **common)
    assert_error(env, "modify_pending_order_items", "should match", item_ids=["I1"], new_item_ids=["I2", "I4"], **common)
    assert_error(env, "modify_pending_order_items", "Item I2 not found in order #W2", item_ids=["I2"], new_item_ids=["I4"], **common)
    assert_error(env, "modify_pending_order_items", "item_ids is empty", item_ids=[], new_item_ids=[], **common)
    assert_error(env, "modify_pending_order_items", "Payment method not found: 'gift_card_2'",
                 order_id="#W2", item_ids=["I1"], new_item_ids=["I4"], payment_method_id="gift_card_2")
    assert_error(env, "modify_pending_order_address", "Non-pending order cannot be modified (status: delivered)",
                 order_id="#W3", **_addr("1"))


def test_modify_payment(env: RetailEnv) -> None:
    assert_error(env, "modify_pending_order_payment", "Insufficient gift card balance to pay for the order",
                 order_id="#W2", payment_method_id="gift_card_1")
    assert_error(env, "modify_pending_order_payment", "different from the current one",
                 order_id="#W2", payment_method_id="credit_card_1")
    order = call_json(env, "modify_pending_order_payment", order_id="#W2", payment_method_id="paypal_1")
    assert order["payment_history"] == [
        {"transaction_type": "payment", "amount": 100.0, "payment_method_id": "credit_card_1"},
        {"transaction_type": "payment", "amount": 100.0, "payment_method_id": "paypal_1"},
        {"transaction_type": "refund", "amount": 100.0, "payment_method_id": "credit_card_1"},
    ]
    assert_error(env, "modify_pending_order_payment", "exactly one payment", order_id="#W2", payment_method_id="credit_card_1")
    # paying a gift-card order by card refunds the gift card at once
    call_json(env, "modify_pending_order_payment", order_id="#W1", payment_method_id="credit_card_1")
    assert gift_balance(env) == 140.0


# ---- delivered orders ----------------------------------------------------------
def test_return(env: RetailEnv) -> None:
    assert_error(env, "return_delivered_order_items", "original payment method or a gift card",
                 order_id="#W3", item_ids=["I1"], payment_method_id="credit_card_1")
    assert_error(env, "return_delivered_order_items", "Item I1 not found in order #W3",
                 order_id="#W3", item_ids=["I1", "I1", "I1"], payment_method_id="paypal_1")
    assert_error(env, "return_delivered_order_items", "Non-delivered order cannot be returned (status: pending)",
                 order_id="#W2", item_ids=["I1"], payment_method_id="credit_card_1")
    order = call_json(env, "return_delivered_order_items", order_id="#W3", item_ids=["I1", "I1"], payment_method_id="gift_card_1")
    assert order["status"] == "return requested"
    assert order["return_items"] == ["I1", "I1"] and order["return_payment_method_id"] == "gift_card_1"
    assert gift_balance(env) == 10.0  # the refund happens when the items come back, not now


def test_exchange(env: RetailEnv) -> None:
    assert_error(env, "exchange_delivered_order_items", "Insufficient gift card balance",
                 order_id="#W3", item_ids=["I1"], new_item_ids=["I2"], payment_method_id="gift_card_1")
    order = call_json(env, "exchange_delivered_order_items", order_id="#W3", item_ids=["I1", "I1"],
                      new_item_ids=["I4", "I2"], payment_method_id="paypal_1")
    assert order["status"] == "exchange requested"
    assert order["exchange_items"] == ["I1", "I1"] and order["exchange_new_items"] == ["I2", "I4"]
    assert order["exchange_price_difference"] == 0.5 and order["exchange_payment_method_id"] == "paypal_1"
    assert [i["item_id"] for i in order["items"]] == ["I1", "I1"]  # items change when the exchange completes
    assert_error(env, "exchange_delivered_order_items", "Non-delivered order cannot be exchanged",
                 order_id="#W3", item_ids=["I1"], new_item_ids=["I2"], payment_method_id="paypal_1")


def test_modify_user_address(env: RetailEnv) -> None:
    user = call_json(env, "modify_user_address", user_id="ann_1", **_addr("55555"))
    assert user["address"]["zip"] == "55555"
    assert call_json(env, "get_order_details", order_id="#W1")["address"]["zip"] == "10001"
    assert_error(env, "modify_user_address", "User not found", user_id="zed", **_addr("1"))


# ---- DB copies and hashes --------------------------------------------------------
def test_environments_are_isolated() -> None:
    source = copy.deepcopy(MINI_DB)
    env_a = RetailEnv(source)
    source["orders"]["#W1"]["status"] = "delivered"  # the env holds its own copy
    assert json.loads(env_a.call("get_order_details", {"order_id": "#W1"}))["status"] == "pending"
    snapshot = RetailSnapshot(MINI_DB)
    env_b, env_c = RetailEnv(snapshot), RetailEnv(snapshot)
    env_b.call("cancel_pending_order", {"order_id": "#W1", "reason": "no longer needed"})
    assert json.loads(env_c.call("get_order_details", {"order_id": "#W1"}))["status"] == "pending"
    assert snapshot.tables["orders"]["#W1"]["status"] == "pending"
    assert snapshot.tables["users"]["ann_1"]["payment_methods"]["gift_card_1"]["balance"] == 10.0
    assert env_b.db.written_keys() == {"orders": ["#W1"], "users": ["ann_1"]}


def test_hash_matches_full_dump_and_tracks_changes(env: RetailEnv) -> None:
    fresh = env.db_hash()
    assert fresh == db_hash(MINI_DB)  # incremental hash == hash of the whole normalised DB
    shuffled = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(MINI_DB.items()))}
    assert db_hash(shuffled) == fresh  # key order does not matter
    env.call("modify_user_address", {"user_id": "ann_1", **_addr("55555")})
    changed = env.db_hash()
    assert changed != fresh and changed == db_hash(env.dump_db())
    env.call("modify_user_address", {"user_id": "ann_1", **_addr("10001")})
    assert env.db_hash() == fresh  # same content, same hash


def test_counts_calls_and_errors(env: RetailEnv) -> None:
    env.call("get_user_details", {"user_id": "ann_1"})
    env.call("get_user_details", {"user_id": "nobody"})
    assert (env.calls, env.errors) == (2, 1)


def test_server_imports_only_the_standard_library() -> None:
    """The tool server runs in a bare sandbox: nothing heavy may come in with it
    (e.g. through ``matrix_hpc/workflows/__init__.py``)."""
    import subprocess
    import sys

    code = ("import json, sys, matrix_hpc.workflows.retail.tool_server; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    outside = [m for m in json.loads(done.stdout) if not m.startswith(("_", "matrix_hpc"))]  # _: site/editable hooks
    assert outside == []
