# Starts a throwaway engine for the client and browser tests: its own database, topics,
# consumer group and ports, the demo's development secret. Sourced by scripts/test.sh after
# the services are up and services.env is loaded.
#
#   start_engine NAME      sets ENGINE_URL, ENGINE_ADMIN_URL, ENGINE_PID, ENGINE_CONFIG,
#                          ENGINE_TOPIC_PAID, ENGINE_TOPIC_STATUS; exports what the engine's
#                          own tools (token, publish) need
#   stop_engine            stops it (also on exit)

start_engine() {
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
    # services.env's DATABASE_URL would override the file's database.
    DATABASE_URL="${DATABASE_URL%/*}/test_$run" "$ENGINE_BIN" run >"$ENGINE_DIR/engine.log" 2>&1 &
    ENGINE_PID=$!
    ENGINE_URL="http://127.0.0.1:$http"
    ENGINE_ADMIN_URL="http://127.0.0.1:$admin"
    trap stop_engine EXIT
    for _ in $(seq 1 120); do
        curl -fsS "$ENGINE_ADMIN_URL/readyz" >/dev/null 2>&1 && return 0
        kill -0 "$ENGINE_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 40 "$ENGINE_DIR/engine.log" >&2
    echo "the test engine did not become ready" >&2
    return 1
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
