// The client's errors: the engine's uniform error body as an exception, and the function that
// reads one from a response. Its own module because both the client and the stream throw them
// (the stream must not import the client it is opened from).

/** An error answer of the engine: the HTTP status and the uniform body's code and message. */
export class NotifyApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "NotifyApiError";
  }
}

/** The engine's error body as an exception (a proxy's non-JSON error too). */
export async function apiError(response: Response): Promise<NotifyApiError> {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text) as { error?: { code?: string; message?: string } };
    return new NotifyApiError(
      response.status,
      body.error?.code ?? "unknown",
      body.error?.message ?? text,
    );
  } catch {
    return new NotifyApiError(response.status, "unknown", text || response.statusText);
  }
}
