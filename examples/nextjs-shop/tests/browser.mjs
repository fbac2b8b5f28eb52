// The shop in a real browser (Debian's Chromium, driven by playwright-core) against a real
// engine on the real Kafka and PostgreSQL. Run by scripts/test.sh, which prepares the engine
// (scripts/lib/engine.sh) and builds the shop; this script starts and restarts both.
//
// It checks what a user would: events published to Kafka appear as a toast, a badge count and
// an order status within a second; mark-all-read in one tab clears the badge in another; the
// engine restarted mid-session loses nothing and repeats nothing; another user sees nothing.
// Screenshots go to test-results/.
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, openSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const shopDir = path.resolve(here, "..");
const root = path.resolve(shopDir, "../..");
const results = path.join(shopDir, "test-results");
mkdirSync(results, { recursive: true });

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run through scripts/test.sh`);
  return v;
}
const bin = env("ENGINE_BIN");
const engineUrl = env("ENGINE_URL");
const adminUrl = env("ENGINE_ADMIN_URL");
const shopPort = env("SHOP_PORT");
const shopUrl = `http://127.0.0.1:${shopPort}`;
const tenant = `shop${Date.now().toString(36)}`;
const SECOND = 1000;

let engine;
function startEngine() {
  const log = openSync(path.join(env("ENGINE_DIR"), "engine.log"), "a");
  engine = spawn(bin, ["run"], {
    cwd: root,
    env: { ...process.env, DATABASE_URL: env("ENGINE_DATABASE_URL") },
    stdio: ["ignore", log, log],
  });
  return waitHttp(`${adminUrl}/readyz`, 60 * SECOND);
}
async function stopEngine() {
  const exited = new Promise((r) => engine.once("exit", r));
  engine.kill("SIGTERM");
  await exited;
}

