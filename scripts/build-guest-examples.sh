#!/usr/bin/env bash
# Builds the Python and JavaScript example plugins (plugins/python-llm, plugins/js-image) into
# $GUEST_OUT (default $CARGO_TARGET_DIR/guest-examples), installing the pinned tools first into
# $GENPIPE_TOOLS (default /var/cache/genpipe-tools): componentize-py from PyPI in a virtualenv,
# componentize-js from the npm registry. Safe to run again: a tool already installed at its
# pinned version is kept, and a plugin is rebuilt only when its sources changed.
#
# Exits non-zero, naming what failed, if a tool cannot be installed or a plugin does not build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOOLS="${GENPIPE_TOOLS:-/var/cache/genpipe-tools}"
OUT="${GUEST_OUT:-${CARGO_TARGET_DIR:-$ROOT/target}/guest-examples}"
COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_JS_VERSION=0.23.0

step() { echo "==> $*" >&2; }
die() {
    echo "build-guest-examples: error: $*" >&2
    exit 1
}

mkdir -p "$TOOLS" "$OUT"

# componentize-py, in its own virtualenv.
PY="$TOOLS/venv/bin/componentize-py"
if [ "$("$TOOLS/venv/bin/componentize-py" --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
    step "installing componentize-py $COMPONENTIZE_PY_VERSION into $TOOLS/venv"
    command -v python3 >/dev/null || die "python3 is not installed"
    python3 -m venv "$TOOLS/venv" || die "cannot create a virtualenv in $TOOLS/venv (Debian: apt-get install python3-venv)"
    "$TOOLS/venv/bin/pip" install --quiet "componentize-py==$COMPONENTIZE_PY_VERSION" ||
        die "pip could not install componentize-py $COMPONENTIZE_PY_VERSION"
fi

# componentize-js, in a node_modules of its own.
JS_MODULES="$TOOLS/node/node_modules"
if ! grep -qs "\"version\": \"$COMPONENTIZE_JS_VERSION\"" "$JS_MODULES/@bytecodealliance/componentize-js/package.json"; then
    step "installing @bytecodealliance/componentize-js $COMPONENTIZE_JS_VERSION into $TOOLS/node"
    command -v npm >/dev/null || die "npm is not installed (Debian: apt-get install nodejs npm)"
    npm install --silent --no-audit --no-fund --prefix "$TOOLS/node" "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION" ||
        die "npm could not install @bytecodealliance/componentize-js $COMPONENTIZE_JS_VERSION"
fi

# Rebuilds OUT from SOURCES with COMMAND... when a source is newer than OUT.
build() { # OUT "SOURCES" COMMAND...
    local out=$1 sources=$2
    shift 2
    local stale=1
    if [ -f "$out" ]; then
        stale=0
        for source in $sources; do
            if [ "$source" -nt "$out" ]; then stale=1; fi
        done
    fi
    if [ "$stale" -eq 1 ]; then
        step "building $(basename "$out")"
        # Only the folder goes to stdout (callers capture it): the tools' messages go to stderr.
        "$@" >&2 || die "building $out failed (see above)"
    fi
}

WIT="$ROOT/wit/0.1.0"
build "$OUT/python_llm.wasm" "plugins/python-llm/app.py $WIT/worlds.wit $WIT/types.wit" \
    sh -c "cd plugins/python-llm && '$PY' -d '$WIT' -w llm-step componentize app -o '$OUT/python_llm.wasm'"
# Node resolves the tool from a node_modules beside the script's folder: link the installed one.
ln -sfn "$JS_MODULES" plugins/js-image/node_modules
build "$OUT/js_image.wasm" "plugins/js-image/plugin.js plugins/js-image/build.mjs $WIT/worlds.wit $WIT/types.wit" \
    node plugins/js-image/build.mjs "$OUT/js_image.wasm"
echo "$OUT"
