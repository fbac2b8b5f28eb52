"""The default routing rules, in Python (componentize-py): the same decisions as
`plugins/examples/default-router`, checked against it by the conformance table in
`tests/conformance/routing.json`.

- `order_paid` -> an in-app "Payment received" (category `billing`) and, when `email` is
  given, an `order_paid` email whose data is the event data plus `event_id`.
- `order_status_updated` -> an `order.updated` live update, a status-aware in-app item
  (category `shipping`) and, for `shipped` and `cancelled` when `email` is given, an
  `order_status_updated` email.
- Tenant setting `emails = "off"` (`[tenants.<id>.config]`): no emails, the rest unchanged.

Every other event type is acknowledged with no deliveries. A payload that lacks a field or
has it in the wrong shape is refused as an invalid event, naming the field.

Build: `scripts/build-plugins.sh` (or see plugins/examples/python-router/README.md).
"""

import json
from typing import Any, Dict, List, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Delivery,
    Delivery_Email,
    Delivery_InApp,
    Delivery_Live,
    Email,
    Event,
    InApp,
    LiveUpdate,
    RouteError_InvalidEvent,
)

# ISO 4217 currencies without minor units (the common ones), and the three-decimal ones.
NO_DECIMALS = {"JPY", "KRW", "ISK", "CLP", "VND", "UGX", "PYG", "XAF", "XOF"}
THREE_DECIMALS = {"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"}

STATUS_TEXT = {
    "processing": ("Order {} is being processed", "We are preparing your order {}."),
    "shipped": ("Order {} shipped", "Your order {} is on its way."),
    "delivered": ("Order {} delivered", "Your order {} has been delivered."),
    "cancelled": ("Order {} cancelled", "Your order {} has been cancelled."),
}


class Invalid(Exception):
    """A payload the rules cannot use: the event is refused as invalid."""


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class Data:
    """The event's payload, with accessors that name the field when it is wrong. Missing
    and `null` are alike absent; an empty string is absent too."""

    def __init__(self, text: str) -> None:
        try:
            value = json.loads(text)
        except ValueError as e:
            raise Invalid(f"data is not valid JSON: {e}")
        if not isinstance(value, dict):
            raise Invalid(f"data must be a JSON object (got {type_name(value)})")
        self.fields: Dict[str, Any] = value

    def get(self, field: str) -> Any:
        return self.fields.get(field)

    def str(self, field: str) -> str:
        value = self.opt_str(field)
        if value is None:
            raise Invalid(f"data.{field} is required (string)")
        return value

    def opt_str(self, field: str) -> Optional[str]:
        value = self.get(field)
        if value is None:
            return None
        if not isinstance(value, str):
            raise Invalid(f"data.{field} must be a string (got {type_name(value)})")
        return value or None

    def number(self, field: str) -> float:
        value = self.get(field)
        if value is None:
            raise Invalid(f"data.{field} is required (number)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"data.{field} must be a number (got {type_name(value)})")
        return float(value)

    def email_model(self, event: Event) -> str:
        return json.dumps({**self.fields, "event_id": event.id})


def format_amount(amount: float, currency: str) -> str:
    decimals = 0 if currency in NO_DECIMALS else 3 if currency in THREE_DECIMALS else 2
    return f"{amount:.{decimals}f} {currency}"


def emails_enabled() -> bool:
    return host.config("emails") != "off"


def email(to: str, user_id: str, template: str, data: Data, event: Event) -> Delivery:
    return Delivery_Email(
        Email(
            to=to,
            user_id=user_id,
            template=template,
            data=data.email_model(event),
            locale=data.opt_str("locale"),
            time_zone=data.opt_str("time_zone"),
        )
    )


def order_paid(event: Event, data: Data) -> List[Delivery]:
    user_id = data.str("user_id")
    order_id = data.str("order_id")
    amount = data.number("amount")
    currency = data.str("currency")
    to = data.opt_str("email")
    deliveries: List[Delivery] = [
        Delivery_InApp(
            InApp(
                user_id=user_id,
                title="Payment received",
                body=f"We received your payment of {format_amount(amount, currency)} for order {order_id}.",
                category="billing",
                data=json.dumps({"order_id": order_id}),
            )
        )
    ]
    if to is not None and emails_enabled():
        deliveries.append(email(to, user_id, "order_paid", data, event))
    return deliveries


def order_status_updated(event: Event, data: Data) -> List[Delivery]:
    user_id = data.str("user_id")
    order_id = data.str("order_id")
    status = data.str("status")
    previous = data.opt_str("previous_status")
    tracking_url = data.opt_str("tracking_url")
    to = data.opt_str("email")

    live: Dict[str, Any] = {"order_id": order_id, "status": status}
    if previous is not None:
        live["previous_status"] = previous
    title, body = STATUS_TEXT.get(status, ("Order {} updated", ""))
    title = title.format(order_id)
    if status in STATUS_TEXT:
        body = body.format(order_id)
    else:
        body = f"Your order {order_id} is now {status.replace('_', ' ')}."
    in_app_data: Dict[str, Any] = {"order_id": order_id, "status": status}
    if tracking_url is not None:
        body += f" Track it at {tracking_url}"
        in_app_data["tracking_url"] = tracking_url

    deliveries: List[Delivery] = [
        Delivery_Live(LiveUpdate(user_id=user_id, name="order.updated", data=json.dumps(live))),
        Delivery_InApp(
            InApp(
                user_id=user_id,
                title=title,
                body=body,
                category="shipping",
                data=json.dumps(in_app_data),
            )
        ),
    ]
    if to is not None and status in ("shipped", "cancelled") and emails_enabled():
        deliveries.append(email(to, user_id, "order_status_updated", data, event))
    return deliveries


RULES = {"order_paid": order_paid, "order_status_updated": order_status_updated}


class Router(exports.Router):
    def route(self, event: Event) -> List[Delivery]:
        rule = RULES.get(event.event_type)
        if rule is None:
            host.log(host.LogLevel.DEBUG, f"python router: no rule for event type {event.event_type!r}")
            return []
        try:
            return rule(event, Data(event.data))
        except Invalid as e:
            raise Err(RouteError_InvalidEvent(str(e)))
