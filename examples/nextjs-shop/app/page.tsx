import { cookies, headers } from "next/headers";
import { Shop } from "@/components/Shop";
import { COOKIE, DEMO_USERS, read, signInRefusal } from "@/lib/session";
import { signIn, signOut } from "./actions";

// The engine's public origin as the browser reaches it, read at request time.
export const dynamic = "force-dynamic";

export default async function Home() {
  const session = read((await cookies()).get(COOKIE)?.value);
  const engineUrl = process.env.NOTIFY_ENGINE_URL ?? "http://127.0.0.1:8080";
  if (!session) {
    const request = await headers();
    const refusal = signInRefusal({
      env: process.env,
      host: request.get("host"),
      forwardedFor: request.get("x-forwarded-for"),
    });
    if (refusal) {
      return (
        <main className="signin">
          <h1>Shop</h1>
          <p data-testid="sign-in-off">Sign-in is not available here: {refusal}.</p>
        </main>
      );
    }
    return (
      <main className="signin">
        <h1>Shop</h1>
        <p>A development sign-in: the server mints an engine token for the user you pick.</p>
        <form action={signIn}>
          <label>
            Tenant <input name="tenant" defaultValue="acme" data-testid="tenant" />
          </label>
          <label>
            User <input name="user" defaultValue="alice" data-testid="user" />
          </label>
          <button type="submit" data-testid="sign-in">Sign in</button>
        </form>
        <p className="hint">
          Try {DEMO_USERS.map((u) => `${u.tenant}/${u.user}`).join(", ")}.
        </p>
      </main>
    );
  }
  return (
    <>
      <header className="top">
        <strong>Shop</strong>
        <span className="who" data-testid="who">
          {session.tenant} / {session.user}
        </span>
        <form action={signOut}>
          <button type="submit">Sign out</button>
        </form>
      </header>
      <Shop engineUrl={engineUrl} who={`${session.tenant}/${session.user}`} />
    </>
  );
}
