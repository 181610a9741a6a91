"""The retail agent's tools, behaving as tau2-bench's (a2c02472), quirks included.

Quirks kept on purpose (docs/tau2.md lists them as tau2's behaviour):

- ``modify_pending_order_items`` records the *unrounded* float sum of price
  differences as the payment amount, and gives every swapped item the price
  and options of the LAST new variant of the list (the options dict is shared
  with the product's variant).
- ``find_user_id_by_name_zip`` folds the case of names but compares the zip
  exactly; ``find_user_id_by_email`` folds case; nothing else is normalised.
- Empty ``item_ids`` are not refused: the order still changes status.
- Error texts are tau2's bare messages ("Order not found", "Some item not found").
"""

from __future__ import annotations

import json

from matrix_hpc.workflows.tau2.calculate import calculate as evaluate_expression
from matrix_hpc.workflows.tau2.domains.retail.models import (
    GiftCard,
    Order,
    OrderItem,
    OrderPayment,
    PaymentMethod,
    Product,
    RetailDB,
    User,
    UserAddress,
    Variant,
)
from matrix_hpc.workflows.tau2.tools import ToolKit, tool

CANCEL_REASONS = ("no longer needed", "ordered by mistake")


class RetailTools(ToolKit):  # the class name shows in argument errors, as tau2's does
    db: RetailDB

    def __init__(self, db: RetailDB) -> None:
        super().__init__(db)

    # --- lookups (tau2's private helpers: their messages are the errors callers see)

    def _order(self, order_id: str) -> Order:
        if order_id not in self.db.orders:
            raise ValueError("Order not found")
        return self.db.orders[order_id]

    def _user(self, user_id: str) -> User:
        if user_id not in self.db.users:
            raise ValueError("User not found")
        return self.db.users[user_id]

    def _product(self, product_id: str) -> Product:
        if product_id not in self.db.products:
            raise ValueError("Product not found")
        return self.db.products[product_id]

    def _variant(self, product_id: str, variant_id: str) -> Variant:
        variants = self._product(product_id).variants
        if variant_id not in variants:
            raise ValueError("Variant not found")
        return variants[variant_id]

    def _payment_method(self, user_id: str, payment_method_id: str) -> PaymentMethod:
        methods = self._user(user_id).payment_methods
        if payment_method_id not in methods:
            raise ValueError("Payment method not found")
        return methods[payment_method_id]

    @staticmethod
    def _first_item(order: Order, item_id: str) -> OrderItem:
        for item in order.items:
            if item.item_id == item_id:
                return item
        raise ValueError(f"Item {item_id} not found")

    @staticmethod
    def _check_counts(order: Order, item_ids: list[str], message: str) -> None:
        """Each id may be asked for at most as many times as the order holds it."""
        held = [item.item_id for item in order.items]
        for item_id in item_ids:
            if item_ids.count(item_id) > held.count(item_id):
                raise ValueError(message.format(item_id=item_id))

    # --- tools, in tau2's order

    @tool(mutates=False)
    def calculate(self, expression: str) -> str:
        return evaluate_expression(expression)

    @tool(mutates=True)
    def cancel_pending_order(self, order_id: str, reason: str) -> Order:
        order = self._order(order_id)
        if order.status != "pending":
            raise ValueError("Non-pending order cannot be cancelled")
        if reason not in CANCEL_REASONS:
            raise ValueError("Invalid reason")
        refunds = []
        for payment in order.payment_history:
            refunds.append(
                OrderPayment(
                    transaction_type="refund", amount=payment.amount, payment_method_id=payment.payment_method_id
                )
            )
            method = self._payment_method(self._user(order.user_id).user_id, payment.payment_method_id)
            if isinstance(method, GiftCard):  # gift cards are refunded at once
                method.balance = round(method.balance + payment.amount, 2)
        order.status = "cancelled"
        order.cancel_reason = reason  # type: ignore[assignment]  # checked above
        order.payment_history.extend(refunds)
        return order

    @tool(mutates=True)
    def exchange_delivered_order_items(
        self, order_id: str, item_ids: list[str], new_item_ids: list[str], payment_method_id: str
    ) -> Order:
        order = self._order(order_id)
        if order.status != "delivered":
            raise ValueError("Non-delivered order cannot be exchanged")
        self._check_counts(order, item_ids, "Number of {item_id} not found.")
        if len(item_ids) != len(new_item_ids):
            raise ValueError("The number of items to be exchanged should match.")
        difference = self._price_difference(order, item_ids, new_item_ids, refuse_same=False)
        difference = round(difference, 2)
        method = self._payment_method(order.user_id, payment_method_id)
        if isinstance(method, GiftCard) and method.balance < difference:
            raise ValueError("Insufficient gift card balance to pay for the price difference")
        order.status = "exchange requested"
        order.exchange_items = sorted(item_ids)
        order.exchange_new_items = sorted(new_item_ids)
        order.exchange_payment_method_id = payment_method_id
        order.exchange_price_difference = difference
        return order

    def _price_difference(self, order: Order, item_ids: list[str], new_item_ids: list[str], refuse_same: bool) -> float:
        """Sum of new minus old prices, checking each pair as tau2 does (in its order)."""
        total: float = 0
        for item_id, new_item_id in zip(item_ids, new_item_ids, strict=False):
            if refuse_same and item_id == new_item_id:
                raise ValueError("The new item id should be different from the old item id")
            item = self._first_item(order, item_id)
            variant = self._variant(item.product_id, new_item_id)
            if not variant.available:
                raise ValueError(f"New item {new_item_id} not found or available")
            total += variant.price - item.price
        return total

    @tool(mutates=False)
    def find_user_id_by_name_zip(self, first_name: str, last_name: str, zip: str) -> str:
        for user_id, user in self.db.users.items():
            if (
                user.name.first_name.lower() == first_name.lower()
                and user.name.last_name.lower() == last_name.lower()
                and user.address.zip == zip
            ):
                return user_id
        raise ValueError("User not found")

    @tool(mutates=False)
    def find_user_id_by_email(self, email: str) -> str:
        for user_id, user in self.db.users.items():
            if user.email.lower() == email.lower():
                return user_id
        raise ValueError("User not found")

    @tool(mutates=False)
    def get_order_details(self, order_id: str) -> Order:
        return self._order(order_id)

    @tool(mutates=False)
    def get_product_details(self, product_id: str) -> Product:
        return self._product(product_id)

    @tool(mutates=False)
    def get_item_details(self, item_id: str) -> Variant:
        for product in self.db.products.values():
            if item_id in product.variants:
                return product.variants[item_id]
        raise ValueError("Item not found")

    @tool(mutates=False)
    def get_user_details(self, user_id: str) -> User:
        return self._user(user_id)

    @tool(mutates=False)
    def list_all_product_types(self) -> str:
        names = {product.name: product.product_id for product in self.db.products.values()}
        return json.dumps(names, sort_keys=True)

    @tool(mutates=True)
    def modify_pending_order_address(
        self, order_id: str, address1: str, address2: str, city: str, state: str, country: str, zip: str
    ) -> Order:
        order = self._order(order_id)
        if "pending" not in order.status:
            raise ValueError("Non-pending order cannot be modified")
        order.address = UserAddress(
            address1=address1, address2=address2, city=city, state=state, country=country, zip=zip
        )
        return order

    @tool(mutates=True)
    def modify_pending_order_items(
        self, order_id: str, item_ids: list[str], new_item_ids: list[str], payment_method_id: str
    ) -> Order:
        order = self._order(order_id)
        if order.status != "pending":
            raise ValueError("Non-pending order cannot be modified")
        self._check_counts(order, item_ids, "{item_id} not found")
        if len(item_ids) != len(new_item_ids):
            raise ValueError("The number of items to be exchanged should match")
        difference = self._price_difference(order, item_ids, new_item_ids, refuse_same=True)
        method = self._payment_method(order.user_id, payment_method_id)
        if isinstance(method, GiftCard) and method.balance < difference:
            raise ValueError("Insufficient gift card balance to pay for the new item")
        order.payment_history.append(
            OrderPayment(
                transaction_type="payment" if difference > 0 else "refund",
                amount=abs(difference),  # unrounded, as tau2 stores it
                payment_method_id=payment_method_id,
            )
        )
        if isinstance(method, GiftCard):
            method.balance = round(method.balance - difference, 2)
        # tau2 applies the variant of the LAST pair to every swapped item.
        last_variant = (
            self._variant(self._first_item(order, item_ids[-1]).product_id, new_item_ids[-1]) if item_ids else None
        )
        for item_id, new_item_id in zip(item_ids, new_item_ids, strict=False):
            item = self._first_item(order, item_id)
            item.item_id = new_item_id
            item.price = last_variant.price  # type: ignore[union-attr]  # set whenever the loop runs
            item.options = last_variant.options  # type: ignore[union-attr]
        order.status = "pending (item modified)"
        return order

    @tool(mutates=True)
    def modify_pending_order_payment(self, order_id: str, payment_method_id: str) -> Order:
        order = self._order(order_id)
        if "pending" not in order.status:
            raise ValueError("Non-pending order cannot be modified")
        method = self._payment_method(order.user_id, payment_method_id)
        history = order.payment_history
        if len(history) != 1 or history[0].transaction_type != "payment":
            raise ValueError("There should be exactly one payment for a pending order")
        if history[0].payment_method_id == payment_method_id:
            raise ValueError("The new payment method should be different from the current one")
        amount = history[0].amount
        if isinstance(method, GiftCard) and method.balance < amount:
            raise ValueError("Insufficient gift card balance to pay for the order")
        old_method_id = history[0].payment_method_id
        history.extend(
            [
                OrderPayment(transaction_type="payment", amount=amount, payment_method_id=payment_method_id),
                OrderPayment(transaction_type="refund", amount=amount, payment_method_id=old_method_id),
            ]
        )
        if isinstance(method, GiftCard):
            method.balance = round(method.balance - amount, 2)
        old_method = self._payment_method(order.user_id, old_method_id)
        if isinstance(old_method, GiftCard):
            old_method.balance = round(old_method.balance + amount, 2)
        return order

    @tool(mutates=True)
    def modify_user_address(
        self, user_id: str, address1: str, address2: str, city: str, state: str, country: str, zip: str
    ) -> User:
        user = self._user(user_id)
        user.address = UserAddress(
            address1=address1, address2=address2, city=city, state=state, country=country, zip=zip
        )
        return user

    @tool(mutates=True)
    def return_delivered_order_items(self, order_id: str, item_ids: list[str], payment_method_id: str) -> Order:
        order = self._order(order_id)
        if order.status != "delivered":
            raise ValueError("Non-delivered order cannot be returned")
        method = self._payment_method(self._user(order.user_id).user_id, payment_method_id)
        if not isinstance(method, GiftCard) and payment_method_id != order.payment_history[0].payment_method_id:
            raise ValueError("Payment method should be the original payment method")
        self._check_counts(order, item_ids, "Some item not found")
        order.status = "return requested"
        order.return_items = sorted(item_ids)
        order.return_payment_method_id = payment_method_id
        return order

    @tool(mutates=False)
    def transfer_to_human_agents(self, summary: str) -> str:
        return "Transfer successful"
