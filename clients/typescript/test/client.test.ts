import { test } from "node:test";
import assert from "node:assert/strict";
import { NotifyApiError, NotifyClient, jitterRetryAfter, parseRetryAfter, type StreamStatus } from "../src/index.js";
import { Stub, notification, sse, waitFor } from "./stub.js";

const fast = { initialMs: 10, maxMs: 50 };

test("inbox calls: bearer per request, JSON bodies, typed errors", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  let n = 0;
  const client = new NotifyClient({ baseUrl, auth: { kind: "bearer", token: () => `tok${++n}` } });
  assert.equal(await client.unreadCount(), 3);
  await client.list({ unread: true, limit: 5, category: undefined });
  await client.markAllRead(41);
  await client.archive(7);
  await assert.rejects(client.markRead(404), (e: unknown) => {
    assert.ok(e instanceof NotifyApiError);
    assert.equal(e.status, 404);
    assert.equal(e.code, "not_found");
    return true;
  });
  const [count, list, readAll, archive] = stub.seen;
  assert.equal(count?.headers.authorization, "Bearer tok1");
  assert.equal(list?.url, "/api/v1/notifications?unread=true&limit=5");
  assert.equal(readAll?.headers["content-type"], "application/json");
  assert.equal(readAll?.body, '{"up_to":41}');
  assert.equal(archive?.method, "POST");
  assert.equal(archive?.url, "/api/v1/notifications/7/archive");
  // Never a token in a URL.
  assert.ok(stub.seen.every((s) => !s.url.includes("tok")));
  await stub.stop();
});

test("the stream resumes after a drop with the last id, and delivers nothing twice", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  stub.streams = [
    (res) => sse(res, ["id: 0\nretry: 3000\n: connected\n\n", notification(1), notification(2)]),
    // The server replays from the id it was given, and (wrongly) repeats 2: dropped.
    (res) => sse(res, ["id: 2\n: connected\n\n", notification(2), notification(3)], false),
  ];
  const client = new NotifyClient({ baseUrl, auth: { kind: "bearer", token: () => "tok" } });
  const stream = client.stream({ backoff: fast });
  const got: number[] = [];
  const statuses: StreamStatus[] = [];
  stream.on("notification", (n, meta) => {
    got.push(n.id);
    assert.equal(meta.id, String(n.id));
  });
  stream.onStatus((s) => statuses.push(s));
  await waitFor(() => got.length === 3);
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(stream.lastEventId, "3");
  // Ticket mode: a fresh ticket per connection, the resume point beside it.
  const [first, second] = stub.streamRequests;
  assert.equal(first?.url, "/api/v1/sse?ticket=t1");
  assert.equal(second?.url, "/api/v1/sse?ticket=t2&last_event_id=2");
  assert.deepEqual(statuses, ["open", "reconnecting", "open"]);
  stream.close();
  await waitFor(() => stream.status === "closed");
  await stub.stop();
});

test("auth.expired reconnects at once with fresh credentials; errors back off", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  stub.streams = [
    (res) => {
      res.writeHead(503, { "content-type": "application/json" });
      res.end('{"error":{"code":"unavailable","message":"later"}}');
    },
    (res) =>
      sse(res, [
        notification(5),
        'id: 5\nevent: auth.expired\ndata: {"expired_at":"2026-11-27T10:00:00Z","message":"x"}\n\n',
      ], false),
    (res) => sse(res, [notification(6)], false),
  ];
  const client = new NotifyClient({ baseUrl, auth: { kind: "cookie" } });
  const stream = client.stream({ mode: "direct", backoff: fast, lastEventId: "4" });
  const got: number[] = [];
  const errors: Error[] = [];
  let expired = 0;
  stream.on("notification", (n) => got.push(n.id));
  stream.on("auth.expired", () => expired++);
  stream.onError((e) => errors.push(e));
  await waitFor(() => got.length === 2);
  assert.deepEqual(got, [5, 6]);
  assert.equal(expired, 1);
  assert.equal((errors[0] as NotifyApiError).status, 503);
  const ids = stub.streamRequests.map((r) => r.headers["last-event-id"]);
  assert.deepEqual(ids, ["4", "4", "5"]);
  stream.close();
  await stub.stop();
});

test("live updates by any name, typed order.updated", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  stub.streams = [
    (res) =>
      sse(res, [
        'id: 1\nevent: order.updated\ndata: {"order_id":"A-1","status":"shipped","event_id":"e1"}\n\n',
        'id: 2\nevent: cart.changed\ndata: {"items":2,"event_id":"e2"}\n\n',
      ], false),
  ];
  const client = new NotifyClient({ baseUrl, auth: { kind: "cookie" } });
  const stream = client.stream({ mode: "direct" });
  const seen: string[] = [];
  stream.on("order.updated", (u) => seen.push(`${String(u.status)}:${u.event_id}`));
  stream.on("cart.changed", (u) => seen.push(`cart:${u.event_id}`));
  await waitFor(() => seen.length === 2);
  assert.deepEqual(seen, ["shipped:e1", "cart:e2"]);
  stream.close();
  await stub.stop();
});

