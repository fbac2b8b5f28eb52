"use client";
// The page's state: inbox items, the unread count, orders by id, toasts, and the connection
// status. The inbox list read when the stream first opens is the baseline; the stream's
// events come after it. Every change a user makes arrives back as an event (in every tab), so
// this state follows the events rather than the clicks.
import { useEffect, useMemo, useRef, useState } from "react";
import {
  NotifyClient,
  type Notification,
  type NotificationEvent,
  type StreamStatus,
} from "@notify-engine/client";
import { endSessionOnUnauthorized } from "./sessionEnd";

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

/** `onSessionEnd`: the engine refused the credentials (called once; e.g. sign out). */
export function useInbox(engineUrl: string, onSessionEnd: () => void): Inbox {
  const client = useMemo(() => new NotifyClient({ baseUrl: engineUrl, auth: { kind: "cookie" } }), [engineUrl]);
  const [items, setItems] = useState<Notification[]>([]);
  const [unread, setUnread] = useState(0);
  const [orders, setOrders] = useState<Map<string, Order>>(new Map());
  const [toasts, setToasts] = useState<Toast[]>([]);
  const [status, setStatus] = useState<StreamStatus>("connecting");
  const timers = useRef(new Set<ReturnType<typeof setTimeout>>());
  // The latest callback, without reopening the stream when it changes.
  const sessionEnd = useRef(onSessionEnd);
  useEffect(() => {
    sessionEnd.current = onSessionEnd;
  }, [onSessionEnd]);

  useEffect(() => {
    let cancelled = false;
    const setOrder = (id: string, orderStatus: string, changedAt: number) =>
      setOrders((prev) => {
        const next = new Map(prev);
        next.set(id, { id, status: orderStatus, changedAt });
        return next;
      });
    const toast = (n: NotificationEvent) => {
      const key = `${n.id}`;
      setToasts((prev) => [...prev, { key, title: n.title ?? "", body: n.body ?? "" }]);
      const timer = setTimeout(() => {
        timers.current.delete(timer);
        setToasts((prev) => prev.filter((t) => t.key !== key));
      }, TOAST_MS);
      timers.current.add(timer);
    };
    // Until the first list has been read, events wait here and are applied on top of it:
    // the list is the baseline, events are what came after.
    let pending: Array<() => void> | null = [];
    let listed = new Set<number>();
    const apply = (change: () => void) => (pending ? pending.push(change) : change());

    const stream = client.stream();
    const unsubscribe = stream.onStatus(setStatus);
    setStatus(stream.status);
    // The session ended (a 401): sign out once and show the sign-in, never a reload loop.
    endSessionOnUnauthorized(stream, () => sessionEnd.current());
    stream.on("notification", (n) =>
      apply(() => {
        // Already in the list (and so in its unread count): not again.
        if (listed.has(n.id)) return;
        listed.add(n.id);
        setItems((prev) => [fromEvent(n), ...prev]);
        if (!n.read && !n.archived) setUnread((u) => u + 1);
        const order = orderOf(fromEvent(n));
        if (order) setOrder(order.id, order.status, Date.now());
        toast(n);
      }),
    );
    stream.on("order.updated", (u) =>
      apply(() => {
        if (typeof u.order_id === "string" && typeof u.status === "string") {
          setOrder(u.order_id, u.status, Date.now());
        }
      }),
    );
    stream.on("notification.read", (r) =>
      apply(() => {
        const now = new Date().toISOString();
        setItems((prev) =>
          prev.map((n) =>
            !n.read_at && (r.ids.includes(n.id) || (r.up_to !== null && n.id <= r.up_to)) ? { ...n, read_at: now } : n,
          ),
        );
        setUnread(r.unread_count);
      }),
    );
    stream.on("notification.archived", (a) =>
      apply(() => {
        const now = new Date().toISOString();
        setItems((prev) => prev.map((n) => (n.id === a.id ? { ...n, archived_at: a.archived ? now : null } : n)));
        setUnread(a.unread_count);
      }),
    );
    // The list is read once the stream is open: everything after the stream's starting point
    // arrives as events, everything before it is in the list, and what is in both counts once.
    const loadOnce = stream.onStatus((status) => {
      if (status !== "open") return;
      loadOnce();
      void (async () => {
        try {
          const [page, count] = await Promise.all([client.list({ limit: 50 }), client.unreadCount()]);
          if (cancelled) return;
          listed = new Set(page.items.map((n) => n.id));
          setItems(page.items);
          setUnread(count);
          const initial = new Map<string, Order>();
          // Oldest first, so an order's newest status wins.
          for (const n of [...page.items].reverse()) {
            const order = orderOf(n);
            if (order) initial.set(order.id, { ...order, changedAt: 0 });
          }
          setOrders(initial);
        } catch {
          // Shown as it comes: the events still arrive.
        } finally {
          const queued = pending ?? [];
          pending = null;
          for (const change of queued) change();
        }
      })();
    });
    const pendingTimers = timers.current;
    return () => {
      cancelled = true;
      unsubscribe();
      loadOnce();
      stream.close();
      for (const t of pendingTimers) clearTimeout(t);
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
