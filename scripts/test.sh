#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, the guest plugins' unit tests, the host's
# unit, integration and end-to-end tests, and the benchmark in quick mode (so it keeps building
# and running; its figures are printed, not asserted).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

cargo fmt --all --check
(cd plugins && cargo fmt --all --check && cargo test --locked -p llm-markov -p image-procedural)
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
GENPIPE_BENCH_QUICK=1 cargo bench --locked --bench run_overhead
