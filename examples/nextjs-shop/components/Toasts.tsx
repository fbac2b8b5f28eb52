"use client";
import type { Toast } from "@/lib/useInbox";

export function Toasts({ toasts, onDismiss }: { toasts: Toast[]; onDismiss(key: string): void }) {
  return (
    <div className="toasts" role="status" aria-live="polite">
      {toasts.map((t) => (
        <div key={t.key} className="toast" data-testid="toast">
          <strong>{t.title}</strong>
          {t.body && <p>{t.body}</p>}
          <button aria-label="Dismiss" onClick={() => onDismiss(t.key)}>
            ×
          </button>
        </div>
      ))}
    </div>
  );
}
