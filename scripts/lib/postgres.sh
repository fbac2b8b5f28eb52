# shellcheck shell=bash
# PostgreSQL 15 from Debian's packages, as a private throwaway cluster: its own
# data dir, TCP on 127.0.0.1 only, socket in its own dir. Debian's system
# cluster (if any) and pg_ctlcluster are not involved.
#
# Expects from services.sh: STATE, PG_PORT, SERVICE_TIMEOUT.

PG_MAJOR=15
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin
PG_USER=postgres
PG_BASE=""   # decided by _pg_choose_base (see there for why it may not be under $STATE)

pg_url() { printf 'postgres://notify:notify@127.0.0.1:%s/notify\n' "$PG_PORT"; }

# _pg_as_postgres CMD...: run CMD as the postgres user. PostgreSQL refuses to
# run as root. setpriv (unlike su/runuser) execs without forking, so the pid
# recorded by start_detached is the postmaster's own. env -i keeps root's
# environment (PG* variables, odd locales) out of the server.
_pg_as_postgres() {
    env -i PATH=/usr/bin:/bin HOME="$PG_BASE" LC_ALL=C \
        setpriv --reuid="$PG_USER" --regid="$PG_USER" --init-groups "$@"
}

# The postgres user must be able to reach its data dir. The default state dir
# lives under /root, which is mode 0700, and loosening /root's permissions is
# not this script's business. So when postgres cannot traverse to $STATE, the
# cluster lives under /var/tmp instead, keyed by the state dir path, and
# $STATE/postgres is a symlink to it (so `ls $STATE` still shows everything).
_pg_choose_base() {
    mkdir -p "$STATE"
    if [[ -L $STATE/postgres ]]; then
        PG_BASE=$(readlink -f "$STATE/postgres")
    elif _pg_as_postgres test -x "$STATE" 2>/dev/null; then
        PG_BASE="$STATE/postgres"
    else
        PG_BASE="/var/tmp/notify-engine-pg-$(printf '%s' "$STATE" | sha256sum | cut -c1-12)"
        ln -sfn "$PG_BASE" "$STATE/postgres"
    fi
}

# For status/stop: never create anything, just follow what _pg_choose_base did.
_pg_pick_base() {
    [[ -n $PG_BASE ]] && return 0
    if [[ -L $STATE/postgres ]]; then
        PG_BASE=$(readlink -f "$STATE/postgres")
    else
        PG_BASE="$STATE/postgres"
    fi
}

pg_prepare() {
    if [[ ! -x $PG_BIN/postgres || ! -x $PG_BIN/psql ]]; then
        apt_install "postgresql-$PG_MAJOR" "postgresql-client-$PG_MAJOR"
    fi
    [[ -x $PG_BIN/postgres ]] || die "postgres: $PG_BIN/postgres missing after install"
    ensure_cmd setpriv util-linux
    if ! id -u "$PG_USER" >/dev/null 2>&1; then
        log "postgres: creating system user $PG_USER"
        useradd --system --user-group --home-dir /var/lib/postgresql \
            --shell /usr/sbin/nologin "$PG_USER"
    fi
    _pg_choose_base
}

pg_pid() { _pg_pick_base; pid_of postgres "$PG_BASE/data"; }

_pg_init_cluster() {
    mkdir -p "$PG_BASE"
    chown "$PG_USER:$PG_USER" "$PG_BASE"
    chmod 700 "$PG_BASE"
    [[ -f $PG_BASE/data/PG_VERSION ]] && return 0
    log "postgres: initdb in $PG_BASE/data"
    rm -rf "$PG_BASE/data"
    # trust on the unix socket only (the socket dir is private to postgres and
    # root); TCP requires a password. No locale: tests must not depend on the
    # machine's locale settings.
    (cd "$PG_BASE" && _pg_as_postgres "$PG_BIN/initdb" -D "$PG_BASE/data" -U postgres \
        --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --no-locale --no-sync) >>"$STATE/logs/postgres.log" 2>&1 ||
        fail_with_log postgres "postgres: initdb failed"
}

