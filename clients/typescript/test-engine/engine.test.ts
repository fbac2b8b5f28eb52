// The client against a real engine (started by scripts/test.sh through scripts/lib/engine.sh,
// on the real Kafka and PostgreSQL): tokens from `notify-engine token`, events published with
// `notify-engine publish`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { NotifyClient, type NotificationEvent } from "../src/index.js";

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run through scripts/test.sh, which starts an engine`);
  return value;
}

const bin = env("ENGINE_BIN");
const baseUrl = env("ENGINE_URL");
const topic = env("ENGINE_TOPIC_PAID");
const run = `${process.pid}-${Date.now()}`;

function token(tenant: string, user: string, ttl = 600): string {
  return execFileSync(bin, ["token", "--tenant", tenant, "--user", user, "--ttl", String(ttl)], {
    encoding: "utf8",
  }).trim();
}

function publish(events: object[]): void {
  const dir = mkdtempSync(path.join(tmpdir(), "notify-client-"));
  const file = path.join(dir, "events.jsonl");
  writeFileSync(file, events.map((e) => JSON.stringify(e)).join("\n") + "\n");
  execFileSync(bin, ["publish", file, "--topic", topic], { stdio: "ignore" });
}

function paid(id: string, tenant: string, user: string): object {
  return {
    id, tenant, type: "order_paid", time: new Date().toISOString(),
    data: { user_id: user, order_id: `A-${id}`, amount: 12.5, currency: "EUR" },
  };
}

function collect(stream: ReturnType<NotifyClient["stream"]>): NotificationEvent[] {
  const got: NotificationEvent[] = [];
  stream.on("notification", (n) => got.push(n));
  return got;
}

async function until(check: () => boolean, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 25));
  }
}

test("stream, inbox and read state against the engine, resuming with nothing lost or repeated", async () => {
  const tenant = `client-${run}`;
  const client = new NotifyClient({ baseUrl, auth: { kind: "bearer", token: () => token(tenant, "u1") } });
  const other = new NotifyClient({ baseUrl, auth: { kind: "bearer", token: () => token(tenant, "u2") } });
  const stream = client.stream();
  const otherStream = other.stream();
  const theirs = collect(otherStream);
  const got = collect(stream);
  const reads: number[] = [];
  stream.on("notification.read", (r) => reads.push(r.unread_count));
  await until(() => stream.status === "open" && otherStream.status === "open");

  publish([paid("c1", tenant, "u1"), paid("c2", tenant, "u1")]);
  await until(() => got.length === 2);
  assert.deepEqual(got.map((n) => n.event_id), ["c1", "c2"]);
  assert.equal(got[0]?.title, "Payment received");
  assert.equal(await client.unreadCount(), 2);

  const first = got[0]!;
  const changed = await client.markRead(first.id);
  assert.equal(changed.unread_count, 1);
  await until(() => reads.length === 1);
  assert.deepEqual(reads, [1]);

  // Gone for a while: what arrives meanwhile comes on resume, once.
  const resumeFrom = stream.lastEventId;
  stream.close();
  publish([paid("c3", tenant, "u1"), paid("c4", tenant, "u1")]);
  const resumed = client.stream({ lastEventId: resumeFrom ?? undefined });
  const after = collect(resumed);
  await until(() => after.length === 2);
  assert.deepEqual(after.map((n) => n.event_id), ["c3", "c4"]);
  const list = await client.list({ unread: true });
  assert.deepEqual(list.items.map((n) => n.event_id), ["c4", "c3", "c2"]);
  assert.equal((await client.markAllRead(after[1]!.id)).unread_count, 0);
  resumed.close();
  // The other user of the tenant saw none of it.
  assert.equal(otherStream.status, "open");
  assert.equal(theirs.length, 0);
  otherStream.close();
});
