// The default routing rules, in JavaScript (componentize-js): the same decisions as
// `plugins/examples/default-router`, checked against it by the conformance table in
// `tests/conformance/routing.json`.
//
// - `order_paid` → an in-app "Payment received" (category `billing`) and, when `email` is
//   given, an `order_paid` email whose data is the event data plus `event_id`.
// - `order_status_updated` → an `order.updated` live update, a status-aware in-app item
//   (category `shipping`) and, for `shipped` and `cancelled` when `email` is given, an
//   `order_status_updated` email.
// - Tenant setting `emails = "off"` (`[tenants.<id>.config]`): no emails, the rest unchanged.
//
// Every other event type is acknowledged with no deliveries. A payload that lacks a field or
// has it in the wrong shape is refused as an invalid event, naming the field.
//
// Build: `scripts/build-plugins.sh` (or see plugins/examples/js-router/README.md).
import { config, log } from "notify:plugin/host@0.2.0";

// ISO 4217 currencies without minor units (the common ones), and the three-decimal ones.
const NO_DECIMALS = new Set(["JPY", "KRW", "ISK", "CLP", "VND", "UGX", "PYG", "XAF", "XOF"]);
const THREE_DECIMALS = new Set(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"]);

const STATUS_TEXT = {
  processing: [(o) => `Order ${o} is being processed`, (o) => `We are preparing your order ${o}.`],
  shipped: [(o) => `Order ${o} shipped`, (o) => `Your order ${o} is on its way.`],
  delivered: [(o) => `Order ${o} delivered`, (o) => `Your order ${o} has been delivered.`],
  cancelled: [(o) => `Order ${o} cancelled`, (o) => `Your order ${o} has been cancelled.`],
};

/** A payload the rules cannot use: the event is refused as invalid. */
class Invalid extends Error {}

function typeName(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  return typeof value === "object" ? "object" : typeof value;
}

/** The event's payload, with accessors that name the field when it is wrong. Missing and
 * `null` are alike absent; an empty string is absent too. */
class Data {
  constructor(text) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new Invalid(`data is not valid JSON: ${e.message}`);
    }
    if (typeName(value) !== "object") {
      throw new Invalid(`data must be a JSON object (got ${typeName(value)})`);
    }
    this.fields = value;
  }

  get(field) {
    return Object.hasOwn(this.fields, field) ? this.fields[field] ?? null : null;
  }

  str(field) {
    const value = this.optStr(field);
    if (value === null) throw new Invalid(`data.${field} is required (string)`);
    return value;
  }

  optStr(field) {
    const value = this.get(field);
    if (value === null) return null;
    if (typeof value !== "string") {
      throw new Invalid(`data.${field} must be a string (got ${typeName(value)})`);
    }
    return value === "" ? null : value;
  }

  number(field) {
    const value = this.get(field);
    if (value === null) throw new Invalid(`data.${field} is required (number)`);
    if (typeof value !== "number") {
      throw new Invalid(`data.${field} must be a number (got ${typeName(value)})`);
    }
    return value;
  }

  emailModel(event) {
    return JSON.stringify({ ...this.fields, event_id: event.id });
  }
}

function formatAmount(amount, currency) {
  const decimals = NO_DECIMALS.has(currency) ? 0 : THREE_DECIMALS.has(currency) ? 3 : 2;
  return `${amount.toFixed(decimals)} ${currency}`;
}

const emailsEnabled = () => config("emails") !== "off";

function email(to, userId, template, data, event) {
  return {
    tag: "email",
    val: {
      to,
      userId,
      template,
      data: data.emailModel(event),
      locale: data.optStr("locale") ?? undefined,
      timeZone: data.optStr("time_zone") ?? undefined,
    },
  };
}

function orderPaid(event, data) {
  const userId = data.str("user_id");
  const orderId = data.str("order_id");
  const amount = data.number("amount");
  const currency = data.str("currency");
  const to = data.optStr("email");
  const deliveries = [
    {
      tag: "in-app",
      val: {
        userId,
        title: "Payment received",
        body: `We received your payment of ${formatAmount(amount, currency)} for order ${orderId}.`,
        category: "billing",
        data: JSON.stringify({ order_id: orderId }),
      },
    },
  ];
  if (to !== null && emailsEnabled()) deliveries.push(email(to, userId, "order_paid", data, event));
  return deliveries;
}

function orderStatusUpdated(event, data) {
  const userId = data.str("user_id");
  const orderId = data.str("order_id");
  const status = data.str("status");
  const previous = data.optStr("previous_status");
  const trackingUrl = data.optStr("tracking_url");
  const to = data.optStr("email");

  const live = { order_id: orderId, status };
  if (previous !== null) live.previous_status = previous;
  const text = STATUS_TEXT[status];
  const title = text ? text[0](orderId) : `Order ${orderId} updated`;
  let body = text ? text[1](orderId) : `Your order ${orderId} is now ${status.replaceAll("_", " ")}.`;
  const inAppData = { order_id: orderId, status };
  if (trackingUrl !== null) {
    body += ` Track it at ${trackingUrl}`;
    inAppData.tracking_url = trackingUrl;
  }
  const deliveries = [
    { tag: "live", val: { userId, name: "order.updated", data: JSON.stringify(live) } },
    {
      tag: "in-app",
      val: { userId, title, body, category: "shipping", data: JSON.stringify(inAppData) },
    },
  ];
  if (to !== null && (status === "shipped" || status === "cancelled") && emailsEnabled()) {
    deliveries.push(email(to, userId, "order_status_updated", data, event));
  }
  return deliveries;
}

const RULES = { order_paid: orderPaid, order_status_updated: orderStatusUpdated };

export const router = {
  route(event) {
    const rule = Object.hasOwn(RULES, event.eventType) ? RULES[event.eventType] : undefined;
    if (!rule) {
      log("debug", `js router: no rule for event type ${JSON.stringify(event.eventType)}`);
      return [];
    }
    try {
      return rule(event, new Data(event.data));
    } catch (e) {
      // A thrown variant value is the `route-error`: the event is refused, naming the field.
      if (e instanceof Invalid) throw { tag: "invalid-event", val: e.message };
      throw e;
    }
  },
};
