#!/usr/bin/env bash
# Installs what building genpipe needs on a fresh machine: the wasm32-wasip2 Rust target
# (the bundled plugins are compiled for it by host/build.rs). Safe to run again.
set -euo pipefail
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed | grep -q "^$component"; then
        rustup component add "$component"
    fi
done
