// Benchmark (not a test): time from producing an event to Kafka until its toast is on
// screen in Chromium, through the real engine and the shop. Run by `BENCH=shop
// scripts/bench.sh`; figures go to docs/benchmarks.md.
//
// Events are produced one at a time (each awaited, then a pause, so none queue behind each
// other) with kafkajs; the page records when each toast appears (a MutationObserver, on the
// same machine clock). BENCH_SHOP_EVENTS sets how many (default 300).
import { Kafka, logLevel } from "kafkajs";
import {
  SECOND, env, launchBrowser, signIn, startEngine, startShop, stopEngine, waitHttp, waitWritten,
  shopUrl,
} from "./harness.mjs";

const events = Number(process.env.BENCH_SHOP_EVENTS ?? 300);
const pauseMs = 30;
const tenant = `bench${Date.now().toString(36)}`;

const stopShop = startShop();
const browser = await launchBrowser();
const kafka = new Kafka({ brokers: [env("NOTIFY_KAFKA__BROKERS")], logLevel: logLevel.NOTHING });
const producer = kafka.producer();
try {
  await startEngine();
  await waitHttp(shopUrl, 60 * SECOND);
  await producer.connect();
  // Warm-up: the consumer group has its partitions once a first event comes through.
  await producer.send({
    topic: env("ENGINE_TOPIC_PAID"),
    messages: [{ value: JSON.stringify({
      id: `${tenant}-warm-up`, tenant, type: "order_paid", time: new Date().toISOString(),
      data: { user_id: "warm-up", order_id: "W-1", amount: 1, currency: "EUR" },
    }) }],
  });
  await waitWritten(1);
  const page = await (await browser.newContext()).newPage();
  await signIn(page, tenant, "alice");
  await page.evaluate(() => {
    window.__seen = {};
    new MutationObserver((records) => {
      const now = Date.now();
      for (const r of records) {
        for (const node of r.addedNodes) {
          const match = node.textContent?.match(/order (B-\d+)/);
          if (node.dataset?.testid === "toast" && match) window.__seen[match[1]] ??= now;
        }
      }
    }).observe(document.body, { childList: true, subtree: true });
  });
  const sent = {};
  for (let i = 0; i < events; i++) {
    const order = `B-${i}`;
    const value = JSON.stringify({
      id: `${tenant}-${i}`, tenant, type: "order_paid", time: new Date().toISOString(),
      data: { user_id: "alice", order_id: order, amount: 1, currency: "EUR" },
    });
    sent[order] = Date.now();
    await producer.send({ topic: env("ENGINE_TOPIC_PAID"), messages: [{ key: `${tenant}/alice`, value }] });
    await new Promise((r) => setTimeout(r, pauseMs));
  }
  const deadline = Date.now() + 60 * SECOND;
  let seen = {};
  while (Object.keys(seen).length < events && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 200));
    seen = await page.evaluate(() => window.__seen);
  }
  const missing = Object.keys(sent).filter((o) => !(o in seen));
  if (missing.length) throw new Error(`${missing.length} toasts never appeared, e.g. ${missing[0]}`);
  const latencies = Object.keys(sent).map((o) => seen[o] - sent[o]).sort((a, b) => a - b);
  const at = (p) => latencies[Math.round((latencies.length - 1) * p)];
  console.log(
    `shop: produce → toast on screen, ${events} events one at a time: p50 ${at(0.5)} ms, p99 ${at(0.99)} ms, max ${at(1)} ms`,
  );
} finally {
  await producer.disconnect().catch(() => {});
  await browser.close();
  stopShop();
  await stopEngine().catch(() => {});
}
