// A Server-Sent Events parser (the WHATWG "event stream interpretation"), fed with text
// chunks as they arrive: lines end in CRLF, LF or CR; `data:` lines join with "\n"; a blank
// line dispatches; `:` lines are comments (keep-alives); `id:` with a NUL is ignored.

/** One dispatched event. `id` is the last event id in force when it was dispatched. */
export interface SseFrame {
  event: string;
  data: string;
  id: string | null;
}

export interface SseParserCallbacks {
  frame(frame: SseFrame): void;
  /** A `retry:` field: the server's reconnection delay in milliseconds. */
  retry?(ms: number): void;
  /** An `id:` on a block without data, which dispatches no frame (the engine's first
   *  frame, a comment, carries the stream's starting position this way). */
  id?(id: string): void;
}

export class SseParser {
  private buffer = "";
  private data: string[] = [];
  private event = "";
  private lastId: string | null = null;
  private idInBlock = false;
  private pendingCr = false;

  constructor(private readonly callbacks: SseParserCallbacks) {}

  /** Feeds decoded text; complete lines are interpreted at once. */
  push(chunk: string): void {
    let text = chunk;
    if (this.pendingCr && text.startsWith("\n")) text = text.slice(1);
    this.pendingCr = false;
    this.buffer += text;
    for (;;) {
      const cr = this.buffer.indexOf("\r");
      const lf = this.buffer.indexOf("\n");
      let end: number;
      if (cr === -1 && lf === -1) return;
      if (cr === -1) end = lf;
      else if (lf === -1) end = cr;
      else end = Math.min(cr, lf);
      const line = this.buffer.slice(0, end);
      let next = end + 1;
      if (this.buffer[end] === "\r") {
        if (end + 1 === this.buffer.length) this.pendingCr = true;
        else if (this.buffer[end + 1] === "\n") next = end + 2;
      }
      this.buffer = this.buffer.slice(next);
      this.line(line);
    }
  }

  private line(line: string): void {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "event":
        this.event = value;
        break;
      case "id":
        if (!value.includes("\0")) {
          this.lastId = value;
          this.idInBlock = true;
        }
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.callbacks.retry?.(Number(value));
        break;
      default:
        break;
    }
  }

  private dispatch(): void {
    const idInBlock = this.idInBlock;
    this.idInBlock = false;
    if (this.data.length === 0) {
      this.event = "";
      if (idInBlock && this.lastId !== null) this.callbacks.id?.(this.lastId);
      return;
    }
    const frame = { event: this.event || "message", data: this.data.join("\n"), id: this.lastId };
    this.data = [];
    this.event = "";
    this.callbacks.frame(frame);
  }
}
