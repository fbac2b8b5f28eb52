# shellcheck shell=bash
# Timed phases for scripts/test.sh, so that a slow run says where its minutes went. Sourced
# after env.sh (it logs with log/die):
#
#   phase NAME WHAT          ends the running phase ("[test] NAME: 83 s") and starts NAME
#   background NAME CMD...   runs CMD while the phases go on, its output kept in a file
#   wait_background NAME     waits for it, prints its output and its own duration, fails as
#                            it failed
#   phases_summary           (the EXIT trap) ends the last phase and prints a table: every
#                            phase's seconds, then every background job's
#
# A background job runs in a process group of its own (setsid), so a run that fails early
# stops what it started instead of leaving a build running; jobs started with
# BACKGROUND_KEEP=1 (the services: stopping `services.sh up` halfway would leave half a
# cluster) are left to finish.

PHASES=() PHASE="" PHASE_T0=$SECONDS
declare -A BACKGROUND_PID=() BACKGROUND_LOG=() BACKGROUND_T0=() BACKGROUND_KEEP_JOB=()

phase() {
    phase_end
    PHASE=$1 PHASE_T0=$SECONDS
    shift
    log "$PHASE: $*"
}

phase_end() {
    [[ -n $PHASE ]] || return 0
    PHASES+=("$PHASE $((SECONDS - PHASE_T0))")
    log "$PHASE: $((SECONDS - PHASE_T0)) s"
    PHASE=""
}

background() {
    local name=$1 out
    shift
    out=$(mktemp "${TMPDIR:-/tmp}/notify-test-$name.XXXXXX")
    BACKGROUND_LOG[$name]=$out BACKGROUND_T0[$name]=$(date +%s)
    [[ -n ${BACKGROUND_KEEP:-} ]] && BACKGROUND_KEEP_JOB[$name]=1
    # The job writes its end time beside its output: its duration, not the time it was waited for.
    # shellcheck disable=SC2016,SC2094 # $@ and $1 are the inner shell's; the output path is an argument
    setsid -w bash -c '"${@:2}"; status=$?; date +%s >"$1.end"; exit $status' _ "$out" "$@" >"$out" 2>&1 &
    BACKGROUND_PID[$name]=$!
    log "$name: started in the background (output: $out)"
}

wait_background() {
    local name=$1 status=0 took
    wait "${BACKGROUND_PID[$name]}" || status=$?
    unset "BACKGROUND_PID[$name]"
    cat "${BACKGROUND_LOG[$name]}" >&2
    took=$(($(cat "${BACKGROUND_LOG[$name]}.end" 2>/dev/null || date +%s) - BACKGROUND_T0[$name]))
    PHASES+=("$name(background) $took")
    rm -f "${BACKGROUND_LOG[$name]}" "${BACKGROUND_LOG[$name]}.end"
    ((status == 0)) || die "$name failed (exit $status)"
    log "$name: done, $took s in the background"
}

phases_summary() {
    local status=$? line name
    phase_end
    for name in "${!BACKGROUND_PID[@]}"; do
        if [[ -n ${BACKGROUND_KEEP_JOB[$name]:-} ]]; then
            log "$name: still running in the background (pid ${BACKGROUND_PID[$name]}; output: ${BACKGROUND_LOG[$name]})"
        else
            log "$name: stopped"
            kill -TERM -- "-${BACKGROUND_PID[$name]}" 2>/dev/null || true
        fi
    done
    {
        printf '\n[%s] %s after %d s; seconds per phase:\n' "${LOG_TAG:-test}" \
            "$( ((status == 0)) && echo passed || echo FAILED)" "$SECONDS"
        for line in "${PHASES[@]}"; do printf '  %-24s %6d\n' "${line% *}" "${line##* }"; done
    } >&2
}
