// The development sign-in: the server mints a short-lived engine token for a demo tenant and
// user and hands it to the browser as an HttpOnly cookie, the one the engine reads
// (auth.cookie_name). The signing secret never leaves the server. Demo only: a real shop
// gets its tokens from its identity provider.
import { createHmac } from "node:crypto";

export const COOKIE = "notify_token";
/** A token lives an hour; then the stream is refused and the page shows the sign-in again. */
export const TTL_SECS = 3600;

export interface Session {
  tenant: string;
  user: string;
  exp: number;
}

function secret(): string {
  // The sign-in lets anyone be anyone: only beside an engine in development mode.
  if (process.env.NOTIFY_DEV__MODE !== "true") {
    throw new Error("the development sign-in needs NOTIFY_DEV__MODE=true (never in production)");
  }
  const s = process.env.NOTIFY_AUTH__JWT_SECRET;
  if (!s || s.length < 32) {
    throw new Error("NOTIFY_AUTH__JWT_SECRET (the engine's development secret) is not set on the server");
  }
  return s;
}

function b64url(data: string | Buffer): string {
  return Buffer.from(data).toString("base64url");
}

export function mint(tenant: string, user: string, now = Math.floor(Date.now() / 1000)): string {
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
  const signature = createHmac("sha256", secret()).update(`${header}.${claims}`).digest("base64url");
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
