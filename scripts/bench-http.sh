#!/usr/bin/env bash
# The HTTP benchmark: wrk, with identical settings, against
#   1. a plain axum server that runs no wasm (host/examples/plain_axum.rs);
#   2. `wasmtime serve` (wasmtime-cli 48) serving a hello-world wasi:http component
#      (bench/hello-http);
#   3. `genpipe serve` running the two-step `noop` pipeline for every request
#      (bench/genpipe-bench.toml), once per ledger backend (memory, sqlite).
# Every request is the same POST /v1/runs with `Prefer: wait=10` (bench/post-run.lua), and every
# response is checked: a 200 whose body is the server's success answer. Prints one table.
#
# Installs what it needs first (safe to run again): wrk (Debian), wasmtime-cli into
# $GENPIPE_TOOLS (default /var/cache/genpipe-tools; the first install compiles for a long while).
# Settings, from the environment: BENCH_DURATION (10s), BENCH_WARMUP (3s), BENCH_CONNECTIONS
# (64), BENCH_THREADS (2), BENCH_PORT_BASE (18091: uses 18091..18094), all on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/genpipe-target}"
TOOLS="${GENPIPE_TOOLS:-/var/cache/genpipe-tools}"
WASMTIME_VERSION=48.0.8
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-3s}"
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
THREADS="${BENCH_THREADS:-2}"
PORT_BASE="${BENCH_PORT_BASE:-18091}"
LUA="$ROOT/bench/post-run.lua"

