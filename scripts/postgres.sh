#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests and benchmarks of the PostgreSQL ledger.
#
#   scripts/postgres.sh start   installs the Debian package if needed, creates the cluster on first
#                               use, starts it (if it is not running) and prints its URL
#   scripts/postgres.sh url     prints the URL of the running server
#   scripts/postgres.sh stop    stops it and removes its folder
#
# The cluster lives in $GENPIPE_PG_DIR (default /tmp/genpipe-postgres), listens only on a Unix
# socket in that folder (port $GENPIPE_PG_PORT, default 54329, names the socket), and runs as the
# unprivileged user `postgres` when this script runs as root (as in CI): PostgreSQL refuses to
# run as root. The role `genpipe` (trusted on the socket, allowed to create databases, so each
# test makes its own) owns the database `genpipe`. fsync and synchronous_commit keep their
# defaults (on): the benchmarks measure durable commits. Safe to run from several processes at
# once: the steps run under a lock on the file "$GENPIPE_PG_DIR.lock" (which the server does
# not inherit).
set -euo pipefail

DIR="${GENPIPE_PG_DIR:-/tmp/genpipe-postgres}"
PORT="${GENPIPE_PG_PORT:-54329}"
DATA="$DIR/data"
LOG="$DIR/server.log"
URL="postgres:///genpipe?host=$DIR&port=$PORT&user=genpipe"

usage() {
    echo "usage: $0 start|stop|url" >&2
    exit 2
}

# The PostgreSQL programs of the newest installed version.
bindir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

install() {
    if [ -n "$(bindir)" ] && [ -x "$(bindir)/initdb" ]; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "PostgreSQL's server is not installed; run as root: apt-get install -y postgresql" >&2
        exit 1
    fi
    echo "installing PostgreSQL (the Debian package postgresql)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

# Runs a command as the cluster's owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

running() {
    [ -f "$DATA/postmaster.pid" ] && as_owner "$(bindir)/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

start() {
    install
    local bin
    bin="$(bindir)"
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$DIR"
    fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
        rm -rf "$DATA"
        as_owner "$bin/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    fi
    if ! running; then
        as_owner "$bin/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
            -o "-k $DIR -p $PORT -c listen_addresses='' -c max_connections=300" start >/dev/null 9>&-
    fi
    local psql=("$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
    if [ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'genpipe'")" != 1 ]; then
        "${psql[@]}" -c "CREATE ROLE genpipe LOGIN CREATEDB"
    fi
    if [ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'genpipe'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE genpipe OWNER genpipe"
    fi
    echo "$URL"
}

stop() {
    if [ -d "$DATA" ] && [ -n "$(bindir)" ] && running; then
        as_owner "$(bindir)/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
    rm -rf "$DIR"
}

[ $# -eq 1 ] || usage
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
case "$1" in
    start) start ;;
    stop) stop ;;
    url)
        if ! running; then
            echo "no PostgreSQL runs in $DIR; start it with $0 start" >&2
            exit 1
        fi
        echo "$URL"
        ;;
    *) usage ;;
esac
