#!/usr/bin/env bash
# Builds the plugins (the cargo workspace in plugins/) into WebAssembly components:
#
#   plugins/dist/default.wasm                   the fallback router (plugins/examples/default-router)
#   plugins/dist/acme.wasm                      tenant acme's router (plugins/examples/acme-router)
#   plugins/dist/locale-templater.wasm          the example templating plugin (plugins/examples/locale-templater)
#   plugins/dist/fixtures/chaos.wasm            misbehaving test fixture, routing (plugins/fixtures/chaos-router)
#   plugins/dist/fixtures/chaos-templater.wasm  misbehaving test fixture, templating (plugins/fixtures/chaos-templater)
#   plugins/dist/guests/python-router.wasm      the default rules in Python (plugins/examples/python-router, componentize-py)
#   plugins/dist/guests/js-router.wasm          the default rules in JavaScript (plugins/examples/js-router, componentize-js)
#   plugins/dist/fixtures/chaos-python.wasm     misbehaving test fixture in Python (plugins/fixtures/chaos-python)
#   plugins/dist/fixtures/chaos-js.wasm         misbehaving test fixture in JavaScript (plugins/fixtures/chaos-js)
#   plugins/dist/starters/starter-router.wasm   the `cargo component` starters (plugins/starters/rust-*)
#   plugins/dist/starters/starter-templater.wasm
#
# Each plugin is built on its own (`-p`): cargo unifies features across the packages of one
# build, and the SDK's `routing` and `templating` features must not meet in one component.
#
# The wasm32-wasip2 target links a component directly (wasm-component-ld ships with rustc), so
# the plugins workspace needs neither cargo-component nor wasm-tools; the starters are built
# with `cargo component`, as their users will. The guest toolchains are installed from the
# registries, pinned, into a cache: componentize-py (PyPI, plugins/examples/python-router/requirements.txt)
# in a virtualenv, componentize-js (npm, plugins/examples/js-router/package-lock.json) with `npm ci`,
# cargo-component (crates.io) with `cargo install`. Idempotent: a second run is a no-op cargo
# build, and a Python or JavaScript component is built again only when its inputs changed.
# `--workspace-only` builds just the cargo workspace's plugins (what the demo loads), without
# the Python, JavaScript and cargo-component toolchains. Environment:
#   PLUGINS_TARGET_DIR the cargo target directory, default $HOME/.cache/notify-engine-plugins-target
#                      (scripts/lib/env.sh; the starters build under its starters/)
#   CARGO_BUILD_JOBS   passed through to cargo (e.g. 1 on a busy machine)
#   NOTIFY_TOOLS_DIR   where the guest toolchains go, default $HOME/.cache/notify-engine/tools
set -euo pipefail
WORKSPACE_ONLY=
[[ ${1:-} == --workspace-only ]] && WORKSPACE_ONLY=1

LOG_TAG=build-plugins
# shellcheck source=scripts/lib/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/env.sh"
PLUGINS=$ROOT/plugins
DIST=$PLUGINS/dist
TARGET=wasm32-wasip2

# Every cargo command below (cargo install and cargo component too) builds in the plugins'
# target directory, never in the engine's.
export CARGO_TARGET_DIR=$PLUGINS_TARGET_DIR

command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust with rustup)"

# The target's standard library, for the toolchain that builds in plugins/ (honours overrides).
sysroot=$(cd "$PLUGINS" && rustc --print sysroot)
if [[ ! -d $sysroot/lib/rustlib/$TARGET ]]; then
    command -v rustup >/dev/null 2>&1 ||
        die "the $TARGET standard library is missing from $sysroot and rustup is not available"
    log "rustup target add $TARGET"
    (cd "$PLUGINS" && rustup target add "$TARGET")
fi

locked=()
[[ -f $PLUGINS/Cargo.lock ]] && locked=(--locked)

for crate in default-router acme-router chaos-router locale-templater chaos-templater; do
    log "cargo build --release --target $TARGET -p $crate (target dir $CARGO_TARGET_DIR)"
    cargo build --release --target "$TARGET" --manifest-path "$PLUGINS/Cargo.toml" -p "$crate" "${locked[@]}"
done

out=$CARGO_TARGET_DIR/$TARGET/release
mkdir -p "$DIST/fixtures"

# install CRATE_ARTIFACT DEST: copy through a temporary file and rename, so an engine watching
# the plugin directory never sees a half-written component.
install_component() {
    install_file "$out/$1.wasm" "$2"
}

install_file() {
    local src=$1 dest=$2 magic
    [[ -f $src ]] || die "$src was not built"
    # A component starts with `\0asm` and the component-model version/layer 0d 00 01 00
    # (a core module would have 01 00 00 00).
    magic=$(head -c 8 "$src" | od -An -tx1 | tr -d ' \n')
    [[ $magic == 0061736d0d000100 ]] ||
        die "$src is not a WebAssembly component (header $magic)"
    mkdir -p "$(dirname "$dest")"
    cp "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    log "$(printf '%-44s %9s bytes' "${dest#"$ROOT"/}" "$(stat -c %s "$dest")")"
}

install_component default_router "$DIST/default.wasm"
install_component acme_router "$DIST/acme.wasm"
install_component chaos_router "$DIST/fixtures/chaos.wasm"
install_component locale_templater "$DIST/locale-templater.wasm"
install_component chaos_templater "$DIST/fixtures/chaos-templater.wasm"

[[ -n $WORKSPACE_ONLY ]] && exit 0

