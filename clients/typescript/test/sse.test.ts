import { test } from "node:test";
import assert from "node:assert/strict";
import { SseParser, type SseFrame } from "../src/sse.js";

function parse(chunks: string[]): { frames: SseFrame[]; ids: string[]; retries: number[] } {
  const frames: SseFrame[] = [];
  const ids: string[] = [];
  const retries: number[] = [];
  const parser = new SseParser({
    frame: (f) => frames.push(f),
    id: (id) => ids.push(id),
    retry: (ms) => retries.push(ms),
  });
  for (const c of chunks) parser.push(c);
  return { frames, ids, retries };
}

test("frames, multi-line data, comments and the engine's first frame", () => {
  const { frames, ids, retries } = parse([
    "id: 7\nretry: 3000\n: connected\n\n",
    ": keep-alive\n\n",
    "id: 8\nevent: notification\ndata: {\"a\":\ndata: 1}\n\n",
  ]);
  // Only the block without data reports its id on its own; frames carry theirs.
  assert.deepEqual(ids, ["7"]);
  assert.deepEqual(retries, [3000]);
  assert.deepEqual(frames, [{ event: "notification", data: '{"a":\n1}', id: "8" }]);
});

test("any line ending, and chunks split anywhere (even inside CRLF)", () => {
  const text = "id: 1\r\nevent: order.updated\r\ndata: {}\r\n\r\nid: 2\rdata: x\r\rdata: y\n\n";
  const whole = parse([text]).frames;
  for (let cut = 1; cut < text.length; cut++) {
    assert.deepEqual(parse([text.slice(0, cut), text.slice(cut)]).frames, whole, `cut at ${cut}`);
  }
  assert.deepEqual(whole, [
    { event: "order.updated", data: "{}", id: "1" },
    { event: "message", data: "x", id: "2" },
    { event: "message", data: "y", id: "2" },
  ]);
});

test("an id with NUL is ignored, a field without colon is a field, unknown fields are not", () => {
  const { frames } = parse(["id: 3\n\nid: 4\0x\nfoo: bar\ndata\n\n"]);
  assert.deepEqual(frames, [{ event: "message", data: "", id: "3" }]);
});
