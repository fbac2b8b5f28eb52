"use client";
import type { Order } from "@/lib/useInbox";

/** Changed within this long: highlighted. */
export const FRESH_MS = 3000;

export function OrderRow({ order, now = Date.now() }: { order: Order; now?: number }) {
  const fresh = now - order.changedAt < FRESH_MS;
  return (
    <tr className={fresh ? "order fresh" : "order"} data-testid={`order-${order.id}`}>
      <td>{order.id}</td>
      <td>
        <span className={`status status-${order.status}`} data-testid="status">
          {order.status.replace(/_/g, " ")}
        </span>
      </td>
    </tr>
  );
}
