#!/usr/bin/env bash
# Three genpipe replicas behind nginx, over one PostgreSQL database, on this machine:
#
#   scripts/replicas.sh start    starts whatever is not running yet, then prints the status (to
#                                restart one replica, for one that lost its lease: kill its pid,
#                                from $GENPIPE_REPLICAS_DIR/replica-N.pid, then start)
#   scripts/replicas.sh status   prints each part and its health; exits 1 if one is unhealthy
#   scripts/replicas.sh stop     stops nginx, the replicas (gracefully), then PostgreSQL, whose
#                                folder (and data) it removes
#
#   nginx        127.0.0.1:8080         spreads requests over the replicas (the only address clients need)
#   replicas     127.0.0.1:8081-8083    `genpipe serve --config examples/replicas/genpipe.toml`
#   PostgreSQL   a Unix socket in $GENPIPE_PG_DIR (scripts/postgres.sh): credits, runs, keys, leases
#
# Everything lives in the run folder $GENPIPE_REPLICAS_DIR (default /tmp/genpipe-replicas): the
# replicas' logs (replica-N.log) and pid files, nginx's configuration, pid and logs (nginx/), and
# PostgreSQL's cluster (postgres/, unless GENPIPE_PG_DIR says otherwise; port GENPIPE_PG_PORT,
# default 54330, names its socket). The binary is GENPIPE_BIN, or else built here with
# `cargo build --locked --release --bin genpipe`. The configuration is GENPIPE_REPLICAS_CONFIG
# (default examples/replicas/genpipe.toml); when its [ledger] url is not the one of the server
# started here, the replicas use a copy in the run folder with the url replaced. Installs the
# Debian packages nginx-light (or nginx) and postgresql when missing (as root, as in CI); the
# nginx started here is a process of its own with its own configuration, never the system service.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUN="${GENPIPE_REPLICAS_DIR:-/tmp/genpipe-replicas}"
export GENPIPE_PG_DIR="${GENPIPE_PG_DIR:-$RUN/postgres}"
export GENPIPE_PG_PORT="${GENPIPE_PG_PORT:-54330}"
CONFIG="${GENPIPE_REPLICAS_CONFIG:-$ROOT/examples/replicas/genpipe.toml}"
LB_PORT=8080
PORTS=(8081 8082 8083)
NGINX_DIR="$RUN/nginx"
# Longest wait for a replica to drain on stop: its shutdown_grace_secs (10 s) and a margin.
STOP_WAIT_SECS=30

usage() {
    echo "usage: $0 start|stop|status" >&2
    exit 2
}

fail() {
    echo "error: $*" >&2
    exit 1
}

# The pid in file $1 if that process is alive and its command line contains $2.
live_pid() {
    local file="$1" pattern="$2" pid
    [ -f "$file" ] || return 1
    pid="$(cat "$file" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern" || return 1
    echo "$pid"
}

# Whether something listens on 127.0.0.1:$1.
port_taken() {
    ss -Htln "sport = :$1" 2>/dev/null | grep -q .
}

# HTTP status of GET $1 (000 when nothing answers), within 2 s.
http_status() {
    curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true
}

# Waits up to $2 seconds for GET $1 to answer 200.
wait_ready() {
    local url="$1" seconds="$2" i
    for ((i = 0; i < seconds * 10; i++)); do
        [ "$(http_status "$url")" = 200 ] && return 0
        sleep 0.1
    done
    return 1
}

# Installs the first of the Debian packages $2... that installs, unless the program $1 is there.
ensure_package() {
    local program="$1"
    shift
    command -v "$program" >/dev/null 2>&1 && return 0
    [ -x "/usr/sbin/$program" ] && return 0
    [ "$(id -u)" = 0 ] || fail "$program is not installed; run this as root, or install it: apt-get install -y $1"
    echo "installing $program (Debian package $*)" >&2
    apt-get update -qq >&2
    local package
    for package in "$@"; do
        if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >&2; then
            return 0
        fi
    done
    fail "could not install any of the packages: $*"
}

nginx_bin() {
    command -v nginx 2>/dev/null || echo /usr/sbin/nginx
}

