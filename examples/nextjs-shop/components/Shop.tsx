"use client";
import { useEffect, useState } from "react";
import { signOut } from "@/app/actions";
import { useInbox } from "@/lib/useInbox";
import { Bell } from "./Bell";
import { NotificationCentre } from "./NotificationCentre";
import { OrderRow } from "./OrderRow";
import { Toasts } from "./Toasts";

export function Shop({ engineUrl, who }: { engineUrl: string; who: string }) {
  // A refused session (a 401: expired, rotated key, signed out elsewhere) signs out once and
  // lands on the sign-in, instead of reloading into the same refusal.
  const inbox = useInbox(engineUrl, () => void signOut());
  // The cookie is shared by every tab: when another tab signs in as someone else, this one's
  // next connection would speak for them. Tabs announce who they are; a tab that hears of
  // another user reloads (and shows that user, or the sign-in).
  useEffect(() => {
    const channel = new BroadcastChannel("notify-shop-session");
    channel.onmessage = (e) => {
      if (e.data !== who) window.location.reload();
    };
    channel.postMessage(who);
    return () => channel.close();
  }, [who]);
  const [open, setOpen] = useState(true);
  // Re-render now and then so highlights fade.
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(t);
  }, []);
  return (
    <div className="shop">
      <div className="bar">
        <span className={`conn conn-${inbox.status}`} data-testid="connection">
          {inbox.status === "open" ? "live" : inbox.status === "reconnecting" ? "reconnecting…" : inbox.status}
        </span>
        <Bell unread={inbox.unread} onClick={() => setOpen((o) => !o)} />
      </div>
      <main className="content">
        <section>
          <h1>Your orders</h1>
          <table className="orders">
            <thead>
              <tr>
                <th>Order</th>
                <th>Status</th>
              </tr>
            </thead>
            <tbody>
              {inbox.orders.map((o) => (
                <OrderRow key={o.id} order={o} now={now} />
              ))}
            </tbody>
          </table>
          {inbox.orders.length === 0 && <p className="empty">No orders yet.</p>}
        </section>
        {open && <NotificationCentre client={inbox.client} items={inbox.items} />}
      </main>
      <Toasts toasts={inbox.toasts} onDismiss={inbox.dismiss} />
    </div>
  );
}
