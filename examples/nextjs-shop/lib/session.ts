// The development sign-in: the server mints a short-lived engine token for a demo tenant and
// user and hands it to the browser as an HttpOnly cookie, the one the engine reads
// (auth.cookie_name). The signing secret never leaves the server. Demo only: a real shop
// gets its tokens from its identity provider.
//
// It lets anyone be anyone, so it runs only where that is demonstrably a local demo (see
// `signInRefusal`): switched on explicitly, signing with the engine's *published* demo
// secret (which the engine accepts only in development mode, so no token minted here works
// against a production engine), for a request made on this machine.
import { createHmac } from "node:crypto";

export const COOKIE = "notify_token";
/** A token lives an hour; then the stream is refused and the page shows the sign-in again. */
export const TTL_SECS = 3600;
/** The engine's demo secret, published in this repository (engine: `DEMO_JWT_SECRET`). */
export const DEMO_SECRET = "demo-secret-change-me-0123456789abcdef";

export interface Session {
  tenant: string;
  user: string;
  exp: number;
}

/** What the sign-in decision looks at: the server's environment and the request's headers. */
export interface SignInContext {
  env: Record<string, string | undefined>;
  /** The request's `Host` header. */
  host: string | null;
  /** The request's `X-Forwarded-For` (Next.js sets it to the peer's address when absent). */
  forwardedFor: string | null;
}

/** Is `name` (a host name or address, without port) this machine? */
export function isLoopback(name: string): boolean {
  const bare = name.replace(/^\[|\]$/g, "").toLowerCase();
  return (
    bare === "localhost" ||
    bare === "::1" ||
    bare === "::ffff:127.0.0.1" ||
    /^(::ffff:)?127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(bare)
  );
}

/** The host name of a `Host` header (`name`, `name:port`, `[v6]:port`). */
function hostName(host: string): string {
  const v6 = /^\[([^\]]+)\](:\d+)?$/.exec(host);
  if (v6) return v6[1] ?? "";
  return host.replace(/:\d+$/, "");
}

/**
 * Why the development sign-in must not run here, or `null` when it may. All of:
 * - `DEMO_SIGN_IN=1`, set explicitly (by `scripts/demo.sh` and the browser test);
 * - the signing secret `NOTIFY_AUTH__JWT_SECRET` is the published demo secret, which the
 *   engine refuses outside development mode: a shop deployed with the sign-in left on still
 *   cannot mint a token a production engine accepts;
 * - the request comes from this machine: its `Host` and every `X-Forwarded-For` hop are
 *   loopback (a page reached through a public name or a proxy is refused).
 * `NODE_ENV` is not asked: the demo serves a production build (`next start`).
 */
export function signInRefusal({ env, host, forwardedFor }: SignInContext): string | null {
  if (env.DEMO_SIGN_IN !== "1") {
    return "the development sign-in is off (DEMO_SIGN_IN=1 turns it on, for a local demo only)";
  }
  if (env.NOTIFY_AUTH__JWT_SECRET !== DEMO_SECRET) {
    return "the development sign-in signs only with the engine's published demo secret (NOTIFY_AUTH__JWT_SECRET), which a production engine refuses";
  }
  if (!host || !isLoopback(hostName(host.trim()))) {
    return "the development sign-in answers only pages opened on this machine (http://127.0.0.1 or http://localhost)";
  }
  const hops = (forwardedFor ?? "").split(",").map((h) => h.trim()).filter((h) => h !== "");
  if (hops.some((h) => !isLoopback(h))) {
    return "the development sign-in answers only requests from this machine, not through a proxy";
  }
  return null;
}

function b64url(data: string | Buffer): string {
  return Buffer.from(data).toString("base64url");
}

/** A token for (tenant, user), if `context` allows the sign-in; otherwise it throws why. */
export function mint(
  tenant: string,
  user: string,
  context: SignInContext,
  now = Math.floor(Date.now() / 1000),
): string {
  const refusal = signInRefusal(context);
  if (refusal) throw new Error(refusal);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = b64url(
    JSON.stringify({
      sub: user,
      tenant,
      iss: process.env.NOTIFY_AUTH__ISSUER ?? "notify-engine",
      aud: process.env.NOTIFY_AUTH__AUDIENCE ?? "notify-api",
      iat: now,
      nbf: now - 1,
      exp: now + TTL_SECS,
    }),
  );
  const signature = createHmac("sha256", DEMO_SECRET).update(`${header}.${claims}`).digest("base64url");
  return `${header}.${claims}.${signature}`;
}

/** Who the cookie names (the engine verifies the signature; the page only shows the name). */
export function read(token: string | undefined): Session | null {
  const claims = token?.split(".")[1];
  if (!claims) return null;
  try {
    const c = JSON.parse(Buffer.from(claims, "base64url").toString("utf8"));
    if (typeof c.tenant !== "string" || typeof c.sub !== "string" || typeof c.exp !== "number") {
      return null;
    }
    if (c.exp * 1000 < Date.now()) return null;
    return { tenant: c.tenant, user: c.sub, exp: c.exp };
  } catch {
    return null;
  }
}

/** Demo tenants and users to choose from. */
export const DEMO_USERS = [
  { tenant: "acme", user: "alice" },
  { tenant: "acme", user: "carol" },
  { tenant: "globex", user: "bob" },
];
