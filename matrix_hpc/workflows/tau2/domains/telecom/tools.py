"""The telecom agent's 13 tools on the carrier DB, plus the setup and assertion functions.

Tasks call the non-tool functions (``set_data_usage``,
``suspend_line_for_overdue_bill``, ``assert_*``) through their
initialisation actions and env assertions; a caller (agent or user) can
only reach the tools. As in tau2, "today" is fixed at 2025-02-25, and a
one-time charge on a customer without a draft bill opens a new bill whose
id is random (``B`` + 8 hex digits).
"""

from __future__ import annotations

import uuid
from datetime import date, timedelta
from typing import Any

from matrix_hpc.workflows.tau2.domains.telecom.models import (
    Bill,
    BillStatus,
    Customer,
    Device,
    Line,
    LineItem,
    LineStatus,
    Plan,
    TelecomDB,
)
from matrix_hpc.workflows.tau2.tools import ToolKit, tool

TODAY = date(2025, 2, 25)


def _first_of_next_month(day: date) -> date:
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


class TelecomTools(ToolKit):  # the class name shows in argument errors, as tau2's does
    db: TelecomDB

    # Functions a task's initialisation actions or assertions may call besides the tools.
    ENV_FUNCTIONS = (
        "set_data_usage",
        "suspend_line_for_overdue_bill",
        "assert_data_refueling_amount",
        "assert_line_status",
        "assert_overdue_bill_exists",
        "assert_no_overdue_bill",
    )

    def __init__(self, db: TelecomDB) -> None:
        super().__init__(db)

    # --- lookups

    def line_by_phone(self, phone_number: str) -> Line:
        for line in self.db.lines:
            if line.phone_number == phone_number:
                return line
        raise ValueError(f"Line with phone number {phone_number} not found")

    def _line(self, line_id: str) -> Line:
        for line in self.db.lines:
            if line.line_id == line_id:
                return line
        raise ValueError(f"Line with ID {line_id} not found")

    def plan(self, plan_id: str) -> Plan:
        for plan in self.db.plans:
            if plan.plan_id == plan_id:
                return plan
        raise ValueError(f"Plan with ID {plan_id} not found")

    def _device(self, device_id: str) -> Device:
        for device in self.db.devices:
            if device.device_id == device_id:
                return device
        raise ValueError(f"Device with ID {device_id} not found")

    def bill(self, bill_id: str) -> Bill:
        for bill in self.db.bills:
            if bill.bill_id == bill_id:
                return bill
        raise ValueError(f"Bill with ID {bill_id} not found")

    def _customer_line(self, customer_id: str, line_id: str) -> Line:
        customer = self.get_customer_by_id(customer_id)
        if line_id not in customer.line_ids:
            raise ValueError(f"Line {line_id} not found for customer {customer_id}")
        return self._line(line_id)

    def bills_awaiting_payment(self, customer: Customer) -> list[Bill]:
        return [
            bill
            for bill in (self.bill(bill_id) for bill_id in customer.bill_ids)
            if bill.status == BillStatus.AWAITING_PAYMENT
        ]

    def mark_bill_paid(self, bill_id: str) -> None:
        self.bill(bill_id).status = BillStatus.PAID

    def _charge_once(self, customer_id: str, amount: float, description: str) -> None:
        """Add a line item to the customer's draft bill, opening one for next month if none."""
        customer = self.get_customer_by_id(customer_id)
        draft = next(
            (b for b in (self.bill(bill_id) for bill_id in customer.bill_ids) if b.status == BillStatus.DRAFT), None
        )
        if draft is None:
            start = _first_of_next_month(TODAY)
            draft = Bill(
                bill_id=f"B{uuid.uuid4().hex[:8]}",  # random, as in tau2
                customer_id=customer_id,
                period_start=start,
                period_end=_first_of_next_month(start) - timedelta(days=1),
                issue_date=start,
                total_due=0,
                due_date=start + timedelta(days=14),
                status=BillStatus.DRAFT,
            )
            self.db.bills.append(draft)
            customer.bill_ids.append(draft.bill_id)
        draft.line_items.append(
            LineItem(description=description, amount=amount, date=TODAY, item_type="Credit" if amount < 0 else "Charge")
        )
        draft.total_due += amount

    # --- tools

    @tool(mutates=False)
    def get_customer_by_phone(self, phone_number: str) -> Customer:
        for customer in self.db.customers:
            if customer.phone_number == phone_number:
                return customer
            for line_id in customer.line_ids:
                if self._line(line_id).phone_number == phone_number:
                    return customer
        raise ValueError(f"Customer with phone number {phone_number} not found")

    @tool(mutates=False)
    def get_customer_by_id(self, customer_id: str) -> Customer:
        for customer in self.db.customers:
            if customer.customer_id == customer_id:
                return customer
        raise ValueError(f"Customer with ID {customer_id} not found")

    @tool(mutates=False)
    def get_customer_by_name(self, full_name: str, dob: str) -> list[Customer]:
        return [
            customer
            for customer in self.db.customers
            if customer.full_name.lower() == full_name.lower() and customer.date_of_birth == dob
        ]

    @tool(mutates=False)
    def get_details_by_id(self, id: str) -> Any:
        # tau2 dispatches on the first letter only, in this order.
        if id.startswith("L"):
            return self._line(id)
        if id.startswith("D"):
            return self._device(id)
        if id.startswith("B"):
            return self.bill(id)
        if id.startswith("C"):
            return self.get_customer_by_id(id)
        if id.startswith("P"):
            return self.plan(id)
        raise ValueError(f"Unknown ID format or type: {id}")

    @tool(mutates=True)
    def suspend_line(self, customer_id: str, line_id: str, reason: str) -> dict[str, Any]:
        line = self._customer_line(customer_id, line_id)
        if line.status != LineStatus.ACTIVE:
            raise ValueError("Line must be active to suspend")
        line.status = LineStatus.SUSPENDED
        line.suspension_start_date = TODAY
        return {"message": "Line suspended successfully. $5/month holding fee will apply.", "line": line}

    @tool(mutates=True)
    def resume_line(self, customer_id: str, line_id: str) -> dict[str, Any]:
        line = self._customer_line(customer_id, line_id)
        if line.status not in (LineStatus.SUSPENDED, LineStatus.PENDING_ACTIVATION):
            raise ValueError("Line must be suspended to resume")
        line.status = LineStatus.ACTIVE
        line.suspension_start_date = None
        return {"message": "Line resumed successfully", "line": line}

    @tool(mutates=False)
    def get_bills_for_customer(self, customer_id: str, limit: int = 12) -> list[Bill]:
        customer = self.get_customer_by_id(customer_id)
        bills = [self.bill(bill_id) for bill_id in customer.bill_ids]
        return sorted(bills, key=lambda bill: bill.issue_date, reverse=True)[:limit]

    @tool(mutates=True)
    def send_payment_request(self, customer_id: str, bill_id: str) -> str:
        customer = self.get_customer_by_id(customer_id)
        if self.bills_awaiting_payment(customer):
            raise ValueError("A bill is already awaiting payment for this customer")
        if bill_id not in customer.bill_ids:
            raise ValueError(f"Bill {bill_id} not found for customer {customer_id}")
        bill = self.bill(bill_id)
        bill.status = BillStatus.AWAITING_PAYMENT
        return f"Payment request sent to the customer for bill {bill.bill_id}"

    @tool(mutates=False)
    def get_data_usage(self, customer_id: str, line_id: str) -> dict[str, Any]:
        line = self._customer_line(customer_id, line_id)
        plan = self.plan(line.plan_id)
        return {
            "line_id": line_id,
            "data_used_gb": line.data_used_gb,
            "data_limit_gb": plan.data_limit_gb,
            "data_refueling_gb": line.data_refueling_gb,
            "cycle_end_date": _first_of_next_month(TODAY) - timedelta(days=1),
        }

    @tool(mutates=True)
    def enable_roaming(self, customer_id: str, line_id: str) -> str:
        line = self._customer_line(customer_id, line_id)
        if line.roaming_enabled:
            return "Roaming was already enabled"
        line.roaming_enabled = True
        return "Roaming enabled successfully"

    @tool(mutates=True)
    def disable_roaming(self, customer_id: str, line_id: str) -> str:
        line = self._customer_line(customer_id, line_id)
        if not line.roaming_enabled:
            return "Roaming was already disabled"
        line.roaming_enabled = False
        return "Roaming disabled successfully"

    @tool(mutates=False)
    def transfer_to_human_agents(self, summary: str) -> str:
        return "Transfer successful"

    @tool(mutates=True)
    def refuel_data(self, customer_id: str, line_id: str, gb_amount: float) -> dict[str, Any]:
        line = self._customer_line(customer_id, line_id)
        if gb_amount <= 0:
            raise ValueError("Refuel amount must be positive")
        plan = self.plan(line.plan_id)
        charge = gb_amount * plan.data_refueling_price_per_gb
        line.data_refueling_gb += gb_amount
        self._charge_once(
            customer_id, charge, f"Data refueling: {gb_amount} GB at ${plan.data_refueling_price_per_gb}/GB"
        )
        return {
            "message": f"Successfully added {gb_amount} GB of data for line {line_id} for ${charge:.2f}",
            "new_data_refueling_gb": line.data_refueling_gb,
            "charge": charge,
        }

    # --- setup functions (initialisation actions)

    def set_data_usage(self, customer_id: str, line_id: str, data_used_gb: float) -> str:
        self._customer_line(customer_id, line_id).data_used_gb = data_used_gb
        return f"Data usage set to {data_used_gb} GB for line {line_id}"

    def suspend_line_for_overdue_bill(
        self, customer_id: str, line_id: str, new_bill_id: str, contract_ended: bool
    ) -> str:
        line = self._line(line_id)
        if line.status != LineStatus.ACTIVE:
            raise ValueError("Line must be active to suspend for unpaid bill")
        amount = self.plan(line.plan_id).price_per_month
        if amount <= 0:
            raise ValueError("Amount must be positive for overdue bill")
        customer = self.get_customer_by_id(customer_id)
        if [bill_id for bill_id in customer.bill_ids if self.bill(bill_id).status == BillStatus.OVERDUE]:
            raise ValueError("Customer already has an overdue bill")
        last_month_end = TODAY.replace(day=1) - timedelta(days=1)
        last_month_start = last_month_end.replace(day=1)
        overdue = Bill(
            bill_id=new_bill_id,
            customer_id=customer_id,
            period_start=last_month_start,
            period_end=last_month_end,
            issue_date=last_month_start,
            total_due=0,
            due_date=last_month_start + timedelta(days=14),
            status=BillStatus.OVERDUE,
        )
        overdue.line_items.append(
            LineItem(
                description=f"Charge for line {line.line_id}",
                amount=amount,
                date=TODAY,
                item_type="Charge" if amount > 0 else "Credit",
            )
        )
        overdue.total_due += amount
        self.db.bills.append(overdue)
        customer.bill_ids.append(new_bill_id)
        line.status = LineStatus.SUSPENDED
        line.suspension_start_date = TODAY
        if contract_ended:
            line.contract_end_date = last_month_end
        return f"Line {line_id} suspended for unpaid bill {new_bill_id}. Contract ended: {contract_ended}"

    # --- assertions (env_assertions of the tasks)

    def assert_data_refueling_amount(self, customer_id: str, line_id: str, expected_amount: float) -> bool:
        return abs(self._customer_line(customer_id, line_id).data_refueling_gb - expected_amount) < 1e-6

    def assert_line_status(self, customer_id: str, line_id: str, expected_status: LineStatus) -> bool:
        return self._customer_line(customer_id, line_id).status == expected_status

    def assert_overdue_bill_exists(self, customer_id: str, overdue_bill_id: str) -> bool:
        customer = self.get_customer_by_id(customer_id)
        if overdue_bill_id not in customer.bill_ids:
            raise ValueError(f"Overdue bill {overdue_bill_id} not found")
        if self.bill(overdue_bill_id).status != BillStatus.OVERDUE:
            raise ValueError(f"Overdue bill {overdue_bill_id} is not overdue")
        return True

    def assert_no_overdue_bill(self, overdue_bill_id: str) -> bool:
        try:
            return self.bill(overdue_bill_id).status == BillStatus.PAID
        except ValueError:
            return True
