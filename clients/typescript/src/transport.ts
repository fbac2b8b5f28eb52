// What the live stream needs from a client: a ticket, and `fetch` with the client's
// credentials. `NotifyClient` implements it; the stream names only this, so `stream.ts` does
// not import `client.ts`, which imports the stream to open it.

import type { components } from "./generated/openapi.js";

export interface StreamTransport {
  /** A single-use ticket for one stream connection. */
  createTicket(): Promise<components["schemas"]["Ticket"]>;
  /** `fetch` with the client's credentials (cookie or bearer header). */
  send(path: string, init: RequestInit & { headers?: Record<string, string> }): Promise<Response>;
}
