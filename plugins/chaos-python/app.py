"""TEST FIXTURE — never deploy for a real tenant.

The misbehaviours of `plugins/chaos-router` in a Python guest, chosen by `data.chaos`, for
the engine's sandbox and isolation tests:

| `chaos`              | behaviour                                                          |
|----------------------|--------------------------------------------------------------------|
| (absent)             | one in-app `{title "chaos ok", body <event id>}` to `data.user_id`  |
| `trap`               | raises an exception it does not catch                              |
| `loop`               | loops forever (only fuel or the epoch deadline stops it)           |
| `oom`                | allocates and fills 1 MiB chunks without end                       |
| `recurse`            | recurses without end, with the recursion limit lifted              |
| `error`              | refuses the event (`other("chaos: refused")`)                      |
| `remember`           | `{title "chaos remembered", body <what it remembered, or "nothing">}`, then remembers `<tenant>/<event id>` in a global |
| `remember_then_trap` | remembers `<tenant>/<event id>`, then raises                       |
"""

import json
import sys
from typing import List, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    Delivery,
    Delivery_InApp,
    Event,
    InApp,
    RouteError_InvalidEvent,
    RouteError_Other,
)

remembered: Optional[str] = None


def item(user_id: str, title: str, body: str) -> Delivery:
    return Delivery_InApp(InApp(user_id=user_id, title=title, body=body, category="chaos", data="{}"))


def deeper(n: int) -> int:
    return deeper(n + 1) + 1


class Router(exports.Router):
    def route(self, event: Event) -> List[Delivery]:
        global remembered
        data = json.loads(event.data)
        mode = data.get("chaos")
        user = data.get("user_id") or "chaos-user"
        if mode is None:
            return [item(user, "chaos ok", event.id)]
        if mode == "trap":
            raise RuntimeError(f"chaos: trap requested by event {event.id}")
        if mode == "loop":
            while True:
                pass
        if mode == "oom":
            chunks = []
            while True:
                chunks.append(b"\x01" * (1 << 20))
        if mode == "recurse":
            sys.setrecursionlimit(1_000_000_000)
            return [item(user, "chaos recursed", str(deeper(0)))]
        if mode == "error":
            raise Err(RouteError_Other("chaos: refused"))
        if mode == "remember":
            before = remembered or "nothing"
            remembered = f"{event.tenant}/{event.id}"
            return [item(user, "chaos remembered", before)]
        if mode == "remember_then_trap":
            remembered = f"{event.tenant}/{event.id}"
            raise RuntimeError(f"chaos: trap after remembering {event.id}")
        raise Err(RouteError_InvalidEvent(f"data.chaos: unknown mode {mode!r}"))
