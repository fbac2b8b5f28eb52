#!/usr/bin/env bash
# The load harness, one command: starts the services and LOAD_INSTANCES engines (release
# build, one consumer group, one database), holds LOAD_CONNECTIONS SSE connections across
# loopback source addresses and every instance, runs the scenarios (idle, steady 100/s,
# burst 1000/s, max, fan-out, emails) and writes report.json, report.md and latency.png.
# Then, with the engines stopped, the same clients and events against Centrifugo (built from
# the Go module proxy once, fed by its own Kafka consumer from a topic of its own, uni_sse),
# and the two side by side in comparison.md.
#
#   scripts/load.sh                       # 1 instance, 5 000 connections, then Centrifugo
#   LOAD_INSTANCES=3 scripts/load.sh      # three instances in one group
#   LOAD_CONNECTIONS=19000 LOAD_SCENARIOS=idle LOAD_CENTRIFUGO=0 scripts/load.sh
#
# Other knobs (passed to notify-load): LOAD_SCENARIOS, LOAD_MAX_EVENTS, LOAD_FANOUT,
# LOAD_EMAILS, LOAD_STEADY_SECS, LOAD_BURST_SECS, LOAD_SOURCES, LOAD_TENANTS; LOAD_CENTRIFUGO=0 skips
# Centrifugo, CENTRIFUGO_VERSION picks its version. Connections past LOAD_PER_PROCESS (the
# open-files limit less 2 000) are held by holder processes (notify-load --hold-only). The reports go to LOAD_OUT (default
# ~/.cache/notify-engine/load/<UTC time>-<instances>i): engine/, centrifugo/ and
# comparison.md; docs/performance.md records the figures of a run.
set -euo pipefail
LOG_TAG=load
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$ROOT"
INSTANCES=${LOAD_INSTANCES:-1}
CONNECTIONS=${LOAD_CONNECTIONS:-5000}
FANOUT=${LOAD_FANOUT:-1000}
OUT=${LOAD_OUT:-$HOME/.cache/notify-engine/load/$(date -u +%Y%m%dT%H%M%SZ)-${INSTANCES}i}
SCENARIOS=${LOAD_SCENARIOS:-idle,steady,burst,max,fanout,emails}
CENTRIFUGO=${LOAD_CENTRIFUGO:-1}
CENTRIFUGO_VERSION=${CENTRIFUGO_VERSION:-v6.9.1}

scripts/bootstrap.sh
scripts/services.sh up >&2
load_services_env
cargo build --release --locked -p notify-engine --bin notify-engine
cargo build --release --locked -p notify-load
scripts/build-plugins.sh --workspace-only >&2
if [ "$CENTRIFUGO" != 0 ]; then
    # Built once per version from the Go module proxy (a few minutes), then reused.
    CENTRIFUGO_BIN=$HOME/.cache/notify-engine/tools/centrifugo-$CENTRIFUGO_VERSION/centrifugo
    if [ ! -x "$CENTRIFUGO_BIN" ]; then
        command -v go >/dev/null || { log "Centrifugo is built with Go, which is not installed (or LOAD_CENTRIFUGO=0)"; exit 1; }
        log "building Centrifugo $CENTRIFUGO_VERSION"
        GOBIN=$(dirname "$CENTRIFUGO_BIN") go install "github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION"
    fi
fi

# Every connection is a file descriptor, in the engines and in the harness.
ulimit -n "$(ulimit -Hn)"
log "open files per process: $(ulimit -n)"

