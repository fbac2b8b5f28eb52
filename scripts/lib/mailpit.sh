# shellcheck shell=bash
# Mailpit (SMTP sink + HTTP API + web UI), built from source because release
# binaries cannot be downloaded on these machines (only package registries,
# including the Go module proxy and the npm registry, are reachable).
#
# A plain `go install` would work but embeds no web UI: Mailpit's JS/CSS bundle
# (server/ui/dist) is produced by an npm build and is not part of the Go
# module. So the module source is fetched from the Go module proxy, copied to
# a writable dir, the UI is built with npm exactly as upstream's Dockerfile
# does (npm install + `npm run package`), then `go build` embeds it.
#
# Expects from services.sh: STATE, CACHE_ROOT, SMTP_PORT, MAILPIT_HTTP_PORT,
# SERVICE_TIMEOUT.

MAILPIT_VERSION=v1.33.1
MAILPIT_MODULE=github.com/axllent/mailpit
MAILPIT_BIN="$CACHE_ROOT/bin/mailpit"
MAILPIT_DIR="$STATE/mailpit"
MAILPIT_DB="$MAILPIT_DIR/mailpit.db"
# Writable copy of the module source for the npm + go build; removed after a
# successful build (the npm and Go caches make a rebuild fast anyway).
MAILPIT_BUILD_DIR="$CACHE_ROOT/mailpit-build"
# Mailpit v1.33.1's package-lock.json pins two packages at versions that the
# npm registry reachable here does not serve, so `npm ci` fails with E404:
#  - sass-embedded 1.108.1 (and its per-platform binaries): the SCSS compiler
#    behind esbuild-sass-plugin; 1.108.2 is the next patch release.
#  - rapidoc 12.1.0: the OpenAPI viewer bundled only into dist/docs.js, the
#    API docs page at /api/v1/ (not the mailbox UI); 9.3.8 is the newest
#    served release and provides the same <rapi-doc> element.
# These package.json edits (`npm pkg set` arguments: an `overrides` entry for
# sass-embedded, which is only a peer dependency of esbuild-sass-plugin; the
# direct dependency itself for rapidoc, as npm rejects an override that
# conflicts with a direct dependency) are the only change made to upstream's
# npm setup; everything else keeps the versions in the lock file.
MAILPIT_NPM_PKG_EDITS="overrides.sass-embedded=1.108.2 dependencies.rapidoc=9.3.8"
# What the stamp file next to the binary must say. The "+ui" suffix makes an
# older UI-less `go install` binary (stamp "v1.33.1") get rebuilt once.
MAILPIT_BUILD_ID="$MAILPIT_VERSION+ui"

mailpit_url() { printf 'http://127.0.0.1:%s\n' "$MAILPIT_HTTP_PORT"; }

# A source build reports version "dev" unless set via -ldflags (done below),
# and whether the UI is embedded is not visible from outside, so what was
# built is tracked in a stamp file next to the binary.
_mailpit_built_id() { cat "$MAILPIT_BIN.version" 2>/dev/null || true; }

mailpit_prepare() {
    ensure_cmd curl curl
    if [[ -x $MAILPIT_BIN && $(_mailpit_built_id) == "$MAILPIT_BUILD_ID" ]]; then
        return 0
    fi
    command -v go >/dev/null 2>&1 ||
        die "mailpit: Go is needed to build Mailpit $MAILPIT_VERSION (Debian's golang-go is too old for it; use the Go toolchain that ships with this machine image)"
    { command -v node && command -v npm; } >/dev/null 2>&1 ||
        die "mailpit: Node.js and npm are needed to build Mailpit's web UI (use the Node.js that ships with this machine image)"
    log "mailpit: building $MAILPIT_MODULE@$MAILPIT_VERSION with its web UI (npm + go; a few minutes on a cold cache)"
    local t0=$SECONDS
    # Subshell: the build cd's around and must not leave the caller elsewhere;
    # `die` inside it only ends the subshell, so its status is checked here.
    # (Being in an `if`, the subshell runs without errexit: every step in
    # _mailpit_build checks its own status.)
    if ! (_mailpit_build); then
        die "mailpit: build failed (see output above; sources left in $MAILPIT_BUILD_DIR)"
    fi
    rm -rf "$MAILPIT_BUILD_DIR"
    log "mailpit: built in $((SECONDS - t0))s -> $MAILPIT_BIN"
}

