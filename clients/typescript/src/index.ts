// @notify-engine/client: the inbox API and the live stream of notify-engine, for browsers and
// Node. Types come from the engine's contracts (contracts/openapi.json and
// contracts/schemas/), generated into src/generated/.

export { NotifyClient } from "./client.js";
export type {
  Auth,
  ClientOptions,
  ListParams,
  Notification,
  NotificationChanged,
  NotificationPage,
  ReadAllResponse,
  Ticket,
} from "./client.js";
export { NotifyApiError, apiError, parseRetryAfter } from "./errors.js";
export { NotifyStream, jitterRetryAfter } from "./stream.js";
export type { EventMeta, StreamEventMap, StreamOptions, StreamStatus } from "./stream.js";
export { SseParser } from "./sse.js";
export type { SseFrame } from "./sse.js";
export type {
  AuthExpiredEvent,
  LiveUpdateEvent,
  NotificationArchivedEvent,
  NotificationEvent,
  NotificationReadEvent,
} from "./generated/events.js";