genpipe_bin() {
    if [ -n "${GENPIPE_BIN:-}" ]; then
        [ -x "$GENPIPE_BIN" ] || fail "GENPIPE_BIN=$GENPIPE_BIN is not an executable file"
        echo "$GENPIPE_BIN"
        return
    fi
    command -v cargo >/dev/null 2>&1 || fail "cargo is not installed; install Rust (rustup), or give a built binary in GENPIPE_BIN"
    echo "building genpipe (cargo build --release)" >&2
    (cd "$ROOT" && ./scripts/setup.sh >&2 && cargo build --locked --release --bin genpipe >&2)
    local target
    target="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    [ -x "$target/release/genpipe" ] || fail "the build left no binary at $target/release/genpipe"
    echo "$target/release/genpipe"
}

# The configuration the replicas use: $CONFIG, or a copy in the run folder with [ledger] url set
# to $1 when $CONFIG names another server.
replica_config() {
    local url="$1"
    [ -f "$CONFIG" ] || fail "no configuration at $CONFIG (GENPIPE_REPLICAS_CONFIG)"
    grep -q '^kind = "postgres"' "$CONFIG" || fail "$CONFIG: [ledger] kind must be \"postgres\" for replicas to share one ledger"
    if grep -qxF "url = \"$url\"" "$CONFIG"; then
        echo "$CONFIG"
        return
    fi
    grep -q '^url = ' "$CONFIG" || fail "$CONFIG: [ledger] has no url line to point at $url"
    local copy="$RUN/genpipe.toml"
    # The url replaced; a relative compile_cache_dir made absolute (paths in the configuration
    # are relative to its folder), so that the compile cache stays where it was.
    URL="$url" BASE="$(dirname "$CONFIG")" awk '
        /^url = / { print "url = \"" ENVIRON["URL"] "\""; next }
        /^compile_cache_dir = "[^\/"]/ { sub(/= "/, "= \"" ENVIRON["BASE"] "/") }
        { print }' "$CONFIG" >"$copy"
    echo "note: $CONFIG names another PostgreSQL server; the replicas use $copy (url = \"$url\")" >&2
    echo "$copy"
}

start_replica() {
    local n="$1" bin="$2" config="$3" port="${PORTS[$1 - 1]}"
    local pidfile="$RUN/replica-$n.pid" log="$RUN/replica-$n.log" out="$RUN/replica-$n.out"
    if live_pid "$pidfile" "serve" >/dev/null; then
        return 0
    fi
    port_taken "$port" && fail "127.0.0.1:$port is taken by another program (ss -tlnp 'sport = :$port'); stop it first"
    : >"$out"
    # A session of its own (setsid), so that the terminal's hangup does not reach it (genpipe
    # reloads its configuration on SIGHUP); the shell writes its pid, then becomes genpipe.
    setsid bash -c 'cd "$1" && echo $$ >"$2" && shift 2 && exec "$@"' _ "$RUN" "$pidfile" \
        "$bin" serve --config "$config" --listen "127.0.0.1:$port" >"$out" 2>>"$log" </dev/null 8>&- &
}

wait_replica() {
    local n="$1" port="${PORTS[$1 - 1]}" i
    for ((i = 0; i < 600; i++)); do
        if grep -q "genpipe listening on" "$RUN/replica-$n.out" 2>/dev/null && wait_ready "http://127.0.0.1:$port/readyz" 1; then
            return 0
        fi
        if [ -f "$RUN/replica-$n.pid" ] && ! live_pid "$RUN/replica-$n.pid" "serve" >/dev/null; then
            echo "replica $n (127.0.0.1:$port) exited during startup; the end of $RUN/replica-$n.log:" >&2
            tail -n 20 "$RUN/replica-$n.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    fail "replica $n (127.0.0.1:$port) was not ready within 60 s; see $RUN/replica-$n.log"
}

