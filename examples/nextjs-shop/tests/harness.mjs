// What the browser test and the benchmark share: the engine (started and restarted here),
// the shop (`next start`), Chromium, and signing in.
import { spawn } from "node:child_process";
import { mkdirSync, openSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const here = path.dirname(fileURLToPath(import.meta.url));
export const shopDir = path.resolve(here, "..");
export const root = path.resolve(shopDir, "../..");
export const results = path.join(shopDir, "test-results");
mkdirSync(results, { recursive: true });

export function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run through scripts/test.sh`);
  return v;
}
export const bin = env("ENGINE_BIN");
export const engineUrl = env("ENGINE_URL");
export const adminUrl = env("ENGINE_ADMIN_URL");
const shopPort = env("SHOP_PORT");
export const shopUrl = `http://127.0.0.1:${shopPort}`;
export const SECOND = 1000;

/** The engine's process, started (and restarted) by {@link startEngine}. */
let engine;
/** Is the engine this harness started still running? */
export function engineRunning() {
  return engine !== undefined && engine.exitCode === null;
}
export function startEngine() {
  const log = openSync(path.join(env("ENGINE_DIR"), "engine.log"), "a");
  engine = spawn(bin, ["run"], {
    cwd: root,
    env: { ...process.env, DATABASE_URL: env("ENGINE_DATABASE_URL") },
    stdio: ["ignore", log, log],
  });
  return waitHttp(`${adminUrl}/readyz`, 60 * SECOND);
}
export async function stopEngine() {
  if (!engineRunning()) return;
  const exited = new Promise((r) => engine.once("exit", r));
  engine.kill("SIGTERM");
  // Graceful shutdown drains for at most 30 s; past that, kill it.
  const timer = setTimeout(() => engine.kill("SIGKILL"), 40 * SECOND);
  await exited;
  clearTimeout(timer);
}

/** Waits until the engine has written `count` notifications in all (its metrics say so): a
 *  fresh consumer group takes seconds to be given its partitions, which must not count
 *  against a latency check. */
export async function waitWritten(count, ms = 60 * SECOND) {
  const deadline = Date.now() + ms;
  for (;;) {
    const text = await fetch(`${adminUrl}/metrics`).then((r) => r.text()).catch(() => "");
    const m = text.match(/^notify_notifications_written_total (\d+)/m);
    if (m && Number(m[1]) >= count) return;
    if (Date.now() > deadline) throw new Error(`the engine did not write ${count} notifications in time`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function waitHttp(url, ms) {
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

export async function signIn(page, tenant, user) {
  await page.goto(shopUrl);
  await page.getByTestId("tenant").fill(tenant);
  await page.getByTestId("user").fill(user);
  await page.getByTestId("sign-in").click();
  await page.getByTestId("connection").getByText("live").waitFor({ timeout: 15 * SECOND });
}

/** Starts the shop against the engine; returns a function that stops it. */
export function startShop() {
  const shop = spawn("npx", ["next", "start", "--port", shopPort, "--hostname", "127.0.0.1"], {
    cwd: shopDir,
    env: {
      ...process.env,
      NOTIFY_ENGINE_URL: engineUrl,
      // Served over plain http here: the session cookie cannot be Secure.
      DEMO_INSECURE_COOKIE: "1",
      // A local demo: the development sign-in may run (it also wants the published demo
      // secret, which scripts/lib/engine.sh exports, and a page opened on 127.0.0.1).
      DEMO_SIGN_IN: "1",
      NEXT_TELEMETRY_DISABLED: "1",
    },
    stdio: ["ignore", "inherit", "inherit"],
    // Its own process group, so stopping it stops the server Next.js forks too.
    detached: true,
  });
  const stop = () => {
    try {
      process.kill(-shop.pid, "SIGTERM");
    } catch {
      // Already gone.
    }
  };
  // Interrupted (Ctrl-C): the shop runs in a process group of its own, so stop it here.
  for (const signal of ["SIGINT", "SIGTERM"]) {
    process.once(signal, () => {
      stop();
      if (engineRunning()) engine.kill("SIGTERM");
      process.exit(130);
    });
  }
  return stop;
}

export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
}