TOOLS=${NOTIFY_TOOLS_DIR:-$HOME/.cache/notify-engine/tools}
mkdir -p "$TOOLS"

# inputs_digest FILE...: one SHA-256 over the files' names and contents.
inputs_digest() {
    local f
    for f in "$@"; do
        printf '%s\n' "${f#"$ROOT"/}"
        cat "$f"
    done | sha256sum | cut -d' ' -f1
}

# build_guest DEST INPUTS COMMAND...: runs COMMAND (which must write "$OUT") unless DEST was
# built from the same inputs (a digest kept beside it), then installs "$OUT" as DEST.
build_guest() {
    local dest=$1 inputs=$2 stamp digest
    shift 2
    stamp=$(dirname "$dest")/.$(basename "$dest").inputs
    digest=$(inputs_digest $inputs)
    if [[ -f $dest && -f $stamp && $(cat "$stamp") == "$digest" ]]; then
        log "$(printf '%-44s unchanged' "${dest#"$ROOT"/}")"
        return
    fi
    OUT=$(mktemp -d)/component.wasm
    "$@"
    install_file "$OUT" "$dest"
    rm -rf "$(dirname "$OUT")"
    printf '%s\n' "$digest" >"$stamp"
}

WIT_FILES=$(find "$ROOT/wit/v0.2.0" -type f | sort)

# --- Python (componentize-py): pure components, every WASI import a trapping stub, so they
# import nothing but the plugin API. ---
PY_TOOLS=$TOOLS/python
PY_REQUIREMENTS=$PLUGINS/examples/python-router/requirements.txt
if ! cmp -s "$PY_REQUIREMENTS" "$PY_TOOLS/requirements.txt" 2>/dev/null; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found (the Python plugins are built with componentize-py)"
    log "installing $(cat "$PY_REQUIREMENTS") into $PY_TOOLS"
    rm -rf "$PY_TOOLS"
    python3 -m venv "$PY_TOOLS" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$PY_TOOLS/bin/pip" install --quiet --disable-pip-version-check -r "$PY_REQUIREMENTS"
    cp "$PY_REQUIREMENTS" "$PY_TOOLS/requirements.txt"
fi
componentize_py() {
    "$PY_TOOLS/bin/componentize-py" --quiet -d "$ROOT/wit/v0.2.0" -w routing \
        componentize --stub-wasi -p "$1" app -o "$OUT"
}
for guest in examples/python-router:guests/python-router fixtures/chaos-python:fixtures/chaos-python; do
    src=$PLUGINS/${guest%%:*}
    build_guest "$DIST/${guest#*:}.wasm" "$src/app.py $PY_REQUIREMENTS $WIT_FILES" componentize_py "$src"
done

# --- JavaScript (componentize-js, SpiderMonkey): every WASI feature disabled, for the same
# reason. The toolchain is plugins/examples/js-router's devDependencies. ---
command -v npm >/dev/null 2>&1 || die "npm not found (the JavaScript plugins are built with componentize-js)"
JS=$PLUGINS/examples/js-router
if ! cmp -s "$JS/package-lock.json" "$JS/node_modules/.notify-engine-lock" 2>/dev/null; then
    log "npm ci in plugins/examples/js-router (componentize-js)"
    (cd "$JS" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$JS/package-lock.json" "$JS/node_modules/.notify-engine-lock"
fi
componentize_js() {
    (cd "$JS" && node_modules/.bin/componentize-js "$1" --wit "$ROOT/wit/v0.2.0" --world-name routing \
        --disable stdio random clocks http fetch-event --out "$OUT" >/dev/null)
}
build_guest "$DIST/guests/js-router.wasm" "$JS/router.js $JS/package-lock.json $WIT_FILES" \
    componentize_js "$JS/router.js"
build_guest "$DIST/fixtures/chaos-js.wasm" "$PLUGINS/fixtures/chaos-js/chaos.js $JS/package-lock.json $WIT_FILES" \
    componentize_js "$PLUGINS/fixtures/chaos-js/chaos.js"

# --- Rust with cargo-component: the starters, built as their users build them. ---
CARGO_COMPONENT_VERSION=0.21.1
CC_ROOT=$TOOLS/cargo-component-$CARGO_COMPONENT_VERSION
if [[ ! -x $CC_ROOT/bin/cargo-component ]]; then
    log "cargo install cargo-component@$CARGO_COMPONENT_VERSION (once; a few minutes)"
    # Its release profile asks for fat LTO in one codegen unit at opt-level 3: 12.5 of a cold
    # CI run's 45 minutes on 2 cores. A tool that turns two small starters into components in a
    # second needs none of that, so the build keeps release's semantics (no debug assertions or
    # overflow checks) and drops the optimisation work.
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
        cargo install --quiet --locked "cargo-component@$CARGO_COMPONENT_VERSION" --root "$CC_ROOT"
fi
for starter in routing:starter-router templating:starter-templater; do
    dir=$PLUGINS/starters/rust-${starter%%:*}
    crate=${starter#*:}
    log "cargo component build --release --target $TARGET (plugins/starters/rust-${starter%%:*})"
    (cd "$dir" && PATH=$CC_ROOT/bin:$PATH CARGO_TARGET_DIR=$CARGO_TARGET_DIR/starters \
        cargo component build --quiet --release --target "$TARGET" "${locked[@]}")
    install_file "$CARGO_TARGET_DIR/starters/$TARGET/release/${crate//-/_}.wasm" "$DIST/starters/$crate.wasm"
done
