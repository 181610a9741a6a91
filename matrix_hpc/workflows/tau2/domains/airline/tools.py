"""The airline agent's tools, behaving as tau2-bench's (a2c02472), quirks included.

Quirks kept on purpose (docs/tau2.md lists them as tau2's behaviour):

- the clock is fixed: new reservations are created at 2024-05-15T15:00:00 and
  get the ids HATHAT, HATHAU, HATHAV (then "Too many reservations");
  certificates get certificate_3221322..3221324;
- cancelling a reservation does not release its seats, and changing flights
  does not take seats either;
- a one-stop search whose first leg arrives "+1" looks for the second leg on
  ``2024-05-{day + 1}`` (no zero padding);
- list arguments are turned into models only when every element is a dict.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from matrix_hpc.workflows.tau2.calculate import calculate as evaluate_expression
from matrix_hpc.workflows.tau2.domains.airline.models import (
    AirportCode,
    Certificate,
    DirectFlight,
    Flight,
    FlightDateStatus,
    FlightDateStatusAvailable,
    FlightDB,
    FlightInfo,
    Passenger,
    Payment,
    Reservation,
    ReservationFlight,
    User,
)
from matrix_hpc.workflows.tau2.tools import ToolKit, tool

NEW_RESERVATION_IDS = ("HATHAT", "HATHAU", "HATHAV")
NEW_CERTIFICATE_NUMBERS = (3221322, 3221323, 3221324)
NOW = "2024-05-15T15:00:00"
AIRPORTS = (
    ("SFO", "San Francisco"), ("JFK", "New York"), ("LAX", "Los Angeles"), ("ORD", "Chicago"),
    ("DFW", "Dallas"), ("DEN", "Denver"), ("SEA", "Seattle"), ("ATL", "Atlanta"), ("MIA", "Miami"),
    ("BOS", "Boston"), ("PHX", "Phoenix"), ("IAH", "Houston"), ("LAS", "Las Vegas"), ("MCO", "Orlando"),
    ("EWR", "Newark"), ("CLT", "Charlotte"), ("MSP", "Minneapolis"), ("DTW", "Detroit"),
    ("PHL", "Philadelphia"), ("LGA", "LaGuardia"),
)  # fmt: skip


def _as_models(values: Any, model: type[Any]) -> Any:
    """tau2 converts a list argument only when every element is a dict."""
    if all(isinstance(value, dict) for value in values):
        return [model(**value) for value in values]
    return values


class AirlineTools(ToolKit):  # the class name shows in argument errors, as tau2's does
    db: FlightDB

    def __init__(self, db: FlightDB) -> None:
        super().__init__(db)

    # --- lookups (their messages are the errors callers see)

    def _user(self, user_id: str) -> User:
        if user_id not in self.db.users:
            raise ValueError(f"User {user_id} not found")
        return self.db.users[user_id]

    def _reservation(self, reservation_id: str) -> Reservation:
        if reservation_id not in self.db.reservations:
            raise ValueError(f"Reservation {reservation_id} not found")
        return self.db.reservations[reservation_id]

    def _flight(self, flight_number: str) -> Flight:
        if flight_number not in self.db.flights:
            raise ValueError(f"Flight {flight_number} not found")
        return self.db.flights[flight_number]

    def _flight_on(self, flight_number: str, date: str) -> FlightDateStatus:
        flight = self._flight(flight_number)
        if date not in flight.dates:
            raise ValueError(f"Flight {flight_number} not found on date {date}")
        return flight.dates[date]

    def _new_reservation_id(self) -> str:
        for reservation_id in NEW_RESERVATION_IDS:
            if reservation_id not in self.db.reservations:
                return reservation_id
        raise ValueError("Too many reservations")

    def _direct_flights(
        self, date: str, origin: str | None, destination: str | None, leave_after: str | None = None
    ) -> list[DirectFlight]:
        found = []
        for flight in self.db.flights.values():
            if (
                (origin is None or flight.origin == origin)
                and (destination is None or flight.destination == destination)
                and date in flight.dates
                and flight.dates[date].status == "available"
                and (leave_after is None or flight.scheduled_departure_time_est >= leave_after)
            ):
                on_date = flight.dates[date]
                found.append(
                    DirectFlight(
                        flight_number=flight.flight_number,
                        origin=flight.origin,
                        destination=flight.destination,
                        status="available",
                        scheduled_departure_time_est=flight.scheduled_departure_time_est,
                        scheduled_arrival_time_est=flight.scheduled_arrival_time_est,
                        available_seats=on_date.available_seats,  # type: ignore[union-attr]
                        prices=on_date.prices,  # type: ignore[union-attr]
                    )
                )
        return found

    def _charge_for_update(self, user: User, payment_id: str, total_price: int) -> Payment | None:
        """Check and take a payment for a change; None when nothing is owed."""
        if payment_id not in user.payment_methods:
            raise ValueError("Payment method not found")
        method = user.payment_methods[payment_id]
        if method.source == "certificate":
            raise ValueError("Certificate cannot be used to update reservation")
        if method.source == "gift_card" and method.amount < total_price:
            raise ValueError("Gift card balance is not enough")
        if method.source == "gift_card":
            method.amount -= total_price
        if total_price != 0:
            return Payment(payment_id=payment_id, amount=total_price)
        return None

    # --- tools, in tau2's order

    @tool(mutates=True)
    def book_reservation(
        self,
        user_id: str,
        origin: str,
        destination: str,
        flight_type: str,
        cabin: str,
        flights: list[Any],
        passengers: list[Any],
        payment_methods: list[Any],
        total_baggages: int,
        nonfree_baggages: int,
        insurance: str,
    ) -> Reservation:
        flights = _as_models(flights, FlightInfo)
        passengers = _as_models(passengers, Passenger)
        payment_methods = _as_models(payment_methods, Payment)
        user = self._user(user_id)
        reservation_id = self._new_reservation_id()
        reservation = Reservation(
            reservation_id=reservation_id,
            user_id=user_id,
            origin=origin,
            destination=destination,
            flight_type=flight_type,  # type: ignore[arg-type]  # validated by the model
            cabin=cabin,  # type: ignore[arg-type]
            flights=[],
            passengers=deepcopy(passengers),
            payment_history=deepcopy(payment_methods),
            created_at=NOW,
            total_baggages=total_baggages,
            nonfree_baggages=nonfree_baggages,
            insurance=insurance,  # type: ignore[arg-type]
        )
        total_price = 0
        taken: list[FlightDateStatusAvailable] = []
        for info in flights:
            flight = self._flight(info.flight_number)
            on_date = self._flight_on(info.flight_number, info.date)
            if not isinstance(on_date, FlightDateStatusAvailable):
                raise ValueError(f"Flight {info.flight_number} not available on date {info.date}")
            if on_date.available_seats[cabin] < len(passengers):  # type: ignore[index]
                raise ValueError(f"Not enough seats on flight {info.flight_number}")
            price = on_date.prices[cabin]  # type: ignore[index]
            reservation.flights.append(
                ReservationFlight(
                    origin=flight.origin,
                    destination=flight.destination,
                    flight_number=info.flight_number,
                    date=info.date,
                    price=price,
                )
            )
            taken.append(on_date)
            total_price += price * len(passengers)
        if insurance == "yes":
            total_price += 30 * len(passengers)
        total_price += 50 * nonfree_baggages
        for payment in payment_methods:
            if payment.payment_id not in user.payment_methods:
                raise ValueError(f"Payment method {payment.payment_id} not found")
            method = user.payment_methods[payment.payment_id]
            if method.source in {"gift_card", "certificate"} and method.amount < payment.amount:
                raise ValueError(f"Not enough balance in payment method {payment.payment_id}")
        total_payment = sum(payment.amount for payment in payment_methods)
        if total_payment != total_price:
            raise ValueError(f"Payment amount does not add up, total price is {total_price}, but paid {total_payment}")
        for payment in payment_methods:
            method = user.payment_methods[payment.payment_id]
            if method.source == "gift_card":
                method.amount -= payment.amount
            elif method.source == "certificate":
                user.payment_methods.pop(payment.payment_id)  # a certificate is used up whole
        for on_date in taken:
            on_date.available_seats[cabin] -= len(passengers)  # type: ignore[index]
        self.db.reservations[reservation_id] = reservation
        self.db.users[user_id].reservations.append(reservation_id)
        return reservation

    @tool(mutates=False)
    def calculate(self, expression: str) -> str:
        return evaluate_expression(expression)

    @tool(mutates=True)
    def cancel_reservation(self, reservation_id: str) -> Reservation:
        reservation = self._reservation(reservation_id)
        refunds = [Payment(payment_id=p.payment_id, amount=-p.amount) for p in reservation.payment_history]
        reservation.payment_history.extend(refunds)
        reservation.status = "cancelled"
        return reservation  # seats are not released, as in tau2

    @tool(mutates=False)
    def get_reservation_details(self, reservation_id: str) -> Reservation:
        return self._reservation(reservation_id)

    @tool(mutates=False)
    def get_user_details(self, user_id: str) -> User:
        return self._user(user_id)

    @tool(mutates=False)
    def list_all_airports(self) -> list[AirportCode]:
        return [AirportCode(iata=iata, city=city) for iata, city in AIRPORTS]

    @tool(mutates=False)
    def search_direct_flight(self, origin: str, destination: str, date: str) -> list[DirectFlight]:
        return self._direct_flights(date=date, origin=origin, destination=destination)

    @tool(mutates=False)
    def search_onestop_flight(self, origin: str, destination: str, date: str) -> list[list[DirectFlight]]:
        pairs = []
        for first in self._direct_flights(date=date, origin=origin, destination=None):
            first.date = date
            next_date = f"2024-05-{int(date[-2:]) + 1}" if "+1" in first.scheduled_arrival_time_est else date
            for second in self._direct_flights(
                date=next_date,
                origin=first.destination,
                destination=destination,
                leave_after=first.scheduled_arrival_time_est,
            ):
                second.date = next_date
                pairs.append([first, second])
        return pairs

    @tool(mutates=True)
    def send_certificate(self, user_id: str, amount: int) -> str:
        user = self._user(user_id)
        for number in NEW_CERTIFICATE_NUMBERS:
            payment_id = f"certificate_{number}"
            if payment_id not in user.payment_methods:
                user.payment_methods[payment_id] = Certificate(id=payment_id, amount=amount, source="certificate")
                return f"Certificate {payment_id} added to user {user_id} with amount {amount}."
        raise ValueError("Too many certificates")

    @tool(mutates=False)
    def transfer_to_human_agents(self, summary: str) -> str:
        return "Transfer successful"

    @tool(mutates=True)
    def update_reservation_baggages(
        self, reservation_id: str, total_baggages: int, nonfree_baggages: int, payment_id: str
    ) -> Reservation:
        reservation = self._reservation(reservation_id)
        user = self._user(reservation.user_id)
        total_price = 50 * max(0, nonfree_baggages - reservation.nonfree_baggages)
        payment = self._charge_for_update(user, payment_id, total_price)
        if payment is not None:
            reservation.payment_history.append(payment)
        reservation.total_baggages = total_baggages
        reservation.nonfree_baggages = nonfree_baggages
        return reservation

    @tool(mutates=True)
    def update_reservation_flights(
        self, reservation_id: str, cabin: str, flights: list[Any], payment_id: str
    ) -> Reservation:
        flights = _as_models(flights, FlightInfo)
        reservation = self._reservation(reservation_id)
        user = self._user(reservation.user_id)
        travellers = len(reservation.passengers)
        total_price = 0
        new_flights: list[ReservationFlight] = []
        for info in flights:
            kept = next(
                (
                    booked
                    for booked in reservation.flights
                    if booked.flight_number == info.flight_number
                    and booked.date == info.date
                    and cabin == reservation.cabin
                ),
                None,
            )
            if kept:
                total_price += kept.price * travellers
                new_flights.append(kept)
                continue
            flight = self._flight(info.flight_number)
            on_date = self._flight_on(info.flight_number, info.date)
            if not isinstance(on_date, FlightDateStatusAvailable):
                raise ValueError(f"Flight {info.flight_number} not available on date {info.date}")
            if on_date.available_seats[cabin] < travellers:  # type: ignore[index]
                raise ValueError(f"Not enough seats on flight {info.flight_number}")
            booked = ReservationFlight(
                flight_number=info.flight_number,
                date=info.date,
                price=on_date.prices[cabin],  # type: ignore[index]
                origin=flight.origin,
                destination=flight.destination,
            )
            total_price += booked.price * travellers
            new_flights.append(booked)
        total_price -= sum(booked.price for booked in reservation.flights) * travellers
        payment = self._charge_for_update(user, payment_id, total_price)
        if payment is not None:
            reservation.payment_history.append(payment)
        reservation.flights = new_flights
        reservation.cabin = cabin  # type: ignore[assignment]  # tau2 assigns without validation
        return reservation

    @tool(mutates=True)
    def update_reservation_passengers(self, reservation_id: str, passengers: list[Any]) -> Reservation:
        passengers = _as_models(passengers, Passenger)
        reservation = self._reservation(reservation_id)
        if len(passengers) != len(reservation.passengers):
            raise ValueError("Number of passengers does not match")
        reservation.passengers = deepcopy(passengers)
        return reservation

    @tool(mutates=False)
    def get_flight_status(self, flight_number: str, date: str) -> str:
        return self._flight_on(flight_number, date).status