write_nginx_config() {
    mkdir -p "$NGINX_DIR/tmp"
    local user_line=""
    if [ "$(id -u)" = 0 ]; then
        # The workers drop root; they write only request bodies that outgrow their buffer.
        user_line="user nobody nogroup;"
        chown nobody:nogroup "$NGINX_DIR/tmp"
    fi
    local servers="" port
    for port in "${PORTS[@]}"; do
        # Passive health: after 3 failed attempts within 10 s, a replica gets no requests for 10 s.
        servers+="        server 127.0.0.1:$port max_fails=3 fail_timeout=10s;"$'\n'
    done
    cat >"$NGINX_DIR/nginx.conf" <<EOF
# Written by scripts/replicas.sh; rewritten at every start.
$user_line
daemon off;
worker_processes 1;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;

events {
    worker_connections 4096;
}

http {
    access_log $NGINX_DIR/access.log;
    client_body_temp_path $NGINX_DIR/tmp/body;
    proxy_temp_path $NGINX_DIR/tmp/proxy;
    client_max_body_size 1m;
    client_body_buffer_size 128k;   # above genpipe's max_body_bytes: bodies stay in memory

    upstream genpipe {
$servers        keepalive 64;                # idle connections kept open to the replicas
    }

    server {
        listen 127.0.0.1:$LB_PORT;

        location / {
            proxy_pass http://genpipe;
            proxy_http_version 1.1;      # keep-alive to the replicas, and chunked event streams
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            # Server-Sent Events (/v1/runs/ID/events) go out as they come, and a stream may stay
            # quiet for a while (genpipe sends a comment every 15 s); so may Prefer: wait.
            proxy_buffering off;
            proxy_cache off;
            proxy_connect_timeout 2s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            # Another replica gets the request when this one cannot be reached, or answers 502
            # or 503 (draining, or lost its lease). nginx passes a POST on only if it was never
            # sent (the replica refused the connection): a POST /v1/runs that reached a replica
            # may have started a run, and is retried by the client, safely with an
            # Idempotency-Key, never by nginx.
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 10s;
        }

        # No replica could be reached: a problem document, as genpipe's own errors are.
        error_page 502 504 = @no_replica;
        location @no_replica {
            default_type application/problem+json;
            add_header Retry-After 1 always;
            return 503 '{"type":"urn:genpipe:problem:no-replica","title":"Service Unavailable","status":503,"detail":"no genpipe replica answered; retry after the Retry-After delay","retry_after":1}';
        }
    }
}
EOF
}

start_nginx() {
    local nginx
    nginx="$(nginx_bin)"
    if live_pid "$NGINX_DIR/nginx.pid" "nginx" >/dev/null; then
        return 0
    fi
    port_taken "$LB_PORT" && fail "127.0.0.1:$LB_PORT is taken by another program (ss -tlnp 'sport = :$LB_PORT'); stop it first"
    write_nginx_config
    "$nginx" -t -q -p "$NGINX_DIR" -e "$NGINX_DIR/error.log" -c "$NGINX_DIR/nginx.conf" ||
        fail "nginx refused its configuration $NGINX_DIR/nginx.conf (see above)"
    setsid "$nginx" -p "$NGINX_DIR" -e "$NGINX_DIR/error.log" -c "$NGINX_DIR/nginx.conf" \
        >>"$NGINX_DIR/error.log" 2>&1 </dev/null 8>&- &
    local i
    for ((i = 0; i < 100; i++)); do
        live_pid "$NGINX_DIR/nginx.pid" "nginx" >/dev/null && wait_ready "http://127.0.0.1:$LB_PORT/readyz" 1 && return 0
        sleep 0.1
    done
    echo "nginx did not answer on 127.0.0.1:$LB_PORT within 10 s; the end of $NGINX_DIR/error.log:" >&2
    tail -n 20 "$NGINX_DIR/error.log" >&2
    exit 1
}

# Fails, before anything starts, if a port of a part that is not running is taken.
check_ports() {
    local n
    for n in 1 2 3; do
        if ! live_pid "$RUN/replica-$n.pid" "serve" >/dev/null && port_taken "${PORTS[$n - 1]}"; then
            fail "127.0.0.1:${PORTS[$n - 1]} (replica $n) is taken by another program (ss -tlnp 'sport = :${PORTS[$n - 1]}'); stop it first"
        fi
    done
    if ! live_pid "$NGINX_DIR/nginx.pid" "nginx" >/dev/null && port_taken "$LB_PORT"; then
        fail "127.0.0.1:$LB_PORT (nginx) is taken by another program (ss -tlnp 'sport = :$LB_PORT'); stop it first"
    fi
}

