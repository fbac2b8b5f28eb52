// The live stream: `GET /api/v1/sse` read with `fetch` (in browsers and in Node), typed
// events, and reconnection that loses nothing.
//
// Every frame carries the user's sequence number as its id. The stream remembers the last
// one and reconnects with it (the `Last-Event-ID` header, or `last_event_id` beside a fresh
// ticket), so the engine replays exactly what was missed; frames at or below that id are
// dropped, so nothing is delivered twice. Reconnects back off exponentially with jitter;
// a `Retry-After` (on the stream or on its ticket request) is honoured, never undercut, and
// jittered too, so clients refused together do not all return in the same second; an
// `auth.expired` frame makes the stream reconnect at once with fresh credentials.

import type {
  AuthExpiredEvent,
  LiveUpdateEvent,
  NotificationArchivedEvent,
  NotificationEvent,
  NotificationReadEvent,
} from "./generated/events.js";
import { NotifyApiError, apiError } from "./errors.js";
import { SseParser, type SseFrame } from "./sse.js";
import type { StreamTransport } from "./transport.js";

/** The engine's events by name; any other name is a live update a routing plugin chose. */
export interface StreamEventMap {
  notification: NotificationEvent;
  "notification.read": NotificationReadEvent;
  "notification.archived": NotificationArchivedEvent;
  "auth.expired": AuthExpiredEvent;
  "order.updated": LiveUpdateEvent;
}

export type StreamStatus = "connecting" | "open" | "reconnecting" | "closed";

export interface StreamOptions {
  /**
   * `ticket` (default): each connection first asks for a single-use ticket with the client's
   * credentials, then opens `?ticket=`: works across origins without third-party cookies.
   * `direct`: the stream request itself carries the cookie or the bearer header.
   */
  mode?: "ticket" | "direct";
  /** Resume after this id (e.g. kept from a previous page load). */
  lastEventId?: string;
  /** Reconnection delays: `initialMs` (250) doubling up to `maxMs` (10 000), jittered. */
  backoff?: { initialMs?: number; maxMs?: number };
}

export interface EventMeta {
  /** The frame's id: the user's sequence number. */
  id: string | null;
}

type Handler = (data: never, meta: EventMeta) => void;

export class NotifyStream {
  private readonly handlers = new Map<string, Set<Handler>>();
  private readonly statusHandlers = new Set<(status: StreamStatus) => void>();
  private readonly errorHandlers = new Set<(error: Error) => void>();
  private readonly abort = new AbortController();
  private lastId: string | null;
  private current: StreamStatus = "connecting";

  constructor(
    private readonly client: StreamTransport,
    private readonly options: StreamOptions,
  ) {
    this.lastId = options.lastEventId ?? null;
    // Started on the next tick, so handlers registered right after construction see all.
    queueMicrotask(() => void this.run());
  }

  /** The last id received: keep it to resume in a later session. */
  get lastEventId(): string | null {
    return this.lastId;
  }

  get status(): StreamStatus {
    return this.current;
  }

