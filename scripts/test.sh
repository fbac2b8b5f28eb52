#!/usr/bin/env bash
# Runs every check and test against the real services (Kafka, PostgreSQL, Mailpit), which
# it starts (and leaves running for the next run; `scripts/services.sh down` stops them).
# The cheap checks (formatting, clippy) run before the services start; every phase's time is
# printed when it ends and in a table at the end.
#
#   scripts/test.sh            formatting, clippy, plugin tests, engine unit + integration tests
#                              (with the Python, JavaScript and cargo-component plugins),
#                              the TypeScript client (unit, and against a real engine), the
#                              example shop (jest, then Chromium against a real engine), then
#                              the chaos suite's short run (scripts/chaos.sh, services of its own)
#   scripts/test.sh e2e        extra arguments go to `cargo test` of the engine (and the chaos
#                              run is left out: a filtered run is a partial one)
set -euo pipefail
LOG_TAG=test LOG_GAP=1
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$ROOT"

# phase NAME WHAT: closes the running phase (prints "[test] NAME: 83 s") and starts the next;
# the summary at exit (on failure too) lists every phase's seconds, so a slow run says where
# its minutes went.
PHASES=() PHASE="" PHASE_T0=$SECONDS
phase() {
    phase_end
    PHASE=$1 PHASE_T0=$SECONDS
    shift
    log "$PHASE: $*"
}
phase_end() {
    [[ -n $PHASE ]] || return 0
    PHASES+=("$PHASE $((SECONDS - PHASE_T0))")
    log "$PHASE: $((SECONDS - PHASE_T0)) s"
    PHASE=""
}
summary() {
    local status=$? line
    phase_end
    {
        printf '\n[test] %s after %d s; seconds per phase:\n' "$( ((status == 0)) && echo passed || echo FAILED)" "$SECONDS"
        for line in "${PHASES[@]}"; do printf '  %-20s %6d\n' "${line% *}" "${line##* }"; done
    } >&2
}
trap summary EXIT

phase bootstrap "the system packages the build needs"
scripts/bootstrap.sh

# The cheap checks come first: a formatting slip fails in seconds, not after the services
# and the plugins.
phase fmt "cargo fmt --check (engine, plugins, starters)"
cargo fmt --all -- --check
cargo fmt --manifest-path plugins/Cargo.toml --all -- --check
# The starters' own code (read from stdin, so rustfmt does not follow `mod bindings;` into
# what cargo-component generated).
for starter in plugins/starters/*/src/lib.rs; do
    rustfmt --edition 2024 --check <"$starter" >/dev/null || { echo "rustfmt: $starter is not formatted" >&2; exit 1; }
done

phase clippy "cargo clippy (engine and load harness, plugins)"
cargo clippy --workspace --all-targets --locked -- -D warnings
CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR cargo clippy --manifest-path plugins/Cargo.toml --all-targets --locked -- -D warnings

phase services "starting services"
scripts/services.sh up
load_services_env

phase clean "dropping databases and topics left by earlier test runs"
scripts/clean-test-data.sh

phase plugins "building the plugins"
scripts/build-plugins.sh

# After the build: cargo component generates the starters' bindings, which clippy reads.
phase starters-clippy "cargo clippy (the cargo-component starters)"
for starter in plugins/starters/*/Cargo.toml; do
    CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR/starters cargo clippy --manifest-path "$starter" --target wasm32-wasip2 --locked -- -D warnings
done

phase plugin-tests "plugin tests (native)"
CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR cargo test --manifest-path plugins/Cargo.toml --locked

phase engine-tests "engine tests (unit + integration on the real services)"
# --lib --bins --tests: no doc tests (there are none) and no benchmarks, so the run ends on
# the integration tests' summary.
cargo test --workspace --locked --lib --bins --tests "$@"

phase client "TypeScript client: types against the contracts, unit tests, then against a real engine"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent check-generated && npm test)
cargo build --locked --bin notify-engine
(
    # shellcheck source=scripts/lib/engine.sh
    . scripts/lib/engine.sh
    start_engine client
    export ENGINE_BIN ENGINE_URL ENGINE_TOPIC_PAID
    cd clients/typescript && npm run test:engine
)

phase shop "example shop: component tests, production build, then the browser test (Chromium)"
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
    phase_end
    log "chaos suite: not run, since cargo test was given arguments ($*); scripts/chaos.sh runs it"
else
    phase chaos "chaos suite, short run: faults on services of its own, then the checker"
    scripts/chaos.sh short
fi
