"use client";
import type { Notification, NotifyClient } from "@notify-engine/client";

export function NotificationCentre({ client, items }: { client: NotifyClient; items: Notification[] }) {
  const newest = items[0]?.id;
  return (
    <aside className="centre" data-testid="centre">
      <div className="centre-head">
        <h2>Notifications</h2>
        {newest !== undefined && (
          <button onClick={() => void client.markAllRead(newest)} data-testid="mark-all">
            Mark all read
          </button>
        )}
      </div>
      {items.length === 0 && <p className="empty">Nothing yet.</p>}
      <ul>
        {items.map((n) => (
          <li key={n.id} className={n.read_at ? "item read" : "item"} data-testid="item">
            <div>
              <strong>{n.title}</strong>
              <p>{n.body}</p>
            </div>
            <div className="actions">
              {!n.read_at && (
                <button onClick={() => void client.markRead(n.id)} data-testid="mark-read">
                  Mark read
                </button>
              )}
              <button onClick={() => void client.archive(n.id)} data-testid="archive">
                Archive
              </button>
            </div>
          </li>
        ))}
      </ul>
    </aside>
  );
}
