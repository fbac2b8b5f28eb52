"use server";

import { cookies, headers } from "next/headers";
import { redirect } from "next/navigation";
import { COOKIE, TTL_SECS, mint } from "@/lib/session";

const ID = /^[A-Za-z0-9_-]{1,64}$/;

export async function signIn(form: FormData): Promise<void> {
  const tenant = String(form.get("tenant") ?? "");
  const user = String(form.get("user") ?? "");
  if (!ID.test(tenant) || !ID.test(user)) throw new Error("tenant and user must be 1-64 of [A-Za-z0-9_-]");
  const request = await headers();
  // Refused (it throws) unless this is demonstrably a local demo: see `signInRefusal`.
  const token = mint(tenant, user, {
    env: process.env,
    host: request.get("host"),
    forwardedFor: request.get("x-forwarded-for"),
  });
  (await cookies()).set(COOKIE, token, {
    httpOnly: true,
    sameSite: "lax",
    secure: process.env.NODE_ENV === "production" && process.env.DEMO_INSECURE_COOKIE !== "1",
    path: "/",
    maxAge: TTL_SECS,
  });
  redirect("/");
}

/** Signing out clears the cookie; the other tabs' next connection is refused (401) and they
 *  sign out too (once: see `lib/sessionEnd.ts`), landing on the sign-in. */
export async function signOut(): Promise<void> {
  (await cookies()).delete(COOKIE);
  redirect("/");
}
