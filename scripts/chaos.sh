#!/usr/bin/env bash
# The chaos suite, one command: a ledger of events produced across tenants and users, real
# faults on the engines and their services (SIGKILL, the broker and PostgreSQL stopped, SMTP
# down, a rebalance storm, a plugin that traps), SSE clients that reconnect and stall, then a
# checker: lost, duplicated or misdelivered notifications, emails and stream frames.
#
#   scripts/chaos.sh                 # the short variant (CI runs it from scripts/test.sh)
#   scripts/chaos.sh full            # 20 SIGKILLs per kill phase, minutes of SMTP outage
#   CHAOS_SEED=1764250000123 scripts/chaos.sh full      # replays a run's schedule
#   CHAOS_PHASES=kill-one,postgres scripts/chaos.sh     # some phases only
#
# It runs on services of its own (NOTIFY_STATE_DIR=$HOME/.cache/notify-engine/chaos, ports
# 29092/29093 Kafka, 25432 PostgreSQL, 21025/28025 Mailpit), since it stops and restarts them,
# with PostgreSQL's synchronous_commit on (see docs/guarantees.md) and Mailpit keeping its
# mail across restarts. They stay up afterwards, like the test services:
#   NOTIFY_STATE_DIR=$HOME/.cache/notify-engine/chaos scripts/services.sh down
#
# Knobs: CHAOS_SEED, CHAOS_PHASES, CHAOS_RATE (events/s, 200), CHAOS_KILLS, CHAOS_BUILD
# (debug for short, release for full), CHAOS_OUT (the run's directory; default
# ~/.cache/notify-engine/chaos-runs/<UTC time>-<profile>). The run's database is kept until
# the next run, so `notify-chaos --check-only` can check it again (the command is printed).
set -euo pipefail
LOG_TAG=chaos
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
cd "$ROOT"

PROFILE=${1:-short}
[[ $PROFILE == short || $PROFILE == full ]] || { log "usage: scripts/chaos.sh [short|full]"; exit 2; }
BUILD=${CHAOS_BUILD:-$([[ $PROFILE == full ]] && echo release || echo debug)}
OUT=${CHAOS_OUT:-$HOME/.cache/notify-engine/chaos-runs/$(date -u +%Y%m%dT%H%M%SZ)-$PROFILE}

export NOTIFY_STATE_DIR=${CHAOS_STATE_DIR:-$HOME/.cache/notify-engine/chaos}
export NOTIFY_KAFKA_PORT=${CHAOS_KAFKA_PORT:-29092}
export NOTIFY_KAFKA_CONTROLLER_PORT=${CHAOS_KAFKA_CONTROLLER_PORT:-29093}
export NOTIFY_PG_PORT=${CHAOS_PG_PORT:-25432}
export NOTIFY_SMTP_PORT=${CHAOS_SMTP_PORT:-21025}
export NOTIFY_MAILPIT_HTTP_PORT=${CHAOS_MAILPIT_HTTP_PORT:-28025}
export NOTIFY_PG_SYNCHRONOUS_COMMIT=on
export NOTIFY_MAILPIT_KEEP=1 NOTIFY_MAILPIT_MAX=1000000

scripts/bootstrap.sh
scripts/services.sh up >&2
load_services_env

if [[ $BUILD == release ]]; then
    cargo build --release --locked -p notify-engine --bin notify-engine
    cargo build --release --locked -p notify-load --bin notify-chaos
else
    # The debug binaries as `cargo test --workspace` builds them: one invocation with the test
    # targets in it resolves the dependencies' features as the tests do (dev-dependencies turn
    # on e.g. tokio's test-util), so after scripts/test.sh's engine tests this only links the
    # load harness. Built as `-p notify-engine`, then `-p notify-load`, each resolved other
    # features (from the tests' and from each other: tokio, hyper), and each compiled a large
    # part of the dependency tree again.
    cargo build --locked --workspace --bins --tests
fi
scripts/build-plugins.sh --workspace-only >&2
BIN=$CARGO_TARGET_DIR/$BUILD

# One database and topic per run; the previous runs' go first.
for db in $(psql "$DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'chaos\_%'"); do
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
done
run="chaos_$$"
DB_URL="${DATABASE_URL%/*}/$run"
TOPIC="order_paid-$run"
psql "$DATABASE_URL" -qc "CREATE DATABASE $run" >/dev/null
NOTIFY_KAFKA_TOPIC_PARTITIONS=6 scripts/services.sh topics "$TOPIC" >/dev/null 2>&1
curl -fsS -X DELETE "$MAILPIT_URL/api/v1/messages" >/dev/null
mkdir -p "$OUT"

args=(
    --run-dir "$OUT" --profile "$PROFILE" --database-url "$DB_URL" --topic "$TOPIC"
    --engine-bin "$BIN/notify-engine" --services "$ROOT/scripts/services.sh"
    --rate "${CHAOS_RATE:-200}"
)
[[ -n ${CHAOS_SEED:-} ]] && args+=(--seed "$CHAOS_SEED")
[[ -n ${CHAOS_PHASES:-} ]] && args+=(--phases "$CHAOS_PHASES")
[[ -n ${CHAOS_KILLS:-} ]] && args+=(--kills "$CHAOS_KILLS")
log "run $run: $OUT"
status=0
"$BIN/notify-chaos" "${args[@]}" || status=$?
log "report: $OUT/report.md; check again: $BIN/notify-chaos --check-only --run-dir $OUT --database-url $DB_URL --topic $TOPIC --engine-bin $BIN/notify-engine --services scripts/services.sh (with $NOTIFY_STATE_DIR/services.env loaded)"
exit $status
