#!/usr/bin/env bash
# The demo: builds genpipe and runs the `story` pipeline once on the built-in configuration
# (bundled example plugins, SQLite ledger in ./data, demo account). Arguments replace the default
# command, e.g. `./scripts/demo.sh run illustrated-story --prompt "A storm at sea"`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ $# -eq 0 ]; then
    set -- run story --prompt "Alice followed the white rabbit" --out out
fi
exec cargo run --locked --release --bin genpipe -- "$@"
