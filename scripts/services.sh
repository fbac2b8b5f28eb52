#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Local backing services for the notification engine, without Docker:
#   Kafka 4.x (KRaft, from Maven Central jars), PostgreSQL 15 (Debian package,
#   private throwaway cluster) and Mailpit (built from its Go module source,
#   web UI included: see lib/mailpit.sh).
# Everything listens on 127.0.0.1 only. Run `scripts/services.sh help`.
set -euo pipefail

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=services
# shellcheck source=lib/env.sh
. "$SCRIPTS_DIR/lib/env.sh"

STATE=$NOTIFY_STATE_DIR
CACHE_ROOT=${NOTIFY_CACHE_DIR:-$HOME/.cache/notify-engine}
KAFKA_PORT=${NOTIFY_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${NOTIFY_KAFKA_CONTROLLER_PORT:-19093}
PG_PORT=${NOTIFY_PG_PORT:-15432}
SMTP_PORT=${NOTIFY_SMTP_PORT:-11025}
MAILPIT_HTTP_PORT=${NOTIFY_MAILPIT_HTTP_PORT:-18025}
# Per service. Generous because a cold JVM on a busy 2-core box is slow.
SERVICE_TIMEOUT=${NOTIFY_SERVICES_TIMEOUT:-120}
# Paths end up in pid-file markers and on the postgres command line: make them
# absolute before anything derives paths from them (env.sh did so for STATE).
[[ $CACHE_ROOT == /* ]] || CACHE_ROOT="$PWD/$CACHE_ROOT"

# shellcheck source=lib/common.sh
. "$SCRIPTS_DIR/lib/common.sh"
# shellcheck source=lib/kafka.sh
. "$SCRIPTS_DIR/lib/kafka.sh"
# shellcheck source=lib/postgres.sh
. "$SCRIPTS_DIR/lib/postgres.sh"
# shellcheck source=lib/mailpit.sh
. "$SCRIPTS_DIR/lib/mailpit.sh"

ENV_FILE="$STATE/services.env"

usage() {
    cat <<EOF
Usage: scripts/services.sh COMMAND [ARGS]

Commands:
  up                 install what is missing, start Kafka, PostgreSQL and Mailpit,
                     wait until each answers, write $ENV_FILE
  down               stop all three (graceful, then SIGKILL after a timeout)
  restart            down, then up
  clean              down, then delete all service data (Kafka topics, databases, mail);
                     keeps the downloaded/built Kafka jars and Mailpit binary
  status             show which services are running (exit 3 if any is not)
  stop SERVICE [--immediate]
                     stop one of kafka, postgres, mailpit (graceful; --immediate: PostgreSQL's
                     immediate shutdown, no checkpoint, crash recovery at the next start)
  start SERVICE      start one of kafka, postgres, mailpit and wait until it answers
  env                print the services.env file (path as a comment, then KEY=VALUE lines)
  topics TOPIC...    create Kafka topics (${NOTIFY_KAFKA_TOPIC_PARTITIONS:-3} partitions) unless they exist
  kafka-tool CLASS [ARGS...]
                     run a Kafka CLI class from the same jars, e.g.
                       kafka-tool org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:$KAFKA_PORT --list
                       kafka-tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server 127.0.0.1:$KAFKA_PORT --topic T
                       kafka-tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server 127.0.0.1:$KAFKA_PORT --topic T --from-beginning

Environment (defaults in brackets):
  NOTIFY_STATE_DIR          data, logs, pid files   [\$HOME/.cache/notify-engine/run]
  NOTIFY_CACHE_DIR          Kafka jars, Mailpit binary [\$HOME/.cache/notify-engine]
  NOTIFY_KAFKA_PORT         [19092]    NOTIFY_KAFKA_CONTROLLER_PORT [19093]
  NOTIFY_PG_PORT            [15432]
  NOTIFY_SMTP_PORT          [11025]    NOTIFY_MAILPIT_HTTP_PORT [18025]
  NOTIFY_SERVICES_TIMEOUT   readiness timeout per service, seconds [120]
  NOTIFY_PG_SYNCHRONOUS_COMMIT  PostgreSQL's synchronous_commit [off; the chaos suite: on]
  NOTIFY_KAFKA_HEAP_OPTS    [-Xms256m -Xmx512m]
  NOTIFY_MAILPIT_KEEP       1: keep Mailpit's mail across its restarts [0: every start empties it]
  NOTIFY_MAILPIT_MAX        messages Mailpit keeps [5000]
EOF
}

validate_config() {
    local p seen=" "
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$PG_PORT" "$SMTP_PORT" "$MAILPIT_HTTP_PORT"; do
        [[ $p =~ ^[0-9]+$ && $p -ge 1 && $p -le 65535 ]] || die "invalid port '$p'"
        [[ $seen != *" $p "* ]] || die "port $p is configured for two services"
        seen+="$p "
    done
    [[ $SERVICE_TIMEOUT =~ ^[0-9]+$ ]] || die "NOTIFY_SERVICES_TIMEOUT must be a number of seconds"
    mkdir -p "$STATE" "$CACHE_ROOT"
}

# Serialise up/down/topics: two concurrent `up`s would otherwise race to
# format Kafka / initdb the same directories. (start_detached closes fd 9 so
# the daemons do not inherit the lock.)
take_lock() {
    exec 9>"$STATE/.lock"
    flock -w 900 9 || die "another scripts/services.sh is still running (lock $STATE/.lock)"
}

write_env_file() {
    local tmp="$ENV_FILE.tmp.$$"
    cat >"$tmp" <<EOF
NOTIFY_KAFKA__BROKERS=127.0.0.1:$KAFKA_PORT
DATABASE_URL=$(pg_url)
NOTIFY_SMTP__HOST=127.0.0.1
NOTIFY_SMTP__PORT=$SMTP_PORT
MAILPIT_URL=$(mailpit_url)
EOF
    mv -f "$tmp" "$ENV_FILE"
}

cmd_up() {
    local t0=$SECONDS
    take_lock
    # Start each service as soon as it is installed, so Kafka and PostgreSQL
    # boot while Mailpit compiles on a cold machine; then wait for all three.
    kafka_prepare
    kafka_start
    pg_prepare
    pg_start
    mailpit_prepare
    mailpit_start
    kafka_wait
    pg_wait
    mailpit_wait
    write_env_file
    printf '\nServices are up (%ss):\n' "$((SECONDS - t0))"
    printf '  %-22s %s\n' \
        "Kafka $(kafka_version) (KRaft)" "bootstrap 127.0.0.1:$KAFKA_PORT, controller 127.0.0.1:$KAFKA_CONTROLLER_PORT" \
        "PostgreSQL $PG_MAJOR" "$(pg_url)" \
        "Mailpit $MAILPIT_VERSION" "SMTP 127.0.0.1:$SMTP_PORT (any AUTH accepted, no TLS)" \
        "Mailpit web UI" "$(mailpit_url)/  (API $(mailpit_url)/api/v1/messages)" \
        "env file" "$ENV_FILE  (load: set -a; . $ENV_FILE; set +a)" \
        "logs" "$STATE/logs/"
}

cmd_down() {
    take_lock
    mailpit_stop
    kafka_stop
    pg_stop
    rm -f "$ENV_FILE"
}

# Not just `rm -rf $STATE`: the PostgreSQL data may live outside it (see
# _pg_choose_base), reachable only through the $STATE/postgres symlink.
cmd_clean() {
    cmd_down
    _pg_pick_base
    if [[ -L $STATE/postgres && $PG_BASE == /var/tmp/notify-engine-pg-* ]]; then
        rm -rf "$PG_BASE"
    fi
    log "removing $STATE"
    rm -rf "$STATE"
}

cmd_status() {
    local rc=0
    kafka_status || rc=3
    pg_status || rc=3
    mailpit_status || rc=3
    return $rc
}

# One service at a time, for the chaos suite (scripts/chaos.sh) and for operators.
cmd_stop_one() {
    local service=${1:-} mode=${2:-}
    [[ -z $mode || ( $service == postgres && $mode == --immediate ) ]] ||
        die "usage: services.sh stop kafka|postgres|mailpit (--immediate: postgres only)"
    take_lock
    case $service in
    kafka) kafka_stop ;;
    postgres) pg_stop "${mode#--}" ;;
    mailpit) mailpit_stop ;;
    *) die "usage: services.sh stop kafka|postgres|mailpit [--immediate]" ;;
    esac
}

cmd_start_one() {
    take_lock
    case ${1:-} in
    kafka) kafka_prepare; kafka_start; kafka_wait ;;
    postgres) pg_prepare; pg_start; pg_wait ;;
    mailpit) mailpit_prepare; mailpit_start; mailpit_wait ;;
    *) die "usage: services.sh start kafka|postgres|mailpit" ;;
    esac
}

cmd_env() {
    [[ -f $ENV_FILE ]] || die "$ENV_FILE does not exist; run 'scripts/services.sh up' first"
    printf '# %s\n' "$ENV_FILE"
    cat "$ENV_FILE"
}

cmd_kafka_tool() {
    (($# > 0)) || die "usage: services.sh kafka-tool CLASS [ARGS...]"
    kafka_prepare
    kafka_tool "$@"
}

main() {
    local cmd=${1:-help}
    (($# > 0)) && shift
    case $cmd in
    help | -h | --help) usage; return 0 ;;
    esac
    validate_config
    case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    restart) cmd_down && cmd_up ;;
    clean) cmd_clean ;;
    status) cmd_status ;;
    stop) cmd_stop_one "$@" ;;
    start) cmd_start_one "$@" ;;
    env) cmd_env ;;
    topics) take_lock; kafka_prepare; kafka_create_topics "$@" ;;
    kafka-tool) cmd_kafka_tool "$@" ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
    esac
}

main "$@"
