#!/usr/bin/env sh
# Builds {{name}}.wasm from app.py with componentize-py (`pip install componentize-py==0.25.1`).
set -e
cd "$(dirname "$0")"
componentize-py -d wit -w {{world}} componentize app -o {{name}}.wasm
