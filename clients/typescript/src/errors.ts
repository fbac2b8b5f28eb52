// The client's errors: the engine's uniform error body as an exception, and the function that
// reads one from a response. Its own module because both the client and the stream throw them
// (the stream must not import the client it is opened from).

/** An error answer of the engine: the HTTP status and the uniform body's code and message,
 *  and how long the engine asked the client to wait (`Retry-After`), if it did. */
export class NotifyApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** `Retry-After` in milliseconds (`429`, `503`); `null` when the answer had none. */
    readonly retryAfterMs: number | null = null,
  ) {
    super(message);
    this.name = "NotifyApiError";
  }
}

/** A `Retry-After` value (delay-seconds or an HTTP date) in milliseconds; `null` when absent
 *  or not understood. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | null {
  const text = value?.trim();
  if (!text) return null;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? null : Math.max(0, date - now);
}

/** The engine's error body as an exception (a proxy's non-JSON error too). */
export async function apiError(response: Response): Promise<NotifyApiError> {
  const text = await response.text().catch(() => "");
  const retryAfterMs = parseRetryAfter(response.headers.get("retry-after"));
  try {
    const body = JSON.parse(text) as { error?: { code?: string; message?: string } };
    return new NotifyApiError(
      response.status,
      body.error?.code ?? "unknown",
      body.error?.message ?? text,
      retryAfterMs,
    );
  } catch {
    return new NotifyApiError(response.status, "unknown", text || response.statusText, retryAfterMs);
  }
}
