#!/usr/bin/env bash
# Benchmarks on the real services (release build): per-guest plugin call cost (Rust, Python,
# JavaScript; fresh against warm instances; bench "plugins"), pipeline events/s,
# produce → SSE latency (bench "throughput"), and inbox list / unread-count latency with a
# million notifications (bench "inbox"), and produce → toast on screen in Chromium through the
# example shop (bench "shop"). BENCH=plugins, BENCH=throughput, BENCH=inbox or BENCH=shop runs one of them.
# BENCH_EVENTS sets the backlog size (default 20000), BENCH_TENANTS how many tenants (lanes)
# share it (default 1); BENCH_INBOX_ROWS / BENCH_INBOX_USERS the inbox table (1000000 / 10000).
# Figures go to docs/benchmarks.md.
set -euo pipefail
LOG_TAG=bench
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$ROOT"
scripts/bootstrap.sh
scripts/services.sh up
load_services_env
scripts/clean-test-data.sh
scripts/build-plugins.sh
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -m); date: $(date -u +%Y-%m-%d)"
for bench in ${BENCH:-plugins throughput inbox shop}; do
    if [[ $bench == shop ]]; then
        scripts/bootstrap.sh --with-browser
        cargo build --release --locked --bin notify-engine
        (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
        (cd examples/nextjs-shop && npm ci --no-audit --no-fund --loglevel=error &&
            NEXT_TELEMETRY_DISABLED=1 npx next build >/dev/null)
        (
            # shellcheck source=scripts/lib/engine.sh
            . scripts/lib/engine.sh
            ENGINE_BIN=$CARGO_TARGET_DIR/release/notify-engine
            SHOP_PORT=$(free_port)
            export SHOP_PORT
            ENGINE_CORS="\"http://127.0.0.1:$SHOP_PORT\""
            prepare_engine bench
            cd examples/nextjs-shop && node tests/bench.mjs
        )
        continue
    fi
    RUST_LOG=${RUST_LOG:-warn} cargo bench --locked --bench "$bench"
done
