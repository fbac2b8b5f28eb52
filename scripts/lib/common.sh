# shellcheck shell=bash
# Shared helpers for scripts/services.sh. Sourced, never executed; log and die come from
# env.sh, sourced before.

warn() { log "WARNING: $*"; }

# apt-get update is slow and noisy, so do it at most once per invocation and only
# when something actually has to be installed.
_APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "need to install '$*' but apt-get is not available"
    [[ $(id -u) -eq 0 ]] || die "need to install '$*' via apt-get, which requires root"
    if [[ $_APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        _APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# ensure_cmd CMD PACKAGE...: install PACKAGEs if CMD is not on PATH.
ensure_cmd() {
    local cmd=$1; shift
    command -v "$cmd" >/dev/null 2>&1 || apt_install "$@"
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' still not found after installing $*"
}

# port_open PORT [HOST]: is something accepting TCP connections there?
# Uses bash's /dev/tcp so that no netcat is needed; `timeout` bounds the case
# where a SYN is silently dropped.
port_open() {
    local port=$1 host=${2:-127.0.0.1}
    # shellcheck disable=SC2016
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null
}

# Best-effort description of who listens on PORT, for error messages.
port_owner() {
    local port=$1
    if command -v ss >/dev/null 2>&1; then
        ss -Hltnp "sport = :$port" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -1
    fi
}

pidfile_of() { printf '%s/pids/%s.pid\n' "$STATE" "$1"; }

# pid_of NAME MARKER: print the pid recorded for NAME if that process is alive
# AND its command line still contains MARKER. The marker check keeps a recycled
# pid (after a reboot or a long-dead service) from being mistaken for ours.
pid_of() {
    local name=$1 marker=$2 pf pid
    pf=$(pidfile_of "$name")
    [[ -s $pf ]] || return 1
    pid=$(<"$pf")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker" || return 1
    printf '%s\n' "$pid"
}

# start_detached NAME CMD...: run CMD in its own session (so Ctrl-C / closing the
# calling shell does not take it down), stdout+stderr appended to its log.
# The inner shell records its own pid and then execs, so the pid file holds the
# service's real pid even if `setsid` had to fork.
start_detached() {
    local name=$1; shift
    local pf logf
    pf=$(pidfile_of "$name")
    logf="$STATE/logs/$name.log"
    mkdir -p "$STATE/pids" "$STATE/logs"
    printf '\n===== %s: starting %s =====\n' "$(date -Is)" "$name" >>"$logf"
    # 9>&-: fd 9 holds services.sh's flock; a daemon inheriting it would keep
    # the lock forever and block every later up/down.
    # shellcheck disable=SC2016
    nohup setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pf" "$@" >>"$logf" 2>&1 </dev/null 9>&- &
    # Wait (briefly) for the pid file so callers can rely on it.
    local tries=50
    while ((tries-- > 0)); do
        [[ -s $pf ]] && return 0
        sleep 0.1
    done
    die "$name: process did not record its pid in $pf"
}

# stop_pid NAME PID SIGNAL TIMEOUT: send SIGNAL, wait up to TIMEOUT seconds,
# then SIGKILL. Always removes the pid file.
stop_pid() {
    local name=$1 pid=$2 sig=$3 timeout=$4 waited=0
    log "$name: stopping (pid $pid, SIG$sig)"
    kill "-$sig" "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= timeout * 10)); then
            warn "$name: still running after ${timeout}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$(pidfile_of "$name")"
}

# Offset (in bytes) of the end of a service's log, so that readiness checks only
# look at what the current run wrote.
log_size() { stat -c %s "$STATE/logs/$1.log" 2>/dev/null || echo 0; }

# fail_with_log NAME MESSAGE: readiness failures always show the evidence.
fail_with_log() {
    local name=$1; shift
    local logf="$STATE/logs/$name.log"
    printf '[services] ERROR: %s\n' "$*" >&2
    if [[ -f $logf ]]; then
        printf '[services] ---- last 40 lines of %s ----\n' "$logf" >&2
        tail -n 40 "$logf" >&2
        printf '[services] ---- end of %s ----\n' "$logf" >&2
    fi
    printf "[services] Whatever did start is left running; 'scripts/services.sh down' stops it.\n" >&2
    exit 1
}

# require_port_free NAME PORT: used right before starting; a foreign listener
# on our port would otherwise make readiness checks pass against the wrong
# process.
require_port_free() {
    local name=$1 port=$2 owner
    if port_open "$port"; then
        owner=$(port_owner "$port")
        die "$name: port $port is already in use${owner:+ by $owner}, but not by a service started by this script (state dir $STATE). Stop it or pick another port (see the NOTIFY_*_PORT variables)."
    fi
}