step() { echo "==> $*" >&2; }
die() {
    echo "bench-http: error: $*" >&2
    exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/genpipe-bench-http.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    sleep 0.2
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- what it needs ----------------------------------------------------------------------------

for tool in curl awk cargo; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed; install it first"
done
if ! command -v wrk >/dev/null; then
    step "installing wrk (Debian package)"
    [ "$(id -u)" -eq 0 ] || die "wrk is missing and installing it needs root: run 'sudo apt-get install -y wrk'"
    if ! apt-get install -y wrk >&2; then
        if ! { apt-get update >&2 && apt-get install -y wrk >&2; }; then
            die "cannot install wrk with apt-get"
        fi
    fi
fi
WASMTIME="$TOOLS/bin/wasmtime"
if ! "$WASMTIME" --version 2>/dev/null | grep -Eq "^wasmtime $WASMTIME_VERSION( |$)"; then
    step "installing wasmtime-cli $WASMTIME_VERSION into $TOOLS (compiles wasmtime with one job: long)"
    # Its own target folder: no lock shared with genpipe's builds, and an interrupted install
    # resumes where it stopped.
    CARGO_TARGET_DIR="$TOOLS/build" cargo install --locked --version "$WASMTIME_VERSION" wasmtime-cli --root "$TOOLS" -j 1 >&2 ||
        die "cargo install wasmtime-cli $WASMTIME_VERSION failed (see above)"
fi
./scripts/setup.sh

# --- builds -----------------------------------------------------------------------------------

step "building the hello-world wasi:http component (bench/hello-http)"
cargo build --locked --release --target wasm32-wasip2 --manifest-path bench/hello-http/Cargo.toml \
    --target-dir "$CARGO_TARGET_DIR/hello-http" >&2 || die "building bench/hello-http failed"
HELLO_WASM="$CARGO_TARGET_DIR/hello-http/wasm32-wasip2/release/hello_http.wasm"
step "building genpipe and the plain axum example (release)"
cargo build --locked --release --bin genpipe --example plain_axum >&2 || die "building genpipe failed"
GENPIPE="$CARGO_TARGET_DIR/release/genpipe"
PLAIN_AXUM="$CARGO_TARGET_DIR/release/examples/plain_axum"
for file in "$HELLO_WASM" "$GENPIPE" "$PLAIN_AXUM"; do
    [ -f "$file" ] || die "the build did not produce $file"
done

# --- genpipe's configurations: one per ledger backend -----------------------------------------

# The bench config plus a [ledger] section, written into $WORK (plugins are built in, so the
# config's folder does not matter).
genpipe_config() { # NAME LEDGER_TOML
    local file="$WORK/genpipe-$1.toml"
    { cat "$ROOT/bench/genpipe-bench.toml"; printf '\n%s\n' "$2"; } >"$file"
    echo "$file"
}
GENPIPE_ROWS=(
    "genpipe serve, memory ledger|$(genpipe_config memory $'[ledger]\nkind = "memory"')"
    "genpipe serve, sqlite ledger|$(genpipe_config sqlite "$(printf '[ledger]\nkind = "sqlite"\npath = "%s"' "$WORK/ledger.db")")"
)
for row in "${GENPIPE_ROWS[@]}"; do
    out=$("$GENPIPE" validate --config "${row#*|}" 2>&1) || die "the genpipe configuration does not validate: $out"
done

# --- servers ----------------------------------------------------------------------------------

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

SERVER_PID=""
# Starts a server in the background (output to $WORK/NAME.log) and waits until it listens.
start_server() { # NAME PORT COMMAND...
    local name=$1 port=$2
    shift 2
    port_in_use "$port" && die "127.0.0.1:$port is already in use; set BENCH_PORT_BASE to free ports"
    # The same environment for every server: none captures backtraces (an exported
    # RUST_BACKTRACE=1 would make wasmtime capture one per request).
    env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$@" >"$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    local tries=0
    until port_in_use "$port"; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            die "$name exited before listening on 127.0.0.1:$port; its output:
$(log_tail "$name")"
        fi
        tries=$((tries + 1))
        [ "$tries" -le 600 ] || die "$name is not listening on 127.0.0.1:$port after 60 s; its output:
$(log_tail "$name")"
        sleep 0.1
    done
}

# The end of a server's log, without genpipe's line per run.
log_tail() { grep -v 'run ended' "$WORK/$1.log" | tail -n 20 || true; }

# Stops the server started last: SIGTERM, then up to 30 s for it to exit (genpipe drains its
# runs for shutdown_grace_secs, 10 s). One that has to be killed or, with `check`, exits other
# than 0 is a problem: reported after the table (its figures stand), and the script fails.
PROBLEMS=()
stop_server() { # NAME [check]
    local name=$1 tries=0 status=0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    while kill -0 "$SERVER_PID" 2>/dev/null; do
        tries=$((tries + 1))
        if [ "$tries" -gt 300 ]; then
            kill -KILL "$SERVER_PID" 2>/dev/null || true
            wait "$SERVER_PID" 2>/dev/null || true
            PROBLEMS+=("$name did not exit within 30 s of SIGTERM, so it was killed. The end of its log:
$(log_tail "$name")")
            return
        fi
        sleep 0.1
    done
    wait "$SERVER_PID" || status=$?
    if [ "${2:-}" = check ] && [ "$status" -ne 0 ]; then
        PROBLEMS+=("$name exited with status $status after SIGTERM. The end of its log:
$(log_tail "$name")")
    fi
}

# The benchmark's request, once, with curl: must be a 200 whose body contains EXPECTED.
check_once() { # NAME URL EXPECTED
    local code
    code=$(curl -sS -o "$WORK/$1.body" -w '%{http_code}' --max-time 15 -X POST "$2/v1/runs" \
        -H 'Content-Type: application/json' -H 'Authorization: Bearer bench-key' -H 'Prefer: wait=10' \
        --data '{"pipeline":"noop","input":{"prompt":"hello"}}') || die "$1: the request to $2 failed"
    [ "$code" = 200 ] || die "$1: POST $2/v1/runs answered $code, not 200: $(head -c 500 "$WORK/$1.body")"
    grep -qF -- "$3" "$WORK/$1.body" || die "$1: the answer does not contain '$3': $(head -c 500 "$WORK/$1.body")"
}

# Converts wrk's latency (850.00us, 1.25ms, 1.02s, 1.50m) to milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000; else if (u != "ms") n = -1
        printf "%.2f", n }'
}

# Runs wrk against URL: a warm-up, then the measured run; checks every response and appends
# "NAME|requests/s|p50 ms|p99 ms" to $WORK/rows.
bench() { # NAME URL EXPECTED
    local name=$1 url=$2 expected=$3 out="$WORK/$1.wrk" line
    step "$name: warm-up ($WARMUP), then $DURATION at $CONNECTIONS connections, $THREADS threads (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    wrk -t "$THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$LUA" "$url" -- "$expected" >"$WORK/$name.warmup" 2>&1 ||
        die "$name: wrk (warm-up) failed: $(cat "$WORK/$name.warmup")"
    wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s "$LUA" "$url" -- "$expected" >"$out" 2>&1 ||
        die "$name: wrk failed: $(cat "$out")"
    sed 's/^/    /' "$out" >&2
    for file in "$WORK/$name.warmup" "$out"; do
        if line=$(grep -E 'Non-2xx or 3xx responses' "$file"); then
            die "$name: wrk reported non-2xx responses ($line); see the output above and $name's log"
        fi
        line=$(awk '/^unexpected responses:/ {print $3}' "$file")
        [ -n "$line" ] || die "$name: wrk printed no 'unexpected responses' line: is bench/post-run.lua intact?"
        [ "$line" = 0 ] || die "$name: $line responses were not a 200 containing '$expected': $(grep 'first unexpected' "$file")"
        if line=$(grep -E '^ +Socket errors' "$file"); then
            die "$name: wrk reported socket errors ($line)"
        fi
    done
    local rps p50 p99
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    if [ -z "$rps" ] || [ "$rps" -le 0 ]; then
        die "$name: cannot read requests/s from wrk's output"
    fi
    echo "$name|$rps|$p50|$p99" >>"$WORK/rows"
}

if pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; then
    echo "bench-http: warning: cargo/rustc processes are running on this machine: the figures will be noisy" >&2
fi
: >"$WORK/rows"
PORT=$PORT_BASE

start_server plain-axum "$PORT" "$PLAIN_AXUM" "127.0.0.1:$PORT"
check_once plain-axum "http://127.0.0.1:$PORT" '"status":"completed"'
bench "plain axum (no wasm)" "http://127.0.0.1:$PORT" '"status":"completed"'
stop_server plain-axum
PORT=$((PORT + 1))

start_server wasmtime-serve "$PORT" "$WASMTIME" serve -Scli --addr "127.0.0.1:$PORT" "$HELLO_WASM"
check_once wasmtime-serve "http://127.0.0.1:$PORT" 'hello world'
bench "wasmtime serve, hello world" "http://127.0.0.1:$PORT" 'hello world'
stop_server wasmtime-serve
PORT=$((PORT + 1))

for row in "${GENPIPE_ROWS[@]}"; do
    name=${row%%|*}
    config=${row#*|}
    log=genpipe-$PORT
    start_server "$log" "$PORT" env NO_COLOR=1 "$GENPIPE" serve --config "$config" --listen "127.0.0.1:$PORT"
    check_once "$log" "http://127.0.0.1:$PORT" '"status":"completed"'
    bench "$name" "http://127.0.0.1:$PORT" '"status":"completed"'
    stop_server "$log" check
    PORT=$((PORT + 1))
done

# --- the table --------------------------------------------------------------------------------

echo
echo "HTTP benchmark, $(date -u +%Y-%m-%d): wrk $CONNECTIONS connections, $THREADS threads, $DURATION after a $WARMUP warm-up, on $(nproc) cores shared with wrk"
echo "$("$WASMTIME" --version); $(wrk --version 2>&1 | head -n 1 | cut -d' ' -f1-2)"
echo
echo "| server | requests/s | p50 (ms) | p99 (ms) |"
echo "|---|---:|---:|---:|"
awk -F'|' '
    function commas(n,   s) { s = sprintf("%d", n); while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]($|,)/, ",&", s); return s }
    { printf "| %s | %s | %s | %s |\n", $1, commas($2), $3, $4 }' "$WORK/rows"
wasmtime_rps=$(awk -F'|' '/^wasmtime serve/ {print $2}' "$WORK/rows")
awk -F'|' -v base="$wasmtime_rps" '/^genpipe/ { printf "| ratio %s / wasmtime serve | **%.2fx** | | |\n", $1, $2 / base }' "$WORK/rows"
if [ "${#PROBLEMS[@]}" -gt 0 ]; then
    echo >&2
    for problem in "${PROBLEMS[@]}"; do
        echo "bench-http: error: $problem" >&2
    done
    exit 1
fi