start() {
    mkdir -p "$RUN"
    check_ports
    command -v curl >/dev/null 2>&1 || ensure_package curl curl
    ensure_package nginx nginx-light nginx
    local bin url config n
    bin="$(genpipe_bin)"
    # (The lock's descriptor is closed for every process that outlives this script.)
    url="$("$ROOT/scripts/postgres.sh" start 8>&-)"
    config="$(replica_config "$url")"
    "$bin" validate --config "$config" >/dev/null || fail "genpipe validate --config $config failed (see above)"
    for n in 1 2 3; do
        start_replica "$n" "$bin" "$config"
    done
    for n in 1 2 3; do
        wait_replica "$n"
    done
    start_nginx
    status || true
    echo
    echo "ready: curl -H 'Authorization: Bearer demo-key' -H 'Prefer: wait=30' -H 'Content-Type: application/json' \\"
    echo "         -d '{\"pipeline\":\"story\",\"input\":{\"prompt\":\"A storm at sea\"}}' http://127.0.0.1:$LB_PORT/v1/runs"
}

# One line per part; returns 1 if a part is not running or not healthy.
status() {
    local healthy=0 url pid n port code
    if url="$("$ROOT/scripts/postgres.sh" url 2>/dev/null)"; then
        printf '%-12s %-22s %s\n' postgres "running" "$url"
    else
        printf '%-12s %-22s %s\n' postgres "stopped" "$GENPIPE_PG_DIR"
        healthy=1
    fi
    for n in 1 2 3; do
        port="${PORTS[$n - 1]}"
        if pid="$(live_pid "$RUN/replica-$n.pid" "serve")"; then
            code="$(http_status "http://127.0.0.1:$port/readyz")"
            case "$code" in
                200) printf '%-12s %-22s %s\n' "replica $n" "ready (pid $pid)" "http://127.0.0.1:$port  log $RUN/replica-$n.log" ;;
                *)
                    printf '%-12s %-22s %s\n' "replica $n" "NOT READY (/readyz $code)" "http://127.0.0.1:$port  log $RUN/replica-$n.log"
                    healthy=1
                    ;;
            esac
        else
            printf '%-12s %-22s %s\n' "replica $n" "stopped" "http://127.0.0.1:$port"
            healthy=1
        fi
    done
    if pid="$(live_pid "$NGINX_DIR/nginx.pid" "nginx")"; then
        code="$(http_status "http://127.0.0.1:$LB_PORT/readyz")"
        if [ "$code" = 200 ]; then
            printf '%-12s %-22s %s\n' nginx "ready (pid $pid)" "http://127.0.0.1:$LB_PORT  logs $NGINX_DIR/"
        else
            printf '%-12s %-22s %s\n' nginx "NOT READY (/readyz $code)" "http://127.0.0.1:$LB_PORT  logs $NGINX_DIR/"
            healthy=1
        fi
    else
        printf '%-12s %-22s %s\n' nginx "stopped" "http://127.0.0.1:$LB_PORT"
        healthy=1
    fi
    return "$healthy"
}

# Signals the process in pid file $1 (matching $2) with $3, and waits up to $4 s for it to end,
# then kills it.
stop_process() {
    local file="$1" pattern="$2" signal="$3" seconds="$4" pid i
    pid="$(live_pid "$file" "$pattern")" || {
        rm -f "$file"
        return 0
    }
    kill "-$signal" "$pid" 2>/dev/null || true
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || {
            rm -f "$file"
            return 0
        }
        sleep 0.1
    done
    echo "pid $pid ($pattern) did not end within $seconds s after SIG$signal; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop() {
    # nginx first, so that no request reaches a replica that is going away.
    stop_process "$NGINX_DIR/nginx.pid" "nginx" QUIT 10
    local n pid
    for n in 1 2 3; do
        # SIGTERM: stop accepting, let the runs in flight finish (shutdown_grace_secs), settle.
        if pid="$(live_pid "$RUN/replica-$n.pid" "serve")"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for n in 1 2 3; do
        stop_process "$RUN/replica-$n.pid" "serve" TERM "$STOP_WAIT_SECS"
    done
    "$ROOT/scripts/postgres.sh" stop 8>&-
    echo "stopped: nginx, the replicas and PostgreSQL (its folder $GENPIPE_PG_DIR removed); logs stay in $RUN"
}

[ $# -eq 1 ] || usage
mkdir -p "$(dirname "$RUN")"
exec 8>"$RUN.lock"
flock 8
case "$1" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
