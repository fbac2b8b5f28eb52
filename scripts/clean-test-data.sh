#!/usr/bin/env bash
# Drops what earlier test and benchmark runs left behind on the running services: their
# databases (test_*, bench_*) and Kafka topics (every test creates its own; hundreds of idle
# partitions slow the broker down). Needs the services' environment (services.env) loaded.
set -euo pipefail
LOG_TAG=clean-test-data
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"

psql "$DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'test\_%' OR datname LIKE 'bench\_%'" |
    while read -r db; do psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null; done
# Each engine database has an API role of its own (notify_api_<database oid>); drop those whose
# database is gone.
psql "$DATABASE_URL" -Atc "SELECT rolname FROM pg_roles WHERE rolname ~ '^notify_api_[0-9]+$'
    AND substr(rolname, 12)::oid NOT IN (SELECT oid FROM pg_database)" |
    while read -r role; do psql "$DATABASE_URL" -qc "DROP ROLE IF EXISTS \"$role\"" >/dev/null; done
# Engine users a failed test left behind (their databases were dropped above).
psql "$DATABASE_URL" -Atc "SELECT rolname FROM pg_roles WHERE rolname LIKE 'notify\_test\_user\_%'" |
    while read -r role; do psql "$DATABASE_URL" -qc "DROP ROLE IF EXISTS \"$role\"" >/dev/null; done
# Best effort: with no topic to delete the tool exits non-zero, which is fine.
"$ROOT/scripts/services.sh" kafka-tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$NOTIFY_KAFKA__BROKERS" \
    --delete --topic 'order_paid-t-.*|order_status_updated-t-.*|bench-.*' >/dev/null 2>&1 || true