run="load_$$"
DB_URL="${DATABASE_URL%/*}/$run"
TOPIC="order_paid-$run"
psql "$DATABASE_URL" -qc "CREATE DATABASE $run" >/dev/null
NOTIFY_KAFKA_TOPIC_PARTITIONS=6 scripts/services.sh topics "$TOPIC" >/dev/null 2>&1
export NOTIFY_AUTH__JWT_SECRET=load-secret-load-secret-load-secret-0123
# The instances hear each other's wake-ups only under one cluster secret.
export NOTIFY_CLUSTER__SECRET=load-cluster-secret-load-cluster-secret-01
WORK=$(mktemp -d)
PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_all
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $run WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Waits until <url> answers, failing with <log>'s tail if the last started process died.
wait_ready() { # <url> <log> <what>
    for _ in $(seq 1 120); do
        curl -fsS "$1" >/dev/null 2>&1 && return 0
        kill -0 "${PIDS[-1]}" 2>/dev/null || { tail -n 30 "$2" >&2; exit 1; }
        sleep 0.5
    done
    log "$3 not ready"
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ENGINES=() ADMINS=() ENGINE_PIDS=()
per_instance=$(((CONNECTIONS + FANOUT) / INSTANCES + 1000))
for i in $(seq 1 "$INSTANCES"); do
    http=$(free_port)
    admin=$(free_port)
    cat >"$WORK/engine$i.toml" <<TOML
[http]
listen = "127.0.0.1:$http"
admin_listen = "127.0.0.1:$admin"
max_connections = $per_instance
max_connections_per_ip = $per_instance
[kafka]
topics = ["$TOPIC"]
group_id = "$run"
[database]
url = "$DB_URL"
max_connections = 16
api_max_connections = 32
[plugins]
dir = "plugins/dist"
cache_dir = "$CARGO_TARGET_DIR/plugin-cache"
[email]
templates_dir = "templates"
concurrency = 64
batch = 128
per_tenant_batch = 64
tenant_rate_per_sec = 1000
[smtp]
tls = "none"
[sse]
max_connections = $per_instance
max_connections_per_tenant = $per_instance
max_connections_per_user = $((FANOUT + 8))
[limits]
# The harness opens its streams at once, a thousand of them for one user: what it measures
# is the engine's cost per stream, not the request limits.
user_burst = $((FANOUT + 8))
tenant_burst = $per_instance
[log]
filter = "warn"
TOML
    NOTIFY_CONFIG=$WORK/engine$i.toml DATABASE_URL=$DB_URL \
        "$CARGO_TARGET_DIR/release/notify-engine" run >"$WORK/engine$i.log" 2>&1 &
    PIDS+=("$!")
    ENGINES+=("127.0.0.1:$http")
    ENGINE_PIDS+=("${PIDS[-1]}")
    ADMINS+=("127.0.0.1:$admin")
    wait_ready "http://127.0.0.1:$admin/readyz" "$WORK/engine$i.log" "engine $i"
    log "engine $i: public $http, admin $admin, pid ${PIDS[-1]}"
done
join() { local IFS=,; echo "$*"; }

LOAD_BIN=$CARGO_TARGET_DIR/release/notify-load
LOAD_ARGS=(
    --brokers "$NOTIFY_KAFKA__BROKERS" --fanout-connections "$FANOUT"
    --sources "${LOAD_SOURCES:-4}" --tenants "${LOAD_TENANTS:-10}"
    --max-events "${LOAD_MAX_EVENTS:-100000}" --emails "${LOAD_EMAILS:-5000}"
    --steady-secs "${LOAD_STEADY_SECS:-30}" --burst-secs "${LOAD_BURST_SECS:-20}"
)
load() { "$LOAD_BIN" "${LOAD_ARGS[@]}" "$@"; }
# One process holds at most PER_PROCESS connections (its open files are capped like the
# engines'); past that, holder processes keep the rest open, idle, for the whole run.
PER_PROCESS=${LOAD_PER_PROCESS:-$(($(ulimit -n) - 2000))}
MAIN=$((CONNECTIONS < PER_PROCESS ? CONNECTIONS : PER_PROCESS))
HOLDERS=()
hold() { # <offset> <count> <notify-load arguments: servers, target>...
    local log="$WORK/holder-$1.log" offset=$1 count=$2
    shift 2
    # The binary itself in the background (not the `load` function, whose subshell would be
    # the pid killed, leaving the holder running).
    "$LOAD_BIN" "${LOAD_ARGS[@]}" --hold-only --user-offset "$offset" --connections "$count" \
        --topic "$TOPIC" --out "$WORK" "$@" >"$log" 2>&1 &
    HOLDERS+=("$!")
    PIDS+=("$!")
    for _ in $(seq 1 600); do
        grep -q "holding" "$log" && break
        kill -0 "${HOLDERS[-1]}" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.5
    done
    log "holder $offset: $(grep -o "holding.*" "$log")"
}
# Holds connections MAIN.. CONNECTIONS in holder processes; sets held_elsewhere.
hold_rest() { # <notify-load arguments: servers, target>...
    held_elsewhere=0
    local offset=$MAIN count
    while [ "$offset" -lt "$CONNECTIONS" ]; do
        count=$((CONNECTIONS - offset < PER_PROCESS ? CONNECTIONS - offset : PER_PROCESS))
        hold "$offset" "$count" "$@"
        held_elsewhere=$((held_elsewhere + $(grep -o "holding [0-9]*" "$WORK/holder-$offset.log" | grep -o "[0-9]*$")))
        offset=$((offset + count))
    done
}
rss() { # resident KiB of each pid given, comma-separated
    local out=() pid
    for pid in "$@"; do out+=("$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")"); done
    join "${out[@]}"
}
rss_before=$(rss "${ENGINE_PIDS[@]}")
hold_rest --engines "$(join "${ENGINES[@]}")"
mkdir -p "$OUT/engine"
load --engines "$(join "${ENGINES[@]}")" --admins "$(join "${ADMINS[@]}")" \
    --pids "$(join "${ENGINE_PIDS[@]}")" --topic "$TOPIC" --database-url "$DB_URL" \
    --connections "$MAIN" --held-elsewhere "$held_elsewhere" --rss-before "$rss_before" \
    --scenarios "$SCENARIOS" \
    --label "notify-engine $(git rev-parse --short HEAD), $INSTANCES instance(s)" \
    --out "$OUT/engine"
cat "$OUT/engine/report.md"
# The engines go before Centrifugo comes: each has the machine to itself.
stop_all
[ "$CENTRIFUGO" != 0 ] || { log "report: $OUT/engine"; exit 0; }

CF_TOPIC="centrifugo-$run"
NOTIFY_KAFKA_TOPIC_PARTITIONS=6 scripts/services.sh topics "$CF_TOPIC" >/dev/null 2>&1
cf_port=$(free_port)
# The consumer waits at most 50 ms for a fetch, like the engine (fetch.wait.max.ms).
cat >"$WORK/centrifugo.json" <<JSON
{
  "http_server": { "address": "127.0.0.1", "port": $cf_port },
  "log": { "level": "error" },
  "health": { "enabled": true },
  "client": { "token": { "hmac_secret_key": "$NOTIFY_AUTH__JWT_SECRET" } },
  "uni_sse": { "enabled": true },
  "http_api": { "key": "load-$run" },
  "consumers": [{
    "name": "load", "enabled": true, "type": "kafka",
    "kafka": {
      "brokers": ["$NOTIFY_KAFKA__BROKERS"], "topics": ["$CF_TOPIC"], "consumer_group": "$run",
      "fetch_max_wait": "50ms",
      "publication_data_mode": { "enabled": true }
    }
  }]
}
JSON
"$CENTRIFUGO_BIN" --config "$WORK/centrifugo.json" >"$WORK/centrifugo.log" 2>&1 &
PIDS+=("$!")
wait_ready "http://127.0.0.1:$cf_port/health" "$WORK/centrifugo.log" Centrifugo
log "Centrifugo $CENTRIFUGO_VERSION: $cf_port, pid ${PIDS[-1]}"
mkdir -p "$OUT/centrifugo"
cf_pid=${PIDS[-1]}
rss_before=$(rss "$cf_pid")
hold_rest --target centrifugo --engines "127.0.0.1:$cf_port"
load --target centrifugo --engines "127.0.0.1:$cf_port" --pids "$cf_pid" --topic "$CF_TOPIC" \
    --connections "$MAIN" --held-elsewhere "$held_elsewhere" --rss-before "$rss_before" \
    --scenarios "$SCENARIOS" \
    --label "Centrifugo $CENTRIFUGO_VERSION (memory engine, uni_sse, Kafka consumer), 1 instance" \
    --compare-with "$OUT/engine" --out "$OUT/centrifugo"
cat "$OUT/centrifugo/report.md" "$OUT/comparison.md"
log "reports: $OUT"
