// TEST FIXTURE — never deploy for a real tenant.
//
// The misbehaviours of `plugins/chaos-router` in a JavaScript guest, chosen by `data.chaos`,
// for the engine's sandbox and isolation tests:
//
// | `chaos`              | behaviour                                                          |
// |----------------------|--------------------------------------------------------------------|
// | (absent)             | one in-app `{title "chaos ok", body <event id>}` to `data.user_id`  |
// | `trap`               | throws an Error it does not catch                                  |
// | `loop`               | loops forever (only fuel or the epoch deadline stops it)           |
// | `oom`                | allocates and fills 1 MiB arrays without end                       |
// | `recurse`            | recurses without end                                               |
// | `error`              | refuses the event (`other("chaos: refused")`)                      |
// | `remember`           | `{title "chaos remembered", body <what it remembered, or "nothing">}`, then remembers `<tenant>/<event id>` in a global |
// | `remember_then_trap` | remembers `<tenant>/<event id>`, then throws                       |

let remembered = null;

const item = (userId, title, body) => ({
  tag: "in-app",
  val: { userId, title, body, category: "chaos", data: "{}" },
});

function deeper(n) {
  return deeper(n + 1) + 1;
}

export const router = {
  route(event) {
    const data = JSON.parse(event.data);
    const user = data.user_id || "chaos-user";
    switch (data.chaos) {
      case undefined:
        return [item(user, "chaos ok", event.id)];
      case "trap":
        throw new Error(`chaos: trap requested by event ${event.id}`);
      case "loop":
        for (;;) {}
      case "oom": {
        const chunks = [];
        for (;;) chunks.push(new Uint8Array(1 << 20).fill(1));
      }
      case "recurse":
        return [item(user, "chaos recursed", String(deeper(0)))];
      case "error":
        throw { tag: "other", val: "chaos: refused" };
      case "remember": {
        const before = remembered ?? "nothing";
        remembered = `${event.tenant}/${event.id}`;
        return [item(user, "chaos remembered", before)];
      }
      case "remember_then_trap":
        remembered = `${event.tenant}/${event.id}`;
        throw new Error(`chaos: trap after remembering ${event.id}`);
      default:
        throw { tag: "invalid-event", val: `data.chaos: unknown mode ${JSON.stringify(data.chaos)}` };
    }
  },
};
