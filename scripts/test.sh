#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, the guest plugins' unit tests, and the host's
# unit, integration and end-to-end tests. The benchmarks are built and run once in quick mode
# as part of `cargo test --all-targets` (so they keep working); their figures are printed, not
# asserted: run `cargo bench` for real figures.
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
GENPIPE_BENCH_QUICK=1 cargo test --locked --all-targets
