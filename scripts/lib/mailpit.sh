# shellcheck shell=bash
# Mailpit (SMTP sink + HTTP API), built from source with `go install` because
# release binaries cannot be downloaded on these machines (only package
# registries, including the Go module proxy, are reachable).
#
# Expects from services.sh: STATE, CACHE_ROOT, SMTP_PORT, MAILPIT_HTTP_PORT,
# SERVICE_TIMEOUT.

MAILPIT_VERSION=v1.33.1
MAILPIT_MODULE=github.com/axllent/mailpit
MAILPIT_BIN="$CACHE_ROOT/bin/mailpit"
MAILPIT_DIR="$STATE/mailpit"
MAILPIT_DB="$MAILPIT_DIR/mailpit.db"

mailpit_url() { printf 'http://127.0.0.1:%s\n' "$MAILPIT_HTTP_PORT"; }

# A plain `go install` binary reports version "dev" (upstream sets it via
# -ldflags), so the built version is tracked in a stamp file next to it.
_mailpit_built_version() { cat "$MAILPIT_BIN.version" 2>/dev/null || true; }

mailpit_prepare() {
    ensure_cmd curl curl
    if [[ -x $MAILPIT_BIN && $(_mailpit_built_version) == "$MAILPIT_VERSION" ]]; then
        return 0
    fi
    command -v go >/dev/null 2>&1 ||
        die "mailpit: Go is needed to build Mailpit $MAILPIT_VERSION (Debian's golang-go is too old for it; use the Go toolchain that ships with this machine image)"
    log "mailpit: building $MAILPIT_MODULE@$MAILPIT_VERSION with go install (takes a minute or two on a cold cache)"
    local t0=$SECONDS tmpbin="$CACHE_ROOT/bin/.tmp.$$"
    rm -rf "$tmpbin"
    mkdir -p "$tmpbin"
    # nice: this shares 2 cores with whatever else the developer is compiling.
    # CGO_ENABLED=0: Mailpit's SQLite is pure Go, so no C toolchain is needed.
    if ! GOBIN="$tmpbin" CGO_ENABLED=0 nice -n 10 go install -trimpath \
        -ldflags "-s -w -X $MAILPIT_MODULE/config.Version=$MAILPIT_VERSION" \
        "$MAILPIT_MODULE@$MAILPIT_VERSION" >&2; then
        rm -rf "$tmpbin"
        die "mailpit: go install failed (see output above)"
    fi
    mv -f "$tmpbin/mailpit" "$MAILPIT_BIN"
    rm -rf "$tmpbin"
    printf '%s\n' "$MAILPIT_VERSION" >"$MAILPIT_BIN.version"
    log "mailpit: built in $((SECONDS - t0))s -> $MAILPIT_BIN"
}

mailpit_pid() { pid_of mailpit "$MAILPIT_DB"; }

_mailpit_http_ok() {
    curl -fsS -o /dev/null --max-time 3 "$(mailpit_url)$1" 2>/dev/null
}

mailpit_healthy() {
    port_open "$SMTP_PORT" && _mailpit_http_ok /readyz && _mailpit_http_ok /api/v1/info
}

mailpit_start() {
    if mailpit_pid >/dev/null; then
        log "mailpit: already running (pid $(mailpit_pid))"
        return 0
    fi
    require_port_free mailpit-smtp "$SMTP_PORT"
    require_port_free mailpit-http "$MAILPIT_HTTP_PORT"
    mkdir -p "$MAILPIT_DIR"
    # Every start begins with an empty mailbox, like an in-memory store: tests
    # that count messages must not see mail from a previous session.
    rm -f "$MAILPIT_DB" "$MAILPIT_DB-wal" "$MAILPIT_DB-shm"
    log "mailpit: starting $MAILPIT_VERSION, SMTP 127.0.0.1:$SMTP_PORT, HTTP $(mailpit_url)"
    # --smtp-disable-rdns: reverse DNS of every client would hang on a machine
    # without working DNS. --disable-version-check: no GitHub calls.
    start_detached mailpit "$MAILPIT_BIN" \
        --smtp "127.0.0.1:$SMTP_PORT" \
        --listen "127.0.0.1:$MAILPIT_HTTP_PORT" \
        --database "$MAILPIT_DB" \
        --max 5000 \
        --smtp-auth-accept-any \
        --smtp-auth-allow-insecure \
        --smtp-disable-rdns \
        --disable-version-check
}

mailpit_wait() {
    local deadline=$((SECONDS + SERVICE_TIMEOUT))
    while ((SECONDS < deadline)); do
        mailpit_pid >/dev/null || fail_with_log mailpit "mailpit: process exited during startup"
        if mailpit_healthy; then
            log "mailpit: ready"
            return 0
        fi
        sleep 0.5
    done
    fail_with_log mailpit "mailpit: not ready after ${SERVICE_TIMEOUT}s ($(mailpit_url)/readyz)"
}

mailpit_stop() {
    local pid
    if pid=$(mailpit_pid); then
        stop_pid mailpit "$pid" TERM 15
    else
        rm -f "$(pidfile_of mailpit)"
        log "mailpit: not running"
    fi
}

mailpit_status() {
    local pid
    if pid=$(mailpit_pid); then
        if mailpit_healthy; then
            printf '%-9s running  pid %-7s SMTP 127.0.0.1:%s, UI/API %s\n' mailpit "$pid" "$SMTP_PORT" "$(mailpit_url)"
        else
            printf '%-9s starting pid %-7s not answering on %s yet\n' mailpit "$pid" "$(mailpit_url)"
        fi
        return 0
    fi
    printf '%-9s stopped\n' mailpit
    return 1
}