test("after the engine's database was reset, its lower opening id wins: new events are not hidden", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  stub.streams = [
    // The engine knows only up to 2 now; it starts the stream there.
    (res) => sse(res, ["id: 2\nretry: 3000\n: connected\n\n", notification(3)], false),
  ];
  const client = new NotifyClient({ baseUrl, auth: { kind: "cookie" } });
  const stream = client.stream({ mode: "direct", lastEventId: "40" });
  const got: number[] = [];
  stream.on("notification", (n) => got.push(n.id));
  await waitFor(() => got.length === 1);
  assert.deepEqual(got, [3]);
  assert.equal(stub.streamRequests[0]?.headers["last-event-id"], "40");
  stream.close();
  await stub.stop();
});

test("refused credentials are reported and retried slowly, not in a tight loop", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  stub.streams = [
    (res) => {
      res.writeHead(401, { "content-type": "application/json" });
      res.end('{"error":{"code":"unauthorized","message":"no"}}');
    },
  ];
  const client = new NotifyClient({ baseUrl, auth: { kind: "cookie" } });
  const stream = client.stream({ mode: "direct", backoff: { initialMs: 10, maxMs: 400 } });
  const errors: number[] = [];
  stream.onError((e) => errors.push((e as NotifyApiError).status));
  await waitFor(() => errors.length === 1);
  await new Promise((r) => setTimeout(r, 150));
  assert.deepEqual(errors, [401], "no fast retries after a 401");
  stream.close();
  await stub.stop();
});

test("Retry-After is honoured with jitter: never earlier, spread over half as long again", () => {
  assert.equal(jitterRetryAfter(1000, () => 0), 1000);
  assert.equal(jitterRetryAfter(1000, () => 0.5), 1250);
  assert.ok(jitterRetryAfter(1000, () => 0.999999) < 1500);
  const waits = Array.from({ length: 200 }, () => jitterRetryAfter(2000));
  assert.ok(waits.every((w) => w >= 2000 && w < 3000), "within [value, value × 1.5)");
  assert.ok(new Set(waits.map((w) => Math.round(w / 100))).size > 5, "refused clients do not return together");
  assert.equal(parseRetryAfter("3"), 3000);
  assert.equal(parseRetryAfter(" 0 "), 0);
  assert.equal(parseRetryAfter(new Date(Date.now() + 5000).toUTCString(), Date.now()) !== null, true);
  assert.equal(parseRetryAfter("soon"), null);
  assert.equal(parseRetryAfter(null), null);
});

test("a ticket request refused with 429 waits its Retry-After (and some) before asking again", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  stub.ticketRefusals = [{ status: 429, headers: { "retry-after": "1" } }];
  stub.streams = [(res) => sse(res, [notification(1)], false)];
  const client = new NotifyClient({ baseUrl, auth: { kind: "cookie" } });
  const stream = client.stream({ backoff: fast });
  try {
    const errors: NotifyApiError[] = [];
    stream.onError((e) => errors.push(e as NotifyApiError));
    const got: number[] = [];
    stream.on("notification", (n) => got.push(n.id));
    await waitFor(() => got.length === 1, 4000);
    assert.equal(errors[0]?.status, 429);
    assert.equal(errors[0]?.retryAfterMs, 1000);
    const [refused, next] = stub.ticketRequests;
    const waited = (next?.at ?? 0) - (refused?.at ?? 0);
    assert.ok(waited >= 1000, `asked again after ${waited} ms, before Retry-After`);
    assert.ok(waited < 1500 + 250, `asked again after ${waited} ms`);
  } finally {
    stream.close();
    await stub.stop();
  }
});

test("a ticket request refused with 401 is retried slowly, not in a tight loop", async () => {
  const stub = new Stub();
  const baseUrl = await stub.start();
  stub.ticketRefusals = Array.from({ length: 10 }, () => ({ status: 401 }));
  const client = new NotifyClient({ baseUrl, auth: { kind: "cookie" } });
  const stream = client.stream({ backoff: { initialMs: 10, maxMs: 400 } });
  try {
    const errors: number[] = [];
    stream.onError((e) => errors.push((e as NotifyApiError).status));
    await waitFor(() => errors.length === 1);
    await new Promise((r) => setTimeout(r, 150));
    assert.deepEqual(errors, [401], "no fast retries after a 401");
  } finally {
    stream.close();
    await stub.stop();
  }
});
