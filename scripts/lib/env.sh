# shellcheck shell=bash
# The environment every script in scripts/ starts from, in one place so that they agree on
# where things are: the repository root, the two cargo target directories, the services'
# state directory, and the log line. Sourced, never executed:
#
#   LOG_TAG=test . "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
#
# Sets and exports (each keeps a value the caller already has):
#   CARGO_TARGET_DIR    the engine workspace's builds    [$HOME/.cache/notify-engine-target]
#   PLUGINS_TARGET_DIR  the plugins' builds (plugins/Cargo.toml, the starters under
#                       starters/), read by build-plugins.sh [$HOME/.cache/notify-engine-plugins-target]
#   NOTIFY_STATE_DIR    the running services' data, logs and services.env
#                       [$HOME/.cache/notify-engine/run]; the chaos suite points it elsewhere
# and defines ROOT (absolute), log MESSAGE ("[LOG_TAG] MESSAGE" on stderr; LOG_GAP=1 puts an
# empty line before it), die MESSAGE (logs "ERROR: MESSAGE", exits 1) and
# load_services_env (exports what `scripts/services.sh up` wrote to $NOTIFY_STATE_DIR/services.env).
# Both target directories live outside the clone, so every clone and worktree on a machine
# shares one build cache (a cold engine build is most of a cold CI run's time).

# shellcheck disable=SC2034 # read by the scripts that source this
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Relative paths would change meaning as soon as a script or cargo changes directory.
_absolute() { [[ $1 == /* ]] && printf '%s\n' "$1" || printf '%s/%s\n' "$PWD" "$1"; }
CARGO_TARGET_DIR=$(_absolute "${CARGO_TARGET_DIR:-$HOME/.cache/notify-engine-target}")
PLUGINS_TARGET_DIR=$(_absolute "${PLUGINS_TARGET_DIR:-$HOME/.cache/notify-engine-plugins-target}")
NOTIFY_STATE_DIR=$(_absolute "${NOTIFY_STATE_DIR:-$HOME/.cache/notify-engine/run}")
export CARGO_TARGET_DIR PLUGINS_TARGET_DIR NOTIFY_STATE_DIR

log() {
    [[ -n ${LOG_GAP:-} ]] && printf '\n' >&2
    printf '[%s] %s\n' "${LOG_TAG:-scripts}" "$*" >&2
}
die() {
    log "ERROR: $*"
    exit 1
}

load_services_env() {
    set -a
    # shellcheck disable=SC1091
    . "$NOTIFY_STATE_DIR/services.env"
    set +a
}
