#!/usr/bin/env bash
# Installs what building the engine needs and a fresh machine of our kind may lack:
# a C toolchain, pkg-config, OpenSSL and zlib headers (librdkafka is compiled from source
# by rdkafka-sys), the PostgreSQL client for the scripts, Python's venv (the Python plugins'
# toolchain is installed into one), and Chromium for the browser test
# (`--with-browser`). Idempotent; apt runs only if something is missing.
set -euo pipefail

LOG_TAG=bootstrap
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v curl >/dev/null 2>&1 || missing+=(curl)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
# The Python plugins are built with componentize-py, installed into a virtualenv.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [[ ${1:-} == --with-browser ]]; then
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v node >/dev/null 2>&1 || { log "node not found: install Node.js 20 or newer"; exit 1; }
fi

if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || { log "missing ${missing[*]} and no apt-get"; exit 1; }
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { log "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }
