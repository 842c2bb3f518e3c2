#!/usr/bin/env bash
# The API contract: schemathesis, pinned, against a live `genpipe serve` on loopback,
# with an account key and the admin key, every check (`--checks all`), every phase (examples,
# coverage, fuzzing, stateful: the stateful phase follows the links from POST /v1/runs to the
# run's routes), in two rounds: a fixed seed, then a random one, each printed with the command
# that replays it. Each round starts a fresh server (the built binary, default limits, a memory
# ledger). Any failure fails the script.
#
# Installs schemathesis first (safe to run again): the versions in
# scripts/api-contract-requirements.txt, into a virtualenv under $GENPIPE_TOOLS (default
# /var/cache/genpipe-tools).
#
# Settings, from the environment:
#   CONTRACT_MAX_EXAMPLES  test cases per operation and phase (default 40: about a minute a round)
#   CONTRACT_SEED          the second round's seed (default: a random one)
#   CONTRACT_ROUNDS        rounds after the fixed-seed one, each with a new random seed (default 1)
#   CONTRACT_MAX_SECONDS   time limit of one round (default 300)
#   GENPIPE_BIN            a genpipe binary to test instead of building one
# A longer run, for instance:
#   CONTRACT_MAX_EXAMPLES=500 CONTRACT_ROUNDS=5 CONTRACT_MAX_SECONDS=3600 ./scripts/api-contract.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

TOOLS="${GENPIPE_TOOLS:-/var/cache/genpipe-tools}"
VENV="$TOOLS/schemathesis-4.32.5"
EXAMPLES="${CONTRACT_MAX_EXAMPLES:-40}"
ROUNDS="${CONTRACT_ROUNDS:-1}"
MAX_SECONDS="${CONTRACT_MAX_SECONDS:-300}"
FIXED_SEED=14
ACCOUNT_KEY=contract-key
ADMIN_KEY=contract-admin-key

step() { echo "==> $*" >&2; }
die() {
    echo "api-contract: error: $*" >&2
    exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/genpipe-api-contract.XXXXXX")
SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
cleanup() {
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- schemathesis, pinned -------------------------------------------------------------------

if [ "$("$VENV/bin/st" --version 2>/dev/null)" != "st, version 4.32.5" ]; then
    step "installing schemathesis 4.32.5 into $VENV"
    command -v python3 >/dev/null || die "python3 is not installed"
    python3 -m venv "$VENV" || die "cannot create a virtualenv in $VENV (Debian: apt-get install python3-venv)"
    "$VENV/bin/pip" install --quiet --no-deps -r "$ROOT/scripts/api-contract-requirements.txt" ||
        die "pip could not install scripts/api-contract-requirements.txt"
fi

# --- genpipe and its configuration ----------------------------------------------------------

if [ -n "${GENPIPE_BIN:-}" ]; then
    GENPIPE=$GENPIPE_BIN
else
    step "building genpipe"
    cargo build --locked --quiet --bin genpipe || die "building genpipe failed"
    GENPIPE="${CARGO_TARGET_DIR:-$ROOT/target}/debug/genpipe"
fi
[ -x "$GENPIPE" ] || die "no genpipe binary at $GENPIPE"

# Quick no-op plugins, an account that cannot run out of credits, and the default limits.
cat >"$WORK/genpipe.toml" <<EOF
[server]
admin_key = "$ADMIN_KEY"

[ledger]
kind = "memory"

[[accounts]]
id = "contract"
api_key = "$ACCOUNT_KEY"
credits = 1000000000000000

[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"
timeout_ms = 5000

[plugins.test-image]
path = "builtin:test-image"
world = "image-step"

[pipelines.noop]
description = "Two no-op steps, the second after the first"
[[pipelines.noop.steps]]
id = "text"
plugin = "test-llm"
max_cost = 10
[[pipelines.noop.steps]]
id = "image"
plugin = "test-image"
max_cost = 10
after = ["text"]
params = { width = 1, height = 1 }

[pipelines.words]
description = "One step streaming the prompt word by word"
[[pipelines.words.steps]]
id = "words"
plugin = "test-llm"
max_cost = 1000
params = { behaviour = "chunks" }
EOF
"$GENPIPE" validate --config "$WORK/genpipe.toml" >/dev/null || die "the contract's configuration does not validate"

# Each scheme of the document gets its key; schemathesis also tries requests without one.
cat >"$WORK/schemathesis.toml" <<EOF
[auth.openapi.api_key]
bearer = "$ACCOUNT_KEY"

[auth.openapi.admin_key]
bearer = "$ADMIN_KEY"

# Refusals that depend on state a generator cannot see, not on the request's shape: 402 (the
# account's credits), 409 (an idempotent request in flight, an existing account, the ledger's
# total), 422 (an Idempotency-Key used before with another body). Everything else a valid
# request gets is 2xx, 401 or 404 (no such run or pipeline).
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "402", "404", "409", "422"]
EOF

# Starts a fresh server; sets BASE.
start_server() {
    "$GENPIPE" serve --config "$WORK/genpipe.toml" --listen 127.0.0.1:0 >"$WORK/address" 2>"$WORK/server.log" &
    SERVER_PID=$!
    local tries=0
    until grep -q '^genpipe listening on ' "$WORK/address" 2>/dev/null; do
        kill -0 "$SERVER_PID" 2>/dev/null || die "genpipe serve exited: $(tail -n 20 "$WORK/server.log")"
        tries=$((tries + 1))
        [ "$tries" -le 300 ] || die "genpipe serve is not listening after 30 s: $(tail -n 20 "$WORK/server.log")"
        sleep 0.1
    done
    BASE=$(sed -n 's/^genpipe listening on //p' "$WORK/address")
}

# One round of every check and phase with SEED; fails the script on any failure.
round() { # SEED
    local seed=$1 status=0
    start_server
    step "schemathesis, seed $seed, $EXAMPLES examples per operation, against $BASE"
    echo "    replay: CONTRACT_SEED=$seed CONTRACT_ROUNDS=1 CONTRACT_MAX_EXAMPLES=$EXAMPLES ./scripts/api-contract.sh" >&2
    (
        cd "$WORK"
        timeout --kill-after=10 "$MAX_SECONDS" "$VENV/bin/st" --no-color --config-file "$WORK/schemathesis.toml" \
            run "$BASE/openapi.json" \
            --checks all \
            --phases examples,coverage,fuzzing,stateful \
            --mode all \
            --seed "$seed" \
            --max-examples "$EXAMPLES" \
            --workers 1 \
            --request-timeout 30 \
            --generation-database none \
            --suppress-health-check too_slow,filter_too_much
    ) || status=$?
    stop_server
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        die "seed $seed: schemathesis did not finish within $MAX_SECONDS s (CONTRACT_MAX_SECONDS)"
    fi
    [ "$status" -eq 0 ] || die "seed $seed: schemathesis found failures (above); replay with CONTRACT_SEED=$seed"
}

round "$FIXED_SEED"
for ((i = 1; i <= ROUNDS; i++)); do
    if [ -n "${CONTRACT_SEED:-}" ] && [ "$i" -eq 1 ]; then
        seed=$CONTRACT_SEED
    else
        seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    fi
    round "$seed"
done
echo "api-contract: every round passed" >&2
