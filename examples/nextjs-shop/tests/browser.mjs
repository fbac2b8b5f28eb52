// The shop in a real browser (Debian's Chromium, driven by playwright-core) against a real
// engine on the real Kafka and PostgreSQL. Run by scripts/test.sh, which prepares the engine
// (scripts/lib/engine.sh) and builds the shop; this script starts and restarts both.
//
// It checks what a user would: events published to Kafka appear as a toast, a badge count and
// an order status within a second; mark-all-read in one tab clears the badge in another; the
// engine restarted mid-session loses nothing and repeats nothing; another user sees nothing.
// Screenshots go to test-results/.
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import assert from "node:assert/strict";
import {
  SECOND, bin, engineRunning, env, launchBrowser, results, root, shopUrl, signIn as signInAs,
  startEngine, startShop, stopEngine, waitHttp, waitWritten,
} from "./harness.mjs";

const tenant = `shop${Date.now().toString(36)}`;
const signIn = (page, user) => signInAs(page, tenant, user);

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

/** The text of the first element a locator finds, or undefined; never waits for it, since
 * an element that vanishes between a count and a read would make a read wait 30 s. */
async function textNow(locator) {
  return (await locator.allTextContents())[0];
}

/** The unread badge's number; the bell hides it at zero. */
async function badge(page) {
  return Number((await textNow(page.getByTestId("badge"))) ?? 0);
}

const orderStatus = (page, order) => textNow(page.getByTestId(`order-${order}`).getByTestId("status"));

async function eventually(check, what, ms = SECOND) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check()) return Date.now();
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const stopShop = startShop();
const browser = await launchBrowser();
try {
  await startEngine();
  await waitHttp(shopUrl, 60 * SECOND);

  const alice = await browser.newContext({ viewport: { width: 1200, height: 760 } });
  const bob = await browser.newContext();
  const tab1 = await alice.newPage();
  await signIn(tab1, "alice");
  const bobPage = await bob.newPage();
  await signIn(bobPage, "bob");

  // Warm-up: the engine's consumer group has its partitions once a first event comes through.
  publish("order_paid", "warm-up", { order_id: "W-1", amount: 1, currency: "EUR" });
  await waitWritten(1);

  // A payment: toast, badge and order row within a second of Kafka acknowledging it.
  let sent = publish("order_paid", "alice", { order_id: "A-1001", amount: 129.9, currency: "EUR" });
  let seen = await eventually(async () => (await tab1.getByTestId("toast").count()) === 1, "the toast");
  const latencies = [seen - sent];
  await eventually(async () => (await badge(tab1)) === 1, "the badge");
  await eventually(
    async () => (await orderStatus(tab1, "A-1001")) === "paid",
    "the order row",
  );
  // Shipped: the order row changes status live (order.updated), and a second toast.
  sent = publish("order_status_updated", "alice", { order_id: "A-1001", status: "shipped", previous_status: "paid" });
  seen = await eventually(
    async () => (await orderStatus(tab1, "A-1001")) === "shipped",
    "the order status change",
  );
  latencies.push(seen - sent);
  await eventually(async () => (await badge(tab1)) === 2, "the badge after shipping");
  await tab1.screenshot({ path: path.join(results, "1-live.png") });

  // Two tabs agree: mark all read in one, the other's badge clears.
  const tab2 = await alice.newPage();
  await tab2.goto(shopUrl);
  await tab2.getByTestId("connection").getByText("live").waitFor({ timeout: 15 * SECOND });
  await eventually(async () => (await badge(tab2)) === 2, "the second tab's badge", 5 * SECOND);
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
      async () => (await orderStatus(tab, "A-1001")) === "delivered",
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
  console.log(`browser test passed; on screen ${latencies.join(" ms, ")} ms after the publish tool returned`);
} catch (error) {
  for (const [i, page] of (browser.contexts().flatMap((c) => c.pages())).entries()) {
    await page.screenshot({ path: path.join(results, `failure-${i}.png`) }).catch(() => {});
  }
  throw error;
} finally {
  await browser.close();
  stopShop();
  if (engineRunning()) await stopEngine();
}
