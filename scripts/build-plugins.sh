#!/usr/bin/env bash
# Builds the plugins (the cargo workspace in plugins/) into WebAssembly components:
#
#   plugins/dist/default.wasm                   the fallback router (plugins/default-router)
#   plugins/dist/acme.wasm                      tenant acme's router (plugins/acme-router)
#   plugins/dist/locale-templater.wasm          the example templating plugin (plugins/locale-templater)
#   plugins/dist/fixtures/chaos.wasm            misbehaving test fixture, routing (plugins/chaos-router)
#   plugins/dist/fixtures/chaos-templater.wasm  misbehaving test fixture, templating (plugins/chaos-templater)
#
# Each plugin is built on its own (`-p`): cargo unifies features across the packages of one
# build, and the SDK's `routing` and `templating` features must not meet in one component.
#
# The wasm32-wasip2 target links a component directly (wasm-component-ld ships with rustc), so
# neither cargo-component nor wasm-tools is needed. Idempotent: a second run is a no-op build
# plus the copy. Environment:
#   CARGO_TARGET_DIR   default $HOME/.cache/notify-engine/plugins-target
#   CARGO_BUILD_JOBS   passed through to cargo (e.g. 1 on a busy machine)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PLUGINS=$ROOT/plugins
DIST=$PLUGINS/dist
TARGET=wasm32-wasip2

log() { printf '[build-plugins] %s\n' "$*" >&2; }
die() { printf '[build-plugins] ERROR: %s\n' "$*" >&2; exit 1; }

CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/notify-engine/plugins-target}
case $CARGO_TARGET_DIR in
    /*) ;;
    *) CARGO_TARGET_DIR=$PWD/$CARGO_TARGET_DIR ;;
esac
export CARGO_TARGET_DIR

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
    local src=$out/$1.wasm dest=$2 magic
    [[ -f $src ]] || die "$src was not built"
    # A component starts with `\0asm` and the component-model version/layer 0d 00 01 00
    # (a core module would have 01 00 00 00).
    magic=$(head -c 8 "$src" | od -An -tx1 | tr -d ' \n')
    [[ $magic == 0061736d0d000100 ]] ||
        die "$src is not a WebAssembly component (header $magic)"
    cp "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    log "$(printf '%-40s %8s bytes' "${dest#"$ROOT"/}" "$(stat -c %s "$dest")")"
}

install_component default_router "$DIST/default.wasm"
install_component acme_router "$DIST/acme.wasm"
install_component chaos_router "$DIST/fixtures/chaos.wasm"
install_component locale_templater "$DIST/locale-templater.wasm"
install_component chaos_templater "$DIST/fixtures/chaos-templater.wasm"
