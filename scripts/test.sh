#!/usr/bin/env bash
# Runs every check and test against the real services (Kafka, PostgreSQL, Mailpit), which
# it starts (and leaves running for the next run; `scripts/services.sh down` stops them).
# The cheap checks come first (formatting, then clippy, while the services start and the
# plugins build in the background). Every phase's time is printed when it ends, and in a
# table at the end (scripts/lib/phases.sh).
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

# shellcheck source=scripts/lib/phases.sh
. scripts/lib/phases.sh
trap phases_summary EXIT

phase bootstrap "the system packages the build needs"
scripts/bootstrap.sh

# The cheap check comes first: a formatting slip fails in seconds, before anything starts.
phase fmt "cargo fmt --check (engine, plugins, starters)"
cargo fmt --all -- --check
cargo fmt --manifest-path plugins/Cargo.toml --all -- --check
# The starters' own code (read from stdin, so rustfmt does not follow `mod bindings;` into
# what cargo-component generated).
for starter in plugins/starters/*/src/lib.rs; do
    rustfmt --edition 2024 --check <"$starter" >/dev/null || { echo "rustfmt: $starter is not formatted" >&2; exit 1; }
done

# Kafka, PostgreSQL and Mailpit come up while clippy compiles: on a cold machine that is two
# minutes of downloads, a Go and npm build of Mailpit and a JVM starting, which need not wait
# for a compiler.
BACKGROUND_KEEP=1 background services scripts/services.sh up

# The plugins build beside the engine's clippy too: its guest toolchains are downloads and
# single-threaded componentize steps, and its cargo runs have serial tails (a link, one last
# crate) where clippy's compile fills the second core. In their own target directory, so
# neither waits for the other's lock.
background plugins scripts/build-plugins.sh

phase clippy "cargo clippy (engine and load harness)"
cargo clippy --workspace --all-targets --locked -- -D warnings

phase plugins "waiting for the plugins' build"
wait_background plugins

# After the build: cargo component generates the starters' bindings, which clippy reads.
phase plugins-clippy "cargo clippy (plugins, the cargo-component starters)"
CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR cargo clippy --manifest-path plugins/Cargo.toml --all-targets --locked -- -D warnings
for starter in plugins/starters/*/Cargo.toml; do
    CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR/starters cargo clippy --manifest-path "$starter" --target wasm32-wasip2 --locked -- -D warnings
done

phase plugin-tests "plugin tests (native)"
CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR cargo test --manifest-path plugins/Cargo.toml --locked

phase services "waiting for the services"
wait_background services
load_services_env

phase clean "dropping databases and topics left by earlier test runs"
scripts/clean-test-data.sh

phase engine-tests "engine tests (unit + integration on the real services)"
# --lib --bins --tests: no doc tests (there are none) and no benchmarks, so the run ends on
# the integration tests' summary.
cargo test --workspace --locked --lib --bins --tests "$@"

phase client "TypeScript client: types against the contracts, unit tests, then against a real engine"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent check-generated && npm test)
# The engine binary the tests above built (`--tests`: the same dependency features, so no
# second build of the tree; it also links the load harness for the chaos run below).
cargo build --locked --workspace --bins --tests
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
