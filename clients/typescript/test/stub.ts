// A stub engine: scripted SSE connections and the inbox routes, recording what it was sent.
import http from "node:http";
import type { AddressInfo } from "node:net";

export interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
  /** When it arrived (ms since the epoch). */
  at: number;
}

/** A scripted answer of the ticket route. */
export interface Refusal {
  status: number;
  headers?: Record<string, string>;
}

export type Script = (res: http.ServerResponse, req: Seen) => void | Promise<void>;

export class Stub {
  readonly seen: Seen[] = [];
  private tickets = 0;
  /** One script per stream connection, in order; the last repeats. */
  streams: Script[] = [];
  /** Refusals of the ticket route, in order; once used up, tickets are issued. */
  ticketRefusals: Refusal[] = [];
  private connections = 0;
  private server = http.createServer((req, res) => this.handle(req, res));

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  get ticketRequests(): Seen[] {
    return this.seen.filter((s) => s.url === "/api/v1/sse/tickets");
  }

  get streamRequests(): Seen[] {
    return this.seen.filter((s) => s.url.startsWith("/api/v1/sse") && !s.url.startsWith("/api/v1/sse/tickets"));
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      const seen = { method: req.method ?? "", url: req.url ?? "", headers: req.headers, body, at: Date.now() };
      this.seen.push(seen);
      const json = (status: number, value: unknown) => {
        res.writeHead(status, { "content-type": "application/json" });
        res.end(JSON.stringify(value));
      };
      const refusal = seen.url === "/api/v1/sse/tickets" ? this.ticketRefusals.shift() : undefined;
      if (refusal) {
        res.writeHead(refusal.status, { "content-type": "application/json", ...refusal.headers });
        res.end(JSON.stringify({ error: { code: "refused", message: `status ${refusal.status}` } }));
      } else if (seen.url === "/api/v1/sse/tickets") {
        this.tickets++;
        json(201, { ticket: `t${this.tickets}`, expires_in: 30, url: `/api/v1/sse?ticket=t${this.tickets}` });
      } else if (seen.url.startsWith("/api/v1/sse")) {
        const script = this.streams[Math.min(this.connections++, this.streams.length - 1)];
        void script?.(res, seen);
      } else if (seen.url === "/api/v1/notifications/unread-count") {
        json(200, { unread_count: 3 });
      } else if (seen.url === "/api/v1/notifications/404/read") {
        json(404, { error: { code: "not_found", message: "no such notification" } });
      } else if (seen.url.startsWith("/api/v1/notifications")) {
        json(200, { items: [], next_cursor: null, marked: 2, unread_count: 1 });
      } else {
        json(404, { error: { code: "not_found", message: "no such route" } });
      }
    });
  }
}

export function sse(res: http.ServerResponse, frames: string[], end = true): void {
  res.writeHead(200, { "content-type": "text/event-stream" });
  for (const f of frames) res.write(f);
  if (end) res.end();
}

export function notification(id: number, eventId = `e${id}`): string {
  const data = {
    id, event_id: eventId, title: "Payment received", body: "", category: "billing", data: {},
    created_at: "2026-11-27T10:00:00Z", read: false, archived: false,
  };
  return `id: ${id}\nevent: notification\ndata: ${JSON.stringify(data)}\n\n`;
}

export function waitFor(check: () => boolean, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const tick = () => {
      if (check()) return resolve();
      if (Date.now() > deadline) return reject(new Error("timed out waiting"));
      setTimeout(tick, 10);
    };
    tick();
  });
}
