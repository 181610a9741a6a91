"""The retail domain's 16 agent tools (tau2-bench compatible names, arguments and effects).

Each tool validates everything before it writes, so a call that raises
:class:`ToolError` leaves the DB untouched. Behaviour follows tau2-bench's
retail toolkit and ``policy.md``; where tau2 leaves a float unrounded (the
price difference of a pending-order item change) we round to cents, so the
final DB does not depend on the order in which the agent lists the items.
"""

from __future__ import annotations

import ast
import json
import operator
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from matrix_hpc.workflows.retail.db import Record, RetailDB


class ToolError(Exception):
    """An invalid tool call; its message is what the agent sees (after ``Error: ``)."""


@dataclass(frozen=True)
class Param:
    name: str  # argument name, as in tau2's tool signature
    kind: str  # "string" or "string_list"
    description: str  # shown to the agent in the JSON schema


@dataclass(frozen=True)
class ToolSpec:
    name: str  # tool name, as in tau2 and tasks.json gold actions
    description: str  # shown to the agent
    params: tuple[Param, ...]  # all required, in signature order
    writes: bool  # True when the tool can change the DB

    def schema(self) -> dict[str, Any]:
        """The tool in OpenAI ``tools`` format."""
        props: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "string_list":
                props[p.name] = {"type": "array", "items": {"type": "string"}, "description": p.description}
            else:
                props[p.name] = {"type": "string", "description": p.description}
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": props,
                    "required": [p.name for p in self.params],
                    "additionalProperties": False,
                },
            },
        }


_ORDER_ID = Param("order_id", "string", "Order id such as '#W0000000' (note the leading '#').")
_USER_ID = Param("user_id", "string", "User id such as 'sara_doe_496'.")
_PAYMENT = Param(
    "payment_method_id",
    "string",
    "Payment method id from the user's profile, such as 'gift_card_0000000' or 'credit_card_0000000'.",
)
_ITEM_IDS = Param("item_ids", "string_list", "Item ids in the order to act on; repeat an id for several units.")
_NEW_ITEM_IDS = Param(
    "new_item_ids",
    "string_list",
    "Replacement item ids, position by position with item_ids; each must be an available "
    "variant of the same product.",
)
_ADDRESS = (
    Param("address1", "string", "First address line, such as '123 Main St'."),
    Param("address2", "string", "Second address line, such as 'Apt 1', or ''."),
    Param("city", "string", "City, such as 'San Francisco'."),
    Param("state", "string", "State, such as 'CA'."),
    Param("country", "string", "Country, such as 'USA'."),
    Param("zip", "string", "Zip code, such as '12345'."),
)
_CONFIRM = " Explain the details to the user and get an explicit 'yes' before calling."

