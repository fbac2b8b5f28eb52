"use client";
// The page's state, kept by the client's stream: inbox items, the unread count, orders by id,
// toasts, and the connection status. Every change a user makes arrives back as an event
// (in every tab), so this state follows the events rather than the clicks.
import { useEffect, useMemo, useRef, useState } from "react";
import {
  NotifyClient,
  type Notification,
  type NotificationEvent,
  type StreamStatus,
} from "@notify-engine/client";

export interface Order {
  id: string;
  status: string;
  /** When it last changed, to highlight the row. */
  changedAt: number;
}

export interface Toast {
  key: string;
  title: string;
  body: string;
}

export interface Inbox {
  client: NotifyClient;
  items: Notification[];
  unread: number;
  orders: Order[];
  toasts: Toast[];
  status: StreamStatus;
  dismiss(key: string): void;
}

const TOAST_MS = 6000;

function fromEvent(n: NotificationEvent): Notification {
  return {
    id: n.id,
    event_id: n.event_id,
    title: n.title,
    body: n.body,
    category: n.category,
    data: n.data,
    created_at: n.created_at,
    read_at: n.read ? n.created_at : null,
    archived_at: n.archived ? n.created_at : null,
  };
}

function orderOf(n: Notification): { id: string; status: string } | null {
  const data = (n.data ?? {}) as Record<string, unknown>;
  if (typeof data.order_id !== "string") return null;
  const status = typeof data.status === "string" ? data.status : n.category === "billing" ? "paid" : "updated";
  return { id: data.order_id, status };
}

export function useInbox(engineUrl: string): Inbox {
  const client = useMemo(() => new NotifyClient({ baseUrl: engineUrl, auth: { kind: "cookie" } }), [engineUrl]);
  const [items, setItems] = useState<Notification[]>([]);
  const [unread, setUnread] = useState(0);
  const [orders, setOrders] = useState<Map<string, Order>>(new Map());
  const [toasts, setToasts] = useState<Toast[]>([]);
  const [status, setStatus] = useState<StreamStatus>("connecting");
  const timers = useRef(new Set<ReturnType<typeof setTimeout>>());

  useEffect(() => {
    let cancelled = false;
    const setOrder = (id: string, orderStatus: string, changedAt: number) =>
      setOrders((prev) => {
        const next = new Map(prev);
        next.set(id, { id, status: orderStatus, changedAt });
        return next;
      });
    // The stream opens first and replays from the position the list was read at, so
    // nothing falls between the two.
    const stream = client.stream();
    stream.onStatus(setStatus);
    stream.on("notification", (n) => {
      setItems((prev) => (prev.some((p) => p.id === n.id) ? prev : [fromEvent(n), ...prev]));
      if (!n.read && !n.archived) setUnread((u) => u + 1);
      const order = orderOf(fromEvent(n));
      if (order) setOrder(order.id, order.status, Date.now());
      const key = `${n.id}`;
      setToasts((prev) => [...prev, { key, title: n.title ?? "", body: n.body ?? "" }]);
      const timer = setTimeout(() => {
        timers.current.delete(timer);
        setToasts((prev) => prev.filter((t) => t.key !== key));
      }, TOAST_MS);
      timers.current.add(timer);
    });
    stream.on("order.updated", (u) => {
      if (typeof u.order_id === "string" && typeof u.status === "string") {
        setOrder(u.order_id, u.status, Date.now());
      }
    });
    stream.on("notification.read", (r) => {
      const now = new Date().toISOString();
      setItems((prev) =>
        prev.map((n) =>
          !n.read_at && (r.ids.includes(n.id) || (r.up_to !== null && n.id <= r.up_to)) ? { ...n, read_at: now } : n,
        ),
      );
      setUnread(r.unread_count);
    });
    stream.on("notification.archived", (a) => {
      const now = new Date().toISOString();
      setItems((prev) => prev.map((n) => (n.id === a.id ? { ...n, archived_at: a.archived ? now : null } : n)));
      setUnread(a.unread_count);
    });
    void (async () => {
      try {
        const [page, count] = await Promise.all([client.list({ limit: 50 }), client.unreadCount()]);
        if (cancelled) return;
        setItems((prev) => {
          const known = new Set(prev.map((p) => p.id));
          return [...prev, ...page.items.filter((n) => !known.has(n.id))].sort((a, b) => b.id - a.id);
        });
        setUnread(count);
        setOrders((prev) => {
          const next = new Map(prev);
          // Oldest first, so the newest status of an order wins; live ones already there win.
          for (const n of [...page.items].reverse()) {
            const order = orderOf(n);
            if (order && !prev.has(order.id)) next.set(order.id, { ...order, changedAt: 0 });
          }
          return next;
        });
      } catch {
        // The stream reports trouble; the list is read again on the next visit.
      }
    })();
    const pending = timers.current;
    return () => {
      cancelled = true;
      stream.close();
      for (const t of pending) clearTimeout(t);
    };
  }, [client]);

  return {
    client,
    items: items.filter((n) => !n.archived_at),
    unread,
    orders: [...orders.values()].sort((a, b) => b.id.localeCompare(a.id)),
    toasts,
    status,
    dismiss: (key) => setToasts((prev) => prev.filter((t) => t.key !== key)),
  };
}
