/**
 * @jest-environment node
 */
// The development sign-in refuses unless this is demonstrably a local demo, and a refused
// session (a 401 after a key rotation, a sign-out) ends once instead of reloading in a loop.
import { createHmac } from "node:crypto";
import { NotifyApiError } from "@notify-engine/client";
import { DEMO_SECRET, mint, signInRefusal, type SignInContext } from "@/lib/session";
import { endSessionOnUnauthorized } from "@/lib/sessionEnd";

const local: SignInContext = {
  env: { DEMO_SIGN_IN: "1", NOTIFY_AUTH__JWT_SECRET: DEMO_SECRET },
  host: "127.0.0.1:3000",
  forwardedFor: "127.0.0.1",
};

describe("the development sign-in", () => {
  it("runs for a local demo: flag on, the published demo secret, a request from this machine", () => {
    expect(signInRefusal(local)).toBeNull();
    for (const host of ["localhost:3000", "127.0.0.1", "[::1]:3000", "LOCALHOST"]) {
      expect(signInRefusal({ ...local, host })).toBeNull();
    }
    for (const forwardedFor of [null, "::1", "::ffff:127.0.0.1", "127.0.0.1, 127.0.0.2"]) {
      expect(signInRefusal({ ...local, forwardedFor })).toBeNull();
    }
  });

  it("refuses without the explicit flag, even with the engine's dev mode on", () => {
    const env = { NOTIFY_DEV__MODE: "true", NOTIFY_AUTH__JWT_SECRET: DEMO_SECRET };
    expect(signInRefusal({ ...local, env })).toMatch(/DEMO_SIGN_IN/);
    expect(signInRefusal({ ...local, env: { ...env, DEMO_SIGN_IN: "true" } })).toMatch(/DEMO_SIGN_IN/);
  });

  it("refuses to sign with any secret but the published demo one (which production engines refuse)", () => {
    for (const secret of [undefined, "", "a-real-production-secret-0123456789abcdef"]) {
      const env = { DEMO_SIGN_IN: "1", NOTIFY_AUTH__JWT_SECRET: secret };
      expect(signInRefusal({ ...local, env })).toMatch(/demo secret/);
    }
  });

  it("refuses a page reached by another name, or through a proxy", () => {
    for (const host of [null, "", "shop.example.com", "shop.example.com:3000", "10.0.0.5:3000", "[2001:db8::1]:3000", "127.0.0.1.evil.example"]) {
      expect(signInRefusal({ ...local, host })).toMatch(/this machine/);
    }
    for (const forwardedFor of ["203.0.113.9", "127.0.0.1, 203.0.113.9", "10.1.2.3"]) {
      expect(signInRefusal({ ...local, forwardedFor })).toMatch(/proxy/);
    }
  });

  it("mints only when allowed, a token the engine's checks accept (iat, a bounded life)", () => {
    expect(() => mint("acme", "alice", { ...local, host: "shop.example.com" })).toThrow(/this machine/);
    expect(() => mint("acme", "alice", { ...local, env: {} })).toThrow(/DEMO_SIGN_IN/);
    const now = 1_800_000_000;
    const token = mint("acme", "alice", local, now);
    const [header, claims, signature] = token.split(".");
    const expected = createHmac("sha256", DEMO_SECRET).update(`${header}.${claims}`).digest("base64url");
    expect(signature).toBe(expected);
    const c = JSON.parse(Buffer.from(claims ?? "", "base64url").toString("utf8"));
    expect(c).toMatchObject({ sub: "alice", tenant: "acme", iat: now, exp: now + 3600 });
  });
});

/** A stream that reports what the test tells it to. */
class FakeStream {
  handlers = new Set<(error: Error) => void>();
  closed = 0;
  onError(handler: (error: Error) => void): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }
  close(): void {
    this.closed++;
  }
  report(error: Error): void {
    for (const h of this.handlers) h(error);
  }
}

describe("a refused session", () => {
  it("ends once on a 401: the stream closes and the page signs out, not a reload loop", () => {
    const stream = new FakeStream();
    const end = jest.fn();
    endSessionOnUnauthorized(stream, end);
    stream.report(new NotifyApiError(503, "unavailable", "later"));
    stream.report(new Error("network"));
    expect(end).not.toHaveBeenCalled();
    for (let i = 0; i < 5; i++) stream.report(new NotifyApiError(401, "unauthorized", "no"));
    expect(end).toHaveBeenCalledTimes(1);
    expect(stream.closed).toBe(1);
  });
});
