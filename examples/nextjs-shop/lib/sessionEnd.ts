// What the page does when the engine refuses its credentials (401): the session is over (the
// token expired, another tab signed out, the engine's key was rotated, or the operator signed
// the user out). It ends the session once: the stream stops retrying and the page signs out
// (clearing the cookie) and shows the sign-in. Reloading instead kept the cookie, whose token
// the engine refuses, and reloaded again on the next 401: a loop.
import { NotifyApiError } from "@notify-engine/client";

/** The part of a stream this needs. */
export interface Refusable {
  onError(handler: (error: Error) => void): () => void;
  close(): void;
}

/** Calls `end` once, on the first 401 `stream` reports, after closing the stream; returns
 *  the unsubscribe function. */
export function endSessionOnUnauthorized(stream: Refusable, end: () => void): () => void {
  let ended = false;
  return stream.onError((error) => {
    if (ended || !(error instanceof NotifyApiError) || error.status !== 401) return;
    ended = true;
    stream.close();
    end();
  });
}