  on<K extends keyof StreamEventMap>(
    event: K,
    handler: (data: StreamEventMap[K], meta: EventMeta) => void,
  ): () => void;
  on(event: string, handler: (data: LiveUpdateEvent, meta: EventMeta) => void): () => void;
  on(event: string, handler: (data: never, meta: EventMeta) => void): () => void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => set.delete(handler);
  }

  onStatus(handler: (status: StreamStatus) => void): () => void {
    this.statusHandlers.add(handler);
    return () => this.statusHandlers.delete(handler);
  }

  /** Connection trouble (the stream keeps retrying until closed). */
  onError(handler: (error: Error) => void): () => void {
    this.errorHandlers.add(handler);
    return () => this.errorHandlers.delete(handler);
  }

  close(): void {
    this.abort.abort();
    this.setStatus("closed");
  }

  private get closed(): boolean {
    return this.abort.signal.aborted;
  }

  private async run(): Promise<void> {
    let failures = 0;
    let opened = false;
    while (!this.closed) {
      this.setStatus(opened ? "reconnecting" : "connecting");
      let wait: number;
      // One controller per connection (linked to close()), so no listener outlives it.
      const connection = new AbortController();
      const abort = () => connection.abort();
      this.abort.signal.addEventListener("abort", abort);
      try {
        const response = await this.connect(connection.signal);
        if (!response.ok) {
          const error = await apiError(response);
          this.emitError(error);
          wait = this.waitAfter(error, failures++);
          if (response.status === 400) this.lastId = null;
        } else {
          opened = true;
          this.setStatus("open");
          const { ending, delivered } = await this.read(response);
          // A connection that delivered something was healthy: start the backoff afresh.
          if (delivered > 0) failures = 0;
          // Expired credentials: new ones at once, unless nothing came through (a token
          // already past its time keeps expiring: back off). Otherwise the server went away.
          wait = ending === "expired" && delivered > 0 ? 0 : this.backoff(failures++);
        }
      } catch (error) {
        if (this.closed) break;
        this.emitError(error instanceof Error ? error : new Error(String(error)));
        // A refused ticket request counts as a refused stream: its Retry-After, its 401.
        wait = error instanceof NotifyApiError ? this.waitAfter(error, failures++) : this.backoff(failures++);
      } finally {
        this.abort.signal.removeEventListener("abort", abort);
        connection.abort();
      }
      if (!this.closed && wait > 0) await sleep(wait, this.abort.signal);
    }
    this.setStatus("closed");
  }

  private async connect(signal: AbortSignal): Promise<Response> {
    const headers: Record<string, string> = { Accept: "text/event-stream" };
    if ((this.options.mode ?? "ticket") === "ticket") {
      const ticket = await this.client.createTicket();
      let path = ticket.url;
      if (this.lastId !== null) path += `&last_event_id=${encodeURIComponent(this.lastId)}`;
      return this.client.send(path, { headers, signal });
    }
    if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
    return this.client.send("/api/v1/sse", { headers, signal });
  }

  /** Reads frames until the response ends (`expired` after an `auth.expired` frame), and
   *  counts the frames delivered. */
  private async read(response: Response): Promise<{ ending: "ended" | "expired"; delivered: number }> {
    if (!response.body) throw new NotifyApiError(response.status, "no_body", "the stream has no body");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let expired = false;
    let delivered = 0;
    const parser = new SseParser({
      frame: (frame) => {
        if (frame.event === "auth.expired") {
          expired = true;
          this.dispatch(frame);
          return;
        }
        // Already delivered (ids only grow per user): never twice.
        if (frame.id !== null && this.lastId !== null && Number(frame.id) <= Number(this.lastId)) {
          return;
        }
        if (frame.id !== null) this.lastId = frame.id;
        delivered++;
        this.dispatch(frame);
      },
      id: (id) => {
        // The engine's first frame (a comment) carries the position the stream starts from:
        // it is authoritative, even below ours (the engine's database was reset, and its ids
        // start again; keeping ours would hide every new event up to it).
        this.lastId = id;
      },
    });
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(value);
        if (expired) break;
      }
    } finally {
      reader.cancel().catch(() => {});
    }
    return { ending: expired ? "expired" : "ended", delivered };
  }

  private dispatch(frame: SseFrame): void {
    const handlers = this.handlers.get(frame.event);
    if (!handlers?.size) return;
    let data: unknown;
    try {
      data = JSON.parse(frame.data);
    } catch {
      this.emitError(new Error(`event ${frame.event} ${frame.id ?? ""} has data that is not JSON`));
      return;
    }
    for (const handler of handlers) {
      try {
        handler(data as never, { id: frame.id });
      } catch (error) {
        this.emitError(error instanceof Error ? error : new Error(String(error)));
      }
    }
  }

  /** How long to wait after the engine refused a connection (or its ticket) with `error`:
   *  at least its `Retry-After` plus up to half again (jitter), and at least the backoff;
   *  refused credentials (401, 403) do not fix themselves quickly, so those wait the longest
   *  backoff (the app may sign in again meanwhile; onError tells it). */
  private waitAfter(error: NotifyApiError, failures: number): number {
    const permanent = error.status === 401 || error.status === 403;
    const backoff = this.backoff(permanent ? Math.max(failures, 16) : failures);
    if (error.retryAfterMs === null) return backoff;
    return Math.max(backoff, jitterRetryAfter(error.retryAfterMs));
  }

  private backoff(failures: number): number {
    const initial = this.options.backoff?.initialMs ?? 250;
    const max = this.options.backoff?.maxMs ?? 10_000;
    const delay = Math.min(max, initial * 2 ** Math.min(failures, 16));
    return delay / 2 + Math.random() * (delay / 2);
  }

  private setStatus(status: StreamStatus): void {
    if (this.current === status) return;
    this.current = status;
    for (const handler of this.statusHandlers) handler(status);
  }

  private emitError(error: Error): void {
    for (const handler of this.errorHandlers) handler(error);
  }
}

/** `Retry-After` plus a random 0–50 % of it: never earlier than the engine asked, and
 *  clients it refused together come back spread over half as long again. */
export function jitterRetryAfter(ms: number, random: () => number = Math.random): number {
  return ms + random() * ms * 0.5;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
}
