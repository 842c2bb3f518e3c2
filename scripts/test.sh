#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, the guest plugins' unit tests, the Python and
# JavaScript example plugins (built with componentize-py and componentize-js, installed at pinned
# versions into $GENPIPE_TOOLS), the host's unit, integration and end-to-end tests (the
# PostgreSQL ones against a real server this script starts, and stops at the end), and the API
# contract (schemathesis against a live `genpipe serve`). The benchmarks are built and run once
# in quick mode as part of `cargo test --all-targets` (so they keep working); their figures are
# printed, not asserted: run `cargo bench` for real figures.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

cargo fmt --all --check
(
    cd plugins
    cargo fmt --all --check
    cargo clippy --locked --release --target wasm32-wasip2 -- -D warnings
    cargo test --locked -p genpipe-plugin-sdk -p llm-markov -p image-procedural -p llm-openai -p image-openai
)
cargo clippy --locked --all-targets -- -D warnings
GENPIPE_GUEST_EXAMPLES=$(./scripts/build-guest-examples.sh)
export GENPIPE_GUEST_EXAMPLES GENPIPE_REQUIRE_GUEST_EXAMPLES=1

export GENPIPE_PG_DIR="${TMPDIR:-/tmp}/genpipe-test-postgres"
trap './scripts/postgres.sh stop' EXIT
GENPIPE_TEST_POSTGRES_URL=$(./scripts/postgres.sh start)
export GENPIPE_TEST_POSTGRES_URL

GENPIPE_BENCH_QUICK=1 cargo test --locked --all-targets
./scripts/fuzz.sh
GENPIPE_BIN="${CARGO_TARGET_DIR:-target}/debug/genpipe" ./scripts/api-contract.sh