async function waitHttp(url, ms) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${url} did not answer in time`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

let serial = 0;
/** Publishes envelopes with the engine's own tool; resolves once Kafka acknowledged them. */
function publish(type, user, data) {
  const topic = type === "order_paid" ? env("ENGINE_TOPIC_PAID") : env("ENGINE_TOPIC_STATUS");
  const file = path.join(results, `events-${++serial}.jsonl`);
  const event = {
    id: `${tenant}-${serial}`, tenant, type, time: new Date().toISOString(),
    data: { user_id: user, ...data },
  };
  writeFileSync(file, JSON.stringify(event) + "\n");
  execFileSync(bin, ["publish", file, "--topic", topic], { cwd: root, stdio: "ignore" });
  return Date.now();
}

async function signIn(page, user) {
  await page.goto(shopUrl);
  await page.getByTestId("tenant").fill(tenant);
  await page.getByTestId("user").fill(user);
  await page.getByTestId("sign-in").click();
  await page.getByTestId("connection").getByText("live").waitFor({ timeout: 15 * SECOND });
}

async function badge(page) {
  const b = page.getByTestId("badge");
  return (await b.count()) === 0 ? 0 : Number(await b.textContent());
}

async function eventually(check, what, ms = SECOND) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check()) return Date.now();
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const shop = spawn("npx", ["next", "start", "--port", shopPort, "--hostname", "127.0.0.1"], {
  cwd: shopDir,
  env: {
    ...process.env,
    NOTIFY_ENGINE_URL: engineUrl,
    // The test serves plain http: the session cookie cannot be Secure here.
    DEMO_INSECURE_COOKIE: "1",
    NEXT_TELEMETRY_DISABLED: "1",
  },
  stdio: ["ignore", "inherit", "inherit"],
  // Its own process group, so stopping it stops the server npx started too.
  detached: true,
});
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  await startEngine();
  await waitHttp(shopUrl, 60 * SECOND);

  const alice = await browser.newContext({ viewport: { width: 1200, height: 760 } });
  const bob = await browser.newContext();
  const tab1 = await alice.newPage();
  await signIn(tab1, "alice");
  const bobPage = await bob.newPage();
  await signIn(bobPage, "bob");

  // A payment: toast, badge and order row within a second of Kafka acknowledging it.
  let sent = publish("order_paid", "alice", { order_id: "A-1001", amount: 129.9, currency: "EUR" });
  let seen = await eventually(async () => (await tab1.getByTestId("toast").count()) === 1, "the toast");
  const latencies = [seen - sent];
  await eventually(async () => (await badge(tab1)) === 1, "the badge");
  await eventually(
    async () => (await tab1.getByTestId("order-A-1001").getByTestId("status").textContent()) === "paid",
    "the order row",
  );
  // Shipped: the order row changes status live (order.updated), and a second toast.
  sent = publish("order_status_updated", "alice", { order_id: "A-1001", status: "shipped", previous_status: "paid" });
  seen = await eventually(
    async () => (await tab1.getByTestId("order-A-1001").getByTestId("status").textContent()) === "shipped",
    "the order status change",
  );
  latencies.push(seen - sent);
  await eventually(async () => (await badge(tab1)) === 2, "the badge after shipping");
  await tab1.screenshot({ path: path.join(results, "1-live.png") });

  // Two tabs agree: mark all read in one, the other's badge clears.
  const tab2 = await alice.newPage();
  await tab2.goto(shopUrl);
  await tab2.getByTestId("connection").getByText("live").waitFor({ timeout: 15 * SECOND });
  assert.equal(await badge(tab2), 2);
  await tab1.getByTestId("mark-all").click();
  await eventually(async () => (await badge(tab2)) === 0, "the other tab's badge clearing", 2 * SECOND);
  await eventually(async () => (await badge(tab1)) === 0, "this tab's badge clearing");
  await tab2.screenshot({ path: path.join(results, "2-second-tab-read.png") });

  // The engine restarts mid-session; what is published meanwhile appears after the
  // reconnect, each once.
  await stopEngine();
  await tab1.getByTestId("connection").getByText("reconnecting…").waitFor({ timeout: 15 * SECOND });
  await tab1.screenshot({ path: path.join(results, "3-reconnecting.png") });
  publish("order_paid", "alice", { order_id: "A-1002", amount: 15, currency: "EUR" });
  publish("order_status_updated", "alice", { order_id: "A-1001", status: "delivered", previous_status: "shipped" });
  await startEngine();
  for (const tab of [tab1, tab2]) {
    await tab.getByTestId("connection").getByText("live").waitFor({ timeout: 30 * SECOND });
    await eventually(async () => (await tab.getByTestId("item").count()) === 4, "the missed events", 15 * SECOND);
    await eventually(
      async () => (await tab.getByTestId("order-A-1001").getByTestId("status").textContent()) === "delivered",
      "the missed status change",
      5 * SECOND,
    );
    assert.equal(await tab.getByTestId("order-A-1002").count(), 1);
    assert.equal(await badge(tab), 2);
  }
  // Nothing twice, even after more time.
  await new Promise((r) => setTimeout(r, SECOND));
  assert.equal(await tab1.getByTestId("item").count(), 4);
  await tab1.screenshot({ path: path.join(results, "4-after-restart.png") });

  // Bob (same tenant, another user) saw none of it.
  assert.equal(await bobPage.getByTestId("item").count(), 0);
  assert.equal(await badge(bobPage), 0);
  assert.equal(await bobPage.getByTestId("order-A-1001").count(), 0);
  await bobPage.screenshot({ path: path.join(results, "5-other-user.png") });
  console.log(`browser test passed; publish→screen ${latencies.join(" ms, ")} ms`);
} catch (error) {
  for (const [i, page] of (browser.contexts().flatMap((c) => c.pages())).entries()) {
    await page.screenshot({ path: path.join(results, `failure-${i}.png`) }).catch(() => {});
  }
  throw error;
} finally {
  await browser.close();
  process.kill(-shop.pid, "SIGTERM");
  if (engine && engine.exitCode === null) await stopEngine();
}
