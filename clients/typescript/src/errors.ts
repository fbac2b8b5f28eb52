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
