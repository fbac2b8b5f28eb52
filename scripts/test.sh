#!/usr/bin/env bash
# Runs every check and test against the real services (Kafka, PostgreSQL, Mailpit), which
# it starts (and leaves running for the next run; `scripts/services.sh down` stops them).
#
#   scripts/test.sh            formatting, clippy, plugin tests, engine unit + integration tests
#                              (with the Python, JavaScript and cargo-component plugins),
#                              the TypeScript client (unit, and against a real engine), the
#                              example shop (jest, then Chromium against a real engine), then
#                              the chaos suite's short run (scripts/chaos.sh, services of its own)
#   scripts/test.sh e2e        extra arguments go to `cargo test` of the engine (and the chaos
#                              run is left out: a filtered run is a partial one)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '\n[test] %s\n' "$*" >&2; }

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/notify-engine-target}
PLUGINS_TARGET_DIR=${PLUGINS_TARGET_DIR:-$HOME/.cache/notify-engine-plugins-target}

scripts/bootstrap.sh

log "starting services"
scripts/services.sh up
STATE=${NOTIFY_STATE_DIR:-$HOME/.cache/notify-engine/run}
set -a
# shellcheck disable=SC1091
. "$STATE/services.env"
set +a

log "dropping databases and topics left by earlier test runs"
scripts/clean-test-data.sh

log "building the plugins"
CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR scripts/build-plugins.sh

log "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path plugins/Cargo.toml --all -- --check
# The starters' own code (read from stdin, so rustfmt does not follow `mod bindings;` into
# what cargo-component generated).
for starter in plugins/starters/*/src/lib.rs; do
    rustfmt --edition 2024 --check <"$starter" >/dev/null || { echo "rustfmt: $starter is not formatted" >&2; exit 1; }
done

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR cargo clippy --manifest-path plugins/Cargo.toml --all-targets --locked -- -D warnings
for starter in plugins/starters/*/Cargo.toml; do
    CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR/starters cargo clippy --manifest-path "$starter" --target wasm32-wasip2 --locked -- -D warnings
done

log "plugin tests (native)"
CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR cargo test --manifest-path plugins/Cargo.toml --locked

log "engine tests (unit + integration on the real services)"
# --lib --bins --tests: no doc tests (there are none) and no benchmarks, so the run ends on
# the integration tests' summary.
cargo test --workspace --locked --lib --bins --tests "$@"

log "TypeScript client: types against the contracts, unit tests, then against a real engine"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent check-generated && npm test)
cargo build --locked --bin notify-engine
(
    # shellcheck source=scripts/lib/engine.sh
    . scripts/lib/engine.sh
    start_engine client
    export ENGINE_BIN ENGINE_URL ENGINE_TOPIC_PAID
    cd clients/typescript && npm run test:engine
)

log "example shop: component tests, production build, then the browser test (Chromium)"
scripts/bootstrap.sh --with-browser
(cd examples/nextjs-shop && npm ci --no-audit --no-fund --loglevel=error && npm test -- --ci &&
    NEXT_TELEMETRY_DISABLED=1 npx next build)
(
    # shellcheck source=scripts/lib/engine.sh
    . scripts/lib/engine.sh
    SHOP_PORT=$(free_port)
    export SHOP_PORT
    ENGINE_CORS="\"http://127.0.0.1:$SHOP_PORT\""
    prepare_engine shop
    cd examples/nextjs-shop && node tests/browser.mjs
)

if (($# > 0)); then
    log "chaos suite: not run, since cargo test was given arguments ($*); scripts/chaos.sh runs it"
else
    log "chaos suite, short run: faults on services of its own, then the checker"
    scripts/chaos.sh short
fi