pg_start() {
    _pg_pick_base
    if pg_pid >/dev/null; then
        log "postgres: already running (pid $(pg_pid))"
        return 0
    fi
    require_port_free postgres "$PG_PORT"
    mkdir -p "$STATE/logs"
    _pg_init_cluster
    install -d -o "$PG_USER" -g "$PG_USER" -m 700 "$PG_BASE/sock"
    # A postmaster that was SIGKILLed leaves postmaster.pid behind; postgres
    # itself handles a stale one, so nothing to clean up here.
    log "postgres: starting PostgreSQL $PG_MAJOR on 127.0.0.1:$PG_PORT (data $PG_BASE/data)"
    # Settings go on the command line rather than into postgresql.conf so that a
    # port override applies to an existing cluster too.
    # fsync/synchronous_commit/full_page_writes off: this is a throwaway test
    # cluster; losing it in a crash is fine, slow commits are not. The chaos suite sets
    # NOTIFY_PG_SYNCHRONOUS_COMMIT=on: an immediate shutdown drops WAL not yet written, so
    # without it a commit the engine was told of (and acted on) can vanish. fsync may stay off
    # there: the kernel survives a postmaster's death, and keeps what was written.
    (cd "$PG_BASE" && start_detached postgres \
        env -i PATH=/usr/bin:/bin HOME="$PG_BASE" LC_ALL=C \
        setpriv --reuid="$PG_USER" --regid="$PG_USER" --init-groups \
        "$PG_BIN/postgres" -D "$PG_BASE/data" \
        -c port="$PG_PORT" \
        -c listen_addresses=127.0.0.1 \
        -c unix_socket_directories="$PG_BASE/sock" \
        -c max_connections=200 \
        -c shared_buffers=128MB \
        -c fsync=off \
        -c synchronous_commit="${NOTIFY_PG_SYNCHRONOUS_COMMIT:-off}" \
        -c full_page_writes=off \
        -c logging_collector=off \
        -c log_line_prefix='%m [%p] %q%u@%d ')
}

# Create/refresh role and database. Run on every `up`: cheap, and repairs a
# cluster where someone dropped them.
_pg_bootstrap() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_BASE/sock" -p "$PG_PORT" -U postgres -d postgres <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'notify') THEN
    -- Superuser because the test suites create and drop databases.
    CREATE ROLE notify LOGIN SUPERUSER PASSWORD 'notify';
  ELSE
    ALTER ROLE notify LOGIN SUPERUSER PASSWORD 'notify';
  END IF;
END
$$;
SELECT 'CREATE DATABASE notify OWNER notify'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'notify')\gexec
SQL
}

_pg_check_notify_login() {
    PGPASSWORD=notify PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -qtA \
        -h 127.0.0.1 -p "$PG_PORT" -U notify -d notify -c 'SELECT 1' 2>/dev/null | grep -qx 1
}

pg_wait() {
    _pg_pick_base
    local deadline=$((SECONDS + SERVICE_TIMEOUT))
    while ((SECONDS < deadline)); do
        pg_pid >/dev/null || fail_with_log postgres "postgres: process exited during startup"
        if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; then
            _pg_bootstrap >>"$STATE/logs/postgres.log" 2>&1 ||
                fail_with_log postgres "postgres: creating role/database notify failed"
            _pg_check_notify_login ||
                fail_with_log postgres "postgres: accepting connections but login as notify failed"
            log "postgres: ready"
            return 0
        fi
        sleep 0.5
    done
    fail_with_log postgres "postgres: not ready after ${SERVICE_TIMEOUT}s (port $PG_PORT)"
}

pg_stop() { # [immediate]
    _pg_pick_base
    local pid
    if pid=$(pg_pid); then
        if [[ ${1:-} == immediate ]]; then
            # SIGQUIT = "immediate" shutdown (pg_ctl -m immediate): every backend exits at
            # once, no checkpoint; the next start runs crash recovery from the WAL.
            stop_pid postgres "$pid" QUIT 30
        else
            # SIGINT = "fast" shutdown: roll back open transactions, checkpoint, exit.
            stop_pid postgres "$pid" INT 30
        fi
    else
        rm -f "$(pidfile_of postgres)"
        log "postgres: not running"
    fi
}

pg_status() {
    _pg_pick_base
    local pid
    if pid=$(pg_pid); then
        if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; then
            printf '%-9s running  pid %-7s 127.0.0.1:%s (data %s)\n' postgres "$pid" "$PG_PORT" "$PG_BASE/data"
        else
            printf '%-9s starting pid %-7s not accepting connections yet\n' postgres "$pid"
        fi
        return 0
    fi
    printf '%-9s stopped\n' postgres
    return 1
}
