# shellcheck shell=bash
# A throwaway engine for the client and browser tests: its own database, topics, consumer
# group and ports, the demo's development secret. Sourced by scripts/test.sh after the
# services are up and services.env is loaded.
#
#   prepare_engine NAME    creates its database and topics and writes its configuration; sets
#                          ENGINE_BIN, ENGINE_CONFIG, ENGINE_DATABASE_URL, ENGINE_URL,
#                          ENGINE_ADMIN_URL, ENGINE_TOPIC_PAID, ENGINE_TOPIC_STATUS and exports
#                          what the engine and its tools (token, publish) read; ENGINE_CORS
#                          (quoted origins, comma-separated) becomes http.cors_origins
#   start_engine NAME      prepare_engine, then runs it until consuming (/status); sets ENGINE_PID
#   stop_engine            stops it (also on exit)

start_engine() {
    prepare_engine "$1"
    DATABASE_URL=$ENGINE_DATABASE_URL "$ENGINE_BIN" run >"$ENGINE_DIR/engine.log" 2>&1 &
    ENGINE_PID=$!
    trap stop_engine EXIT
    for _ in $(seq 1 120); do
        # /status `consuming` (/readyz alone says only that it can serve).
        curl -fsS "$ENGINE_ADMIN_URL/status" 2>/dev/null | grep -q '"consuming":true' && return 0
        kill -0 "$ENGINE_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 40 "$ENGINE_DIR/engine.log" >&2
    echo "the test engine did not become ready" >&2
    return 1
}

prepare_engine() {
    local name=$1 run
    run="${name}_$$"
    ENGINE_BIN=${ENGINE_BIN:-$CARGO_TARGET_DIR/debug/notify-engine}
    ENGINE_DIR=$(mktemp -d)
    ENGINE_TOPIC_PAID="order_paid-t-$run"
    ENGINE_TOPIC_STATUS="order_status_updated-t-$run"
    scripts/services.sh topics "$ENGINE_TOPIC_PAID" "$ENGINE_TOPIC_STATUS" >/dev/null 2>&1
    psql "$DATABASE_URL" -qc "CREATE DATABASE test_$run" >/dev/null
    local http admin
    http=$(free_port)
    admin=$(free_port)
    ENGINE_CONFIG=$ENGINE_DIR/engine.toml
    cat >"$ENGINE_CONFIG" <<TOML
[http]
listen = "127.0.0.1:$http"
admin_listen = "127.0.0.1:$admin"
cors_origins = [${ENGINE_CORS:-}]
[kafka]
topics = ["$ENGINE_TOPIC_PAID", "$ENGINE_TOPIC_STATUS"]
group_id = "test-$run"
[database]
url = "${DATABASE_URL%/*}/test_$run"
[plugins]
dir = "plugins/dist"
[email]
templates_dir = "templates"
[smtp]
tls = "none"
TOML
    export NOTIFY_CONFIG=$ENGINE_CONFIG
    export NOTIFY_AUTH__JWT_SECRET=demo-secret-change-me-0123456789abcdef
    export NOTIFY_DEV__MODE=true
    # Seals what instances tell each other (docs/security.md); one instance needs none, but
    # the engine under test runs as deployments do.
    export NOTIFY_CLUSTER__SECRET=test-cluster-secret-test-cluster-secret-01
    # services.env's DATABASE_URL would override the file's database: the engine is started
    # with this one.
    ENGINE_DATABASE_URL="${DATABASE_URL%/*}/test_$run"
    ENGINE_URL="http://127.0.0.1:$http"
    ENGINE_ADMIN_URL="http://127.0.0.1:$admin"
    export ENGINE_BIN ENGINE_DIR ENGINE_CONFIG ENGINE_DATABASE_URL ENGINE_URL ENGINE_ADMIN_URL \
        ENGINE_TOPIC_PAID ENGINE_TOPIC_STATUS
}

stop_engine() {
    if [[ -n ${ENGINE_PID:-} ]]; then
        kill "$ENGINE_PID" 2>/dev/null || true
        wait "$ENGINE_PID" 2>/dev/null || true
        ENGINE_PID=
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
