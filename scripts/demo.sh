#!/usr/bin/env bash
# The main job: services, plugins, engine, sample traffic — and a live SSE stream to watch.
#
#   scripts/demo.sh     (Ctrl-C stops the engine, and the services if this script started them)
set -euo pipefail

LOG_TAG=demo
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$ROOT"
# The demo's steps in bold, so they stand out between the services' and the engine's output.
log() { printf '\n\033[1m[demo] %s\033[0m\n' "$*" >&2; }

STATE=$NOTIFY_STATE_DIR
HTTP=127.0.0.1:${NOTIFY_HTTP_PORT:-8080}
ADMIN=127.0.0.1:${NOTIFY_ADMIN_PORT:-9090}
# The example shop; the engine's CORS origin in config/demo.toml names this port.
SHOP=127.0.0.1:3000

scripts/bootstrap.sh

started_services=0
if ! scripts/services.sh status >/dev/null 2>&1; then
    started_services=1
fi
log "starting Kafka, PostgreSQL and Mailpit"
scripts/services.sh up
load_services_env
scripts/services.sh topics order_paid order_status_updated

log "building the routing plugins (wasm32-wasip2)"
scripts/build-plugins.sh --workspace-only

log "building the engine"
cargo build --locked --bin notify-engine
BIN=$CARGO_TARGET_DIR/debug/notify-engine

log "building the example shop (clients/typescript, examples/nextjs-shop)"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
(cd examples/nextjs-shop && npm ci --no-audit --no-fund --loglevel=error &&
    NEXT_TELEMETRY_DISABLED=1 npx next build >"$STATE/shop-build.log" 2>&1) ||
    { tail -n 30 "$STATE/shop-build.log"; exit 1; }

# A fresh demo database each run, so the samples (fixed event ids) are new every time.
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS notify_demo WITH (FORCE)" >/dev/null
psql "$DATABASE_URL" -qc "CREATE DATABASE notify_demo" >/dev/null
export DATABASE_URL=${DATABASE_URL%/*}/notify_demo
# One consumer group across demo runs: each run resumes after what the last one committed,
# so it handles what it publishes now, not every earlier run's messages again.
export NOTIFY_KAFKA__GROUP_ID=notify-demo
export NOTIFY_HTTP__LISTEN=$HTTP
export NOTIFY_HTTP__ADMIN_LISTEN=$ADMIN
# The demo's signing secret, published in this repository: the engine accepts it only in
# development mode, which only the demo (and the test scripts) turn on. Always this one here,
# whatever the shell holds: the shop's development sign-in signs with it and nothing else.
# Real deployments inject their own and leave development mode off.
export NOTIFY_AUTH__JWT_SECRET=demo-secret-change-me-0123456789abcdef
export NOTIFY_DEV__MODE=true
export NOTIFY_CONFIG=$ROOT/config/demo.toml

pids=()
cleanup() {
    trap - INT TERM EXIT
    log "stopping"
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [[ -n ${shop_pid:-} ]] && kill -- "-$shop_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    if ((started_services)); then scripts/services.sh down; fi
}
trap cleanup INT TERM EXIT

log "starting the engine (log: $STATE/logs/engine.log)"
mkdir -p "$STATE/logs"
"$BIN" run >"$STATE/logs/engine.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
    curl -fsS "http://$ADMIN/readyz" >/dev/null 2>&1 && break
    kill -0 "${pids[0]}" 2>/dev/null || { tail -n 30 "$STATE/logs/engine.log"; exit 1; }
    sleep 0.5
done
curl -fsS "http://$ADMIN/readyz" >/dev/null || { tail -n 30 "$STATE/logs/engine.log"; exit 1; }

log "starting the example shop on http://$SHOP (log: $STATE/logs/shop.log)"
# In a session of its own (setsid), so stopping it stops the server process Next.js forks.
# DEMO_SIGN_IN=1: the shop's development sign-in, for this local demo only.
(cd examples/nextjs-shop && NOTIFY_ENGINE_URL="http://$HTTP" DEMO_INSECURE_COOKIE=1 DEMO_SIGN_IN=1 NEXT_TELEMETRY_DISABLED=1 \
    exec setsid npx next start --hostname 127.0.0.1 --port "${SHOP##*:}") >"$STATE/logs/shop.log" 2>&1 &
shop_pid=$!
for _ in $(seq 1 60); do
    kill -0 "$shop_pid" 2>/dev/null || { tail -n 30 "$STATE/logs/shop.log"; exit 1; }
    curl -fsS -o /dev/null "http://$SHOP" 2>/dev/null && break
    sleep 0.5
done
curl -fsS -o /dev/null "http://$SHOP" || { tail -n 30 "$STATE/logs/shop.log"; exit 1; }

ALICE=$("$BIN" token --tenant acme --user alice --ttl 86400)
BOB=$("$BIN" token --tenant globex --user bob --ttl 86400)

log "watching alice's (tenant acme) SSE stream below; replay from the start with Last-Event-ID: 0"
curl -sN -H "Authorization: Bearer $ALICE" -H "Last-Event-ID: 0" "http://$HTTP/api/v1/sse" |
    sed -u 's/^/  [sse acme\/alice] /' &
pids+=($!)
sleep 1

log "open http://$SHOP in a browser and sign in as acme/alice to watch the samples arrive"
log "publishing samples/events.jsonl in 10 s (one event every 2 s)"
sleep 10
"$BIN" publish --stamp-now --interval-ms 2000 samples/events.jsonl

cat >&2 <<MSG

$(printf '\033[1m')Everything is running.$(printf '\033[0m')
  The shop (browser):    http://$SHOP   (sign in as acme/alice to see the samples; open two tabs)
  Emails (Mailpit UI):   $MAILPIT_URL
  Metrics:               http://$ADMIN/metrics        Readiness: http://$ADMIN/readyz
  Status (every part):   http://$ADMIN/status
  Bob's stream (globex): curl -N -H "Authorization: Bearer $BOB" -H "Last-Event-ID: 0" http://$HTTP/api/v1/sse
  Alice's inbox:         curl -H "Authorization: Bearer $ALICE" http://$HTTP/api/v1/notifications
  Mark all read:         curl -H "Authorization: Bearer $ALICE" -H "Content-Type: application/json" -d '{"up_to": 100}' http://$HTTP/api/v1/notifications/read-all
  API contract:          http://$HTTP/api/v1/openapi.json   (and contracts/asyncapi.json for the events)
  More events:           $BIN publish samples/events.jsonl   (same ids: dropped as duplicates)
  Dead letters:          psql "$DATABASE_URL" -c "SELECT error_kind, reason FROM dead_letters"
  Try a plugin:          $BIN plugin run --plugin plugins/dist/acme.wasm --event samples/order_paid.json --set vip_threshold=500

Ctrl-C stops it all.
MSG
wait "${pids[0]}"
