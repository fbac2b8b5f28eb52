// The inbox API and stream tickets over `fetch`, typed by the OpenAPI document.

import type { components, operations } from "./generated/openapi.js";
import { apiError } from "./errors.js";
import { NotifyStream, type StreamOptions } from "./stream.js";
import type { StreamTransport } from "./transport.js";

export type Notification = components["schemas"]["Notification"];
export type NotificationPage = components["schemas"]["NotificationPage"];
export type NotificationChanged = components["schemas"]["NotificationChanged"];
export type ReadAllResponse = components["schemas"]["ReadAllResponse"];
export type Ticket = components["schemas"]["Ticket"];
export type ListParams = NonNullable<operations["listNotifications"]["parameters"]["query"]>;

/**
 * How the client proves who it is. Never by putting a token in a URL.
 *
 * - `cookie`: the browser sends the engine's HttpOnly cookie (same site, or an origin in the
 *   engine's `http.cors_origins`); state-changing calls are sent as JSON, as the engine
 *   requires for cookie-authenticated requests.
 * - `bearer`: `Authorization: Bearer`, with a token from `token()` (called per request, so it
 *   may refresh); for servers, tools, and pages that hold a short-lived token.
 */
export type Auth = { kind: "cookie" } | { kind: "bearer"; token: () => string | Promise<string> };

export interface ClientOptions {
  /** The engine's public origin, e.g. `http://localhost:8080`; `""` for the page's own. */
  baseUrl: string;
  auth: Auth;
  /** Defaults to the global `fetch`. */
  fetch?: typeof fetch;
}

export class NotifyClient implements StreamTransport {
  private readonly fetchImpl: typeof fetch;

  constructor(readonly options: ClientOptions) {
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** The caller's inbox, newest first; pass `next_cursor` back as `cursor` for older items. */
  list(params: ListParams = {}): Promise<NotificationPage> {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== undefined) query.set(key, String(value));
    }
    const qs = query.toString();
    return this.request("GET", `/api/v1/notifications${qs ? `?${qs}` : ""}`);
  }

  async unreadCount(): Promise<number> {
    const body = await this.request<components["schemas"]["UnreadCount"]>(
      "GET",
      "/api/v1/notifications/unread-count",
    );
    return body.unread_count;
  }

  get(id: number): Promise<Notification> {
    return this.request("GET", `/api/v1/notifications/${id}`);
  }

  markRead(id: number): Promise<NotificationChanged> {
    return this.request("POST", `/api/v1/notifications/${id}/read`, {});
  }

  /** Marks read everything up to and including `upTo`: the newest id the user has seen. */
  markAllRead(upTo: number): Promise<ReadAllResponse> {
    return this.request("POST", "/api/v1/notifications/read-all", { up_to: upTo });
  }

  archive(id: number): Promise<NotificationChanged> {
    return this.request("POST", `/api/v1/notifications/${id}/archive`, {});
  }

  unarchive(id: number): Promise<NotificationChanged> {
    return this.request("POST", `/api/v1/notifications/${id}/unarchive`, {});
  }

  /** A single-use ticket for one stream connection. */
  createTicket(): Promise<Ticket> {
    return this.request("POST", "/api/v1/sse/tickets", {});
  }

  /** Opens the live stream (see {@link NotifyStream}); call `close()` to end it. */
  stream(options: StreamOptions = {}): NotifyStream {
    return new NotifyStream(this, options);
  }

  /** `fetch` with the client's credentials; used by the stream too. */
  async send(path: string, init: RequestInit & { headers?: Record<string, string> }): Promise<Response> {
    const headers: Record<string, string> = { ...init.headers };
    if (this.options.auth.kind === "bearer") {
      headers.Authorization = `Bearer ${await this.options.auth.token()}`;
    }
    return this.fetchImpl(`${this.options.baseUrl}${path}`, {
      ...init,
      headers,
      credentials: this.options.auth.kind === "cookie" ? "include" : "omit",
    });
  }

  private async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await this.send(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) throw await apiError(response);
    return (await response.json()) as T;
  }
}
