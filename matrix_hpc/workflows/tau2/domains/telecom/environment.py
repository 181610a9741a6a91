"""How tau2 builds a telecom environment and keeps the phone in line with the carrier DB.

After every tool call in a live dialogue (and after every initialisation
action) tau2 copies the line's state from the carrier DB into the phone's
surroundings: line active, roaming allowed, data limit exceeded; a paid
payment request marks its bill Paid and is cleared; a bill awaiting payment
becomes the phone's payment request.
"""

from __future__ import annotations

from matrix_hpc.workflows.tau2.domains.telecom.models import LineStatus, TelecomDB
from matrix_hpc.workflows.tau2.domains.telecom.tools import TelecomTools
from matrix_hpc.workflows.tau2.domains.telecom.user_models import PaymentRequest, TelecomUserDB
from matrix_hpc.workflows.tau2.domains.telecom.user_tools import TelecomUserTools
from matrix_hpc.workflows.tau2.environment import Tau2Environment


def sync_phone(env: Tau2Environment) -> None:
    """tau2's ``TelecomEnvironment.sync_tools``."""
    carrier: TelecomTools = env.tools  # type: ignore[assignment]
    phone: TelecomUserTools = env.user_tools  # type: ignore[assignment]
    around = phone.surroundings
    if around.phone_number is None:
        return
    line = carrier.line_by_phone(around.phone_number)
    around.line_active = line.status == LineStatus.ACTIVE
    around.roaming_allowed = bool(line.roaming_enabled)
    plan = carrier.plan(line.plan_id)
    around.mobile_data_usage_exceeded = line.data_used_gb >= plan.data_limit_gb + line.data_refueling_gb
    request = around.payment_request
    if request is not None and request.paid:
        carrier.mark_bill_paid(request.bill_id)
        around.payment_request = None
    if around.payment_request is None:
        awaiting = carrier.bills_awaiting_payment(carrier.get_customer_by_phone(around.phone_number))
        if awaiting:
            around.payment_request = PaymentRequest(bill_id=awaiting[0].bill_id, amount_due=awaiting[0].total_due)


def new_environment(db: TelecomDB, user_db: TelecomUserDB) -> Tau2Environment:
    return Tau2Environment("telecom", TelecomTools(db), TelecomUserTools(user_db), sync=sync_phone)
