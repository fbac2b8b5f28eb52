"use client";

export function Bell({ unread, onClick }: { unread: number; onClick(): void }) {
  return (
    <button className="bell" onClick={onClick} aria-label={`Notifications, ${unread} unread`} data-testid="bell">
      <svg aria-hidden width="24" height="24" viewBox="0 0 24 24" fill="currentColor">
        <path d="M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22zm7-6V11a7 7 0 0 0-5.5-6.84V3.5a1.5 1.5 0 0 0-3 0v.66A7 7 0 0 0 5 11v5l-2 2v1h18v-1l-2-2z" />
      </svg>
      {unread > 0 && (
        <span className="badge" data-testid="badge">
          {unread > 99 ? "99+" : unread}
        </span>
      )}
    </button>
  );
}