TOOL_SPECS: tuple[ToolSpec, ...] = (
    ToolSpec("calculate", "Evaluate an arithmetic expression made of numbers, + - * /, parentheses and "
             "spaces; returns the result rounded to 2 decimals.",
             (Param("expression", "string", "Expression such as '(19.99 + 5) * 2'."),), False),
    ToolSpec("cancel_pending_order", "Cancel an order whose status is 'pending'. The status becomes "
             "'cancelled'; gift card payments are refunded to the card immediately, other payment "
             "methods in 5-7 business days. Returns the order." + _CONFIRM,
             (_ORDER_ID, Param("reason", "string", "Either 'no longer needed' or 'ordered by mistake'.")), True),
    ToolSpec("exchange_delivered_order_items", "Exchange items of a delivered order for other available "
             "variants of the same products; the status becomes 'exchange requested'. Can be done once "
             "per order, so collect every item first. The price difference is paid with or refunded to "
             "the given payment method (a gift card must cover it). Returns the order." + _CONFIRM,
             (_ORDER_ID, _ITEM_IDS, _NEW_ITEM_IDS, _PAYMENT), True),
    ToolSpec("find_user_id_by_email", "Find a user id by email address.",
             (Param("email", "string", "Email such as 'something@example.com'."),), False),
    ToolSpec("find_user_id_by_name_zip", "Find a user id by first name, last name and zip code. Use it "
             "when the user cannot be found by email or does not remember it.",
             (Param("first_name", "string", "First name, such as 'John'."),
              Param("last_name", "string", "Last name, such as 'Doe'."),
              Param("zip", "string", "Zip code, such as '12345'.")), False),
    ToolSpec("get_item_details", "Get an item (product variant): its options, availability and price. "
             "Item ids and product ids are different things.",
             (Param("item_id", "string", "Item id such as '6086499569'."),), False),
    ToolSpec("get_order_details", "Get the status and details of an order.", (_ORDER_ID,), False),
    ToolSpec("get_product_details", "Get a product and all its variant items with options, "
             "availability and price. Product ids and item ids are different things.",
             (Param("product_id", "string", "Product id such as '6086499569'."),), False),
    ToolSpec("get_user_details", "Get a user's profile: name, address, email, payment methods "
             "(with gift card balances) and order ids.", (_USER_ID,), False),
    ToolSpec("list_all_product_types", "List the name and product id of all 50 product types, as a "
             "JSON object sorted by name.", (), False),
    ToolSpec("modify_pending_order_address", "Change the shipping address of a pending order. Returns "
             "the order." + _CONFIRM, (_ORDER_ID, *_ADDRESS), True),
    ToolSpec("modify_pending_order_items", "Change items of an order whose status is 'pending' to other "
             "available variants of the same products. Can be done once: the status becomes 'pending "
             "(item modified)' and the order can no longer be cancelled or item-modified, so collect "
             "every item first. The price difference is paid with or refunded to the given payment "
             "method (a gift card must cover it). Returns the order." + _CONFIRM,
             (_ORDER_ID, _ITEM_IDS, _NEW_ITEM_IDS, _PAYMENT), True),
    ToolSpec("modify_pending_order_payment", "Pay a pending order with a different payment method; the "
             "original one is refunded (immediately if a gift card, else in 5-7 business days). A gift "
             "card must cover the whole amount. Returns the order." + _CONFIRM, (_ORDER_ID, _PAYMENT), True),
    ToolSpec("modify_user_address", "Change a user's default address. Returns the user." + _CONFIRM,
             (_USER_ID, *_ADDRESS), True),
    ToolSpec("return_delivered_order_items", "Request the return of items of a delivered order; the "
             "status becomes 'return requested' and the user gets return instructions by email. The "
             "refund goes to the original payment method or to an existing gift card. Returns the "
             "order." + _CONFIRM, (_ORDER_ID, _ITEM_IDS, _PAYMENT), True),
    ToolSpec("transfer_to_human_agents", "Transfer the user to a human agent with a summary of the "
             "issue. Only when the user asks for one, or the request cannot be handled with these "
             "tools under the policy.", (Param("summary", "string", "Summary of the user's issue."),), False),
)
TOOLS_BY_NAME: dict[str, ToolSpec] = {spec.name: spec for spec in TOOL_SPECS}
CANCEL_REASONS = ("no longer needed", "ordered by mistake")


def check_arguments(spec: ToolSpec, arguments: Mapping[str, Any]) -> None:
    """Raise ToolError naming the first thing wrong with ``arguments``."""
    if not isinstance(arguments, Mapping):
        raise ToolError(f"Arguments of {spec.name} must be a JSON object, got {type(arguments).__name__}")
    expected = [p.name for p in spec.params]
    missing = [n for n in expected if n not in arguments]
    if missing:
        raise ToolError(f"Missing argument(s) for {spec.name}: {', '.join(missing)}")
    unexpected = sorted(set(arguments) - set(expected))
    if unexpected:
        raise ToolError(
            f"Unexpected argument(s) for {spec.name}: {', '.join(unexpected)}; "
            f"expected: {', '.join(expected) or 'none'}"
        )
    for p in spec.params:
        value = arguments[p.name]
        if p.kind == "string" and not isinstance(value, str):
            raise ToolError(f"Argument '{p.name}' of {spec.name} must be a string, got {json.dumps(value)}")
        if p.kind == "string_list" and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ToolError(f"Argument '{p.name}' of {spec.name} must be a list of strings, got {json.dumps(value)}")