_mailpit_build() {
    local modjson moddir src=$MAILPIT_BUILD_DIR/src tmpbin="$CACHE_ROOT/bin/.mailpit.tmp.$$"
    mkdir -p "$CACHE_ROOT/bin" || die "mailpit: cannot create $CACHE_ROOT/bin"
    # The module zip from the Go module proxy holds the whole repository tree,
    # including package.json, package-lock.json and server/ui-src.
    modjson=$(cd "$CACHE_ROOT" && go mod download -json "$MAILPIT_MODULE@$MAILPIT_VERSION") ||
        die "mailpit: go mod download $MAILPIT_MODULE@$MAILPIT_VERSION failed"
    moddir=$(node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).Dir||""))' <<<"$modjson")
    [[ -n $moddir && -f $moddir/package-lock.json && -d $moddir/server/ui-src ]] ||
        die "mailpit: $MAILPIT_MODULE@$MAILPIT_VERSION from the module cache ($moddir) has no UI sources"
    # The module cache is read-only: copy, then make the copy writable.
    {
        rm -rf "$MAILPIT_BUILD_DIR" && mkdir -p "$MAILPIT_BUILD_DIR" &&
            cp -R "$moddir" "$src" && chmod -R u+w "$src" && cd "$src"
    } || die "mailpit: cannot copy the module source to $src"

    # `npm install` rather than `npm ci`: with the overrides the lock file no
    # longer matches package.json, which `npm ci` refuses; `npm install`
    # re-resolves only the overridden packages (and their own dependencies)
    # and keeps every other locked version.
    local edit
    for edit in $MAILPIT_NPM_PKG_EDITS; do
        npm pkg set "$edit" || die "mailpit: npm pkg set $edit failed"
    done
    # nice: this shares 2 cores with whatever else the developer is compiling.
    # --ignore-scripts: no dependency needs its install script for this build
    # (esbuild finds its binary in @esbuild/linux-x64 without its postinstall;
    # the others are native file watchers, tree-sitter parsers and a telemetry
    # ping pulled in by rapidoc); npm 11.19 here already leaves them unrun
    # (allowScripts), and this keeps other npm versions from trying to compile
    # or phone home.
    # --loglevel=error: Node 20 triggers dozens of harmless EBADENGINE warnings
    # from dev-only packages (jsdom, vue-router's build tooling) that ask for
    # Node 22; real failures are still printed.
    nice -n 10 npm install --ignore-scripts --no-audit --no-fund --no-update-notifier --loglevel=error >&2 ||
        die "mailpit: npm install failed"
    nice -n 10 npm run package >&2 || die "mailpit: npm run package (UI build) failed"
    [[ -s server/ui/dist/app.js && -s server/ui/dist/app.css ]] ||
        die "mailpit: the UI build produced no server/ui/dist/app.js / app.css"

    # Flags as in the former `go install` build (upstream's release ldflags
    # plus -s, -trimpath). CGO_ENABLED=0: Mailpit's SQLite
    # is pure Go, so no C toolchain is needed. -buildvcs=false: the copy is
    # not a git checkout.
    rm -f "$tmpbin"
    if ! CGO_ENABLED=0 nice -n 10 go build -trimpath -buildvcs=false \
        -ldflags "-s -w -X $MAILPIT_MODULE/config.Version=$MAILPIT_VERSION" \
        -o "$tmpbin" . >&2; then
        rm -f "$tmpbin"
        die "mailpit: go build failed"
    fi
    { mv -f "$tmpbin" "$MAILPIT_BIN" && printf '%s\n' "$MAILPIT_BUILD_ID" >"$MAILPIT_BIN.version"; } ||
        die "mailpit: cannot install the binary as $MAILPIT_BIN"
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
    # that count messages must not see mail from a previous session. The chaos suite
    # restarts Mailpit mid-run and counts every message: NOTIFY_MAILPIT_KEEP=1 keeps them.
    [[ ${NOTIFY_MAILPIT_KEEP:-0} == 1 ]] || rm -f "$MAILPIT_DB" "$MAILPIT_DB-wal" "$MAILPIT_DB-shm"
    log "mailpit: starting $MAILPIT_VERSION, SMTP 127.0.0.1:$SMTP_PORT, HTTP $(mailpit_url)"
    # --smtp-disable-rdns: reverse DNS of every client would hang on a machine
    # without working DNS. --disable-version-check: no GitHub calls.
    start_detached mailpit "$MAILPIT_BIN" \
        --smtp "127.0.0.1:$SMTP_PORT" \
        --listen "127.0.0.1:$MAILPIT_HTTP_PORT" \
        --database "$MAILPIT_DB" \
        --max "${NOTIFY_MAILPIT_MAX:-5000}" \
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
