#!/usr/bin/env bash
# The demo: builds genpipe and runs the `story` pipeline once on the built-in configuration
# (bundled example plugins, SQLite ledger in ./data, demo account). Arguments replace the default
# command, e.g. `./scripts/demo.sh run illustrated-story --prompt "A storm at sea"`.
#
# `./scripts/demo.sh openai [ARGS...]` runs the same pipeline through the OpenAI-compatible plugins
# instead, against the local mock server (openai-mock on 127.0.0.1:8787, streaming a token every
# 30 ms), on examples/openai-local.toml; the tokens stream live to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "${1:-}" = "openai" ]; then
    shift
    cargo build --locked --release --bin genpipe --bin openai-mock
    target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release
    export GENPIPE_DEMO_OPENAI_KEY=demo-openai-key
    log=$(mktemp)
    "$target/openai-mock" --listen 127.0.0.1:8787 --api-key "$GENPIPE_DEMO_OPENAI_KEY" --delay-ms-per-token 30 >"$log" 2>&1 &
    mock=$!
    trap 'kill "$mock" 2>/dev/null; rm -f "$log"' EXIT
    for _ in $(seq 100); do
        grep -q "listening on" "$log" && break
        kill -0 "$mock" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    grep -q "listening on" "$log" || { echo "openai-mock did not start within 10 s" >&2; exit 1; }
    if [ $# -eq 0 ]; then
        set -- run story --prompt "Alice followed the white rabbit" --out out
    fi
    "$target/genpipe" "$@" --config examples/openai-local.toml
    exit
fi
if [ $# -eq 0 ]; then
    set -- run story --prompt "Alice followed the white rabbit" --out out
fi
exec cargo run --locked --release --bin genpipe -- "$@"