def fold_name(text: str) -> str:
    """Case- and accent-insensitive form of a name or email (a spoken name carries no accents)."""
    decomposed = unicodedata.normalize("NFKD", text.strip())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


_BIN_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
}
_UNARY_OPS: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        number: float = node.value
        return number
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        return _BIN_OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    raise ToolError("Unsupported expression: use numbers, + - * /, parentheses and spaces")


def calculate_expression(expression: str) -> str:
    """tau2's calculator without ``eval``: exponentiation is refused (it could hang the server)."""
    if not all(c in "0123456789+-*/(). " for c in expression):
        raise ToolError("Invalid characters in expression")
    if len(expression) > 1000:
        raise ToolError("Expression too long (over 1000 characters)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"Invalid expression: {expression!r}") from None
    try:
        return str(round(float(_evaluate(tree)), 2))
    except ZeroDivisionError:
        raise ToolError("Division by zero in expression") from None


class RetailTools:
    """The tools over one :class:`RetailDB` view. ``invoke`` is the single entry point.

    Example::

        tools = RetailTools(RetailDB(RetailSnapshot.from_file("db.json")))
        tools.invoke("find_user_id_by_email", {"email": "noah.brown7922@example.com"})
    """

    def __init__(self, db: RetailDB) -> None:
        self.db = db

    def invoke(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """Run a tool; returns a JSON-able value (str or dict) or raises ToolError."""
        spec = TOOLS_BY_NAME.get(name)
        if spec is None:
            raise ToolError(f"Unknown tool '{name}'; available tools: {', '.join(TOOLS_BY_NAME)}")
        check_arguments(spec, arguments)
        method: Callable[..., Any] = getattr(self, name)
        return method(**arguments)

    # ---- lookups -------------------------------------------------------
    def _order(self, order_id: str, *, write: bool = False) -> Record:
        order = self.db.get("orders", order_id)
        if order is None:
            raise ToolError(f"Order not found: {order_id!r} (order ids look like '#W0000000')")
        return self.db.for_write("orders", order_id) if write else order

    def _user(self, user_id: str, *, write: bool = False) -> Record:
        user = self.db.get("users", user_id)
        if user is None:
            raise ToolError(f"User not found: {user_id!r}")
        return self.db.for_write("users", user_id) if write else user

    def _product(self, product_id: str) -> Record:
        product = self.db.get("products", product_id)
        if product is None:
            raise ToolError(f"Product not found: {product_id!r} (product ids differ from item ids)")
        return product

    def _variant(self, product_id: str, item_id: str) -> Record:
        variant: Record | None = self._product(product_id)["variants"].get(item_id)
        if variant is None:
            raise ToolError(f"Variant not found: item {item_id!r} is not a variant of product {product_id!r}")
        return variant

    def _payment_method(self, user_id: str, payment_method_id: str) -> Record:
        method: Record | None = self._user(user_id)["payment_methods"].get(payment_method_id)
        if method is None:
            raise ToolError(f"Payment method not found: {payment_method_id!r} is not one of user {user_id}'s")
        return method

    def _adjust_gift_card(self, user_id: str, payment_method_id: str, delta: float) -> None:
        """Add ``delta`` to a gift card's balance (no-op for other payment methods)."""
        if self._payment_method(user_id, payment_method_id)["source"] != "gift_card":
            return
        card = self._user(user_id, write=True)["payment_methods"][payment_method_id]
        card["balance"] = round(card["balance"] + delta, 2)

    @staticmethod
    def _check_items_in_order(order: Record, item_ids: list[str]) -> None:
        if not item_ids:
            raise ToolError("item_ids is empty: list at least one item of the order")
        present = [item["item_id"] for item in order["items"]]
        for item_id in set(item_ids):
            if item_ids.count(item_id) > present.count(item_id):
                raise ToolError(
                    f"Item {item_id} not found in order {order['order_id']} (or listed more times than ordered)")

    def _price_difference(self, order: Record, item_ids: list[str], new_item_ids: list[str]) -> float:
        """Validate a like-for-like item swap and return new minus old price, in cents precision."""
        if len(item_ids) != len(new_item_ids):
            raise ToolError("The number of items to be exchanged should match the number of new items")
        self._check_items_in_order(order, item_ids)
        diff = 0.0
        for item_id, new_item_id in zip(item_ids, new_item_ids, strict=True):
            item = next(i for i in order["items"] if i["item_id"] == item_id)
            variant = self._variant(item["product_id"], new_item_id)
            if not variant["available"]:
                raise ToolError(f"New item {new_item_id} not found or available")
            diff += variant["price"] - item["price"]
        return round(diff, 2)

    # ---- read tools ----------------------------------------------------
    def calculate(self, expression: str) -> str:
        return calculate_expression(expression)

    def find_user_id_by_email(self, email: str) -> str:
        wanted = fold_name(email)
        for user_id, user in self.db.items("users"):
            if fold_name(user["email"]) == wanted:
                return user_id
        raise ToolError("User not found")

    def find_user_id_by_name_zip(self, first_name: str, last_name: str, zip: str) -> str:
        first, last = fold_name(first_name), fold_name(last_name)
        for user_id, user in self.db.items("users"):
            name = user["name"]
            if (fold_name(name["first_name"]), fold_name(name["last_name"])) == (first, last) and (
                user["address"]["zip"] == zip.strip()
            ):
                return user_id
        raise ToolError("User not found")

    def get_item_details(self, item_id: str) -> Record:
        for _, product in self.db.items("products"):
            variant: Record | None = product["variants"].get(item_id)
            if variant is not None:
                return variant
        raise ToolError(f"Item not found: {item_id!r} (item ids differ from product ids)")

    def get_order_details(self, order_id: str) -> Record:
        return self._order(order_id)

    def get_product_details(self, product_id: str) -> Record:
        return self._product(product_id)

    def get_user_details(self, user_id: str) -> Record:
        return self._user(user_id)

    def list_all_product_types(self) -> str:
        names = {p["name"]: p["product_id"] for _, p in self.db.items("products")}
        return json.dumps(names, sort_keys=True)

    def transfer_to_human_agents(self, summary: str) -> str:
        return "Transfer successful"

    # ---- write tools ---------------------------------------------------
    def cancel_pending_order(self, order_id: str, reason: str) -> Record:
        order = self._order(order_id)
        if order["status"] != "pending":
            raise ToolError(f"Non-pending order cannot be cancelled (status: {order['status']})")
        if reason not in CANCEL_REASONS:
            raise ToolError(f"Invalid reason {reason!r}; must be 'no longer needed' or 'ordered by mistake'")
        payments = list(order["payment_history"])
        for payment in payments:  # validate every refund target before writing anything
            self._payment_method(order["user_id"], payment["payment_method_id"])
        order = self._order(order_id, write=True)
        for payment in payments:
            self._adjust_gift_card(order["user_id"], payment["payment_method_id"], payment["amount"])
            order["payment_history"].append(
                {"transaction_type": "refund", "amount": payment["amount"],
                 "payment_method_id": payment["payment_method_id"]}
            )
        order["status"] = "cancelled"
        order["cancel_reason"] = reason
        return order

    def exchange_delivered_order_items(
        self, order_id: str, item_ids: list[str], new_item_ids: list[str], payment_method_id: str
    ) -> Record:
        order = self._order(order_id)
        if order["status"] != "delivered":
            raise ToolError(f"Non-delivered order cannot be exchanged (status: {order['status']})")
        diff = self._price_difference(order, item_ids, new_item_ids)
        method = self._payment_method(order["user_id"], payment_method_id)
        if method["source"] == "gift_card" and method["balance"] < diff:
            raise ToolError("Insufficient gift card balance to pay for the price difference")
        order = self._order(order_id, write=True)
        order["status"] = "exchange requested"
        order["exchange_items"] = sorted(item_ids)
        order["exchange_new_items"] = sorted(new_item_ids)
        order["exchange_payment_method_id"] = payment_method_id
        order["exchange_price_difference"] = diff
        return order

    def modify_pending_order_address(
        self, order_id: str, address1: str, address2: str, city: str, state: str, country: str, zip: str
    ) -> Record:
        status = self._order(order_id)["status"]
        if "pending" not in status:
            raise ToolError(f"Non-pending order cannot be modified (status: {status})")
        order = self._order(order_id, write=True)
        order["address"] = _address(address1, address2, city, state, country, zip)
        return order

    def modify_pending_order_items(
        self, order_id: str, item_ids: list[str], new_item_ids: list[str], payment_method_id: str
    ) -> Record:
        order = self._order(order_id)
        if order["status"] != "pending":
            raise ToolError(
                f"Non-pending order cannot be modified (status: {order['status']}); items can be modified once")
        diff = self._price_difference(order, item_ids, new_item_ids)
        for item_id, new_item_id in zip(item_ids, new_item_ids, strict=True):
            if item_id == new_item_id:
                raise ToolError(f"The new item id should be different from the old item id ({item_id})")
        method = self._payment_method(order["user_id"], payment_method_id)
        if method["source"] == "gift_card" and method["balance"] < diff:
            raise ToolError("Insufficient gift card balance to pay for the new item")
        order = self._order(order_id, write=True)
        order["payment_history"].append(
            {"transaction_type": "payment" if diff > 0 else "refund", "amount": abs(diff),
             "payment_method_id": payment_method_id}
        )
        self._adjust_gift_card(order["user_id"], payment_method_id, -diff)
        for item_id, new_item_id in zip(item_ids, new_item_ids, strict=True):
            # the first unchanged unit with this id (duplicates are swapped one by one)
            item = next(i for i in order["items"] if i["item_id"] == item_id)
            variant = self._variant(item["product_id"], new_item_id)
            item["item_id"] = new_item_id
            item["price"] = variant["price"]
            item["options"] = dict(variant["options"])
        order["status"] = "pending (item modified)"
        return order

    def modify_pending_order_payment(self, order_id: str, payment_method_id: str) -> Record:
        order = self._order(order_id)
        if "pending" not in order["status"]:
            raise ToolError(f"Non-pending order cannot be modified (status: {order['status']})")
        method = self._payment_method(order["user_id"], payment_method_id)
        history = order["payment_history"]
        if len(history) != 1 or history[0]["transaction_type"] != "payment":
            raise ToolError("There should be exactly one payment for a pending order")
        old_method_id, amount = history[0]["payment_method_id"], history[0]["amount"]
        if old_method_id == payment_method_id:
            raise ToolError("The new payment method should be different from the current one")
        if method["source"] == "gift_card" and method["balance"] < amount:
            raise ToolError("Insufficient gift card balance to pay for the order")
        order = self._order(order_id, write=True)
        order["payment_history"].extend([
            {"transaction_type": "payment", "amount": amount, "payment_method_id": payment_method_id},
            {"transaction_type": "refund", "amount": amount, "payment_method_id": old_method_id},
        ])
        self._adjust_gift_card(order["user_id"], payment_method_id, -amount)
        self._adjust_gift_card(order["user_id"], old_method_id, amount)
        return order

    def modify_user_address(
        self, user_id: str, address1: str, address2: str, city: str, state: str, country: str, zip: str
    ) -> Record:
        user = self._user(user_id, write=True)
        user["address"] = _address(address1, address2, city, state, country, zip)
        return user

    def return_delivered_order_items(self, order_id: str, item_ids: list[str], payment_method_id: str) -> Record:
        order = self._order(order_id)
        if order["status"] != "delivered":
            raise ToolError(f"Non-delivered order cannot be returned (status: {order['status']})")
        method = self._payment_method(order["user_id"], payment_method_id)
        if method["source"] != "gift_card" and payment_method_id != order["payment_history"][0]["payment_method_id"]:
            raise ToolError("Payment method should be the original payment method or a gift card")
        self._check_items_in_order(order, item_ids)
        order = self._order(order_id, write=True)
        order["status"] = "return requested"
        order["return_items"] = sorted(item_ids)
        order["return_payment_method_id"] = payment_method_id
        return order


def _address(address1: str, address2: str, city: str, state: str, country: str, zip: str) -> Record:
    # key order of tau2's UserAddress model
    return {"address1": address1, "address2": address2, "city": city, "country": country, "state": state, "zip": zip}
