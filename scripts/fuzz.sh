#!/usr/bin/env bash
# Fuzzes the inputs strangers control (the targets in fuzz/, see "Fuzzing" in README.md) with
# cargo-fuzz and libFuzzer on the stable toolchain, without a sanitizer. cargo-fuzz is installed
# once, at a pinned version, into $GENPIPE_TOOLS (default /var/cache/genpipe-tools).
#
#   ./scripts/fuzz.sh                           every target for 20 s (part of scripts/test.sh)
#   FUZZ_SECONDS=600 ./scripts/fuzz.sh plugin   one target (or several) for 10 minutes each
#   ./scripts/fuzz.sh --merge [TARGET...]       add what the last runs found to fuzz/corpus/
#
# Each target starts from fuzz/corpus/TARGET and fuzz/regressions/TARGET and writes the inputs it
# finds to $FUZZ_WORK/TARGET (default ${TMPDIR:-/tmp}/genpipe-fuzz), never to the committed corpus;
# `--merge` then copies into fuzz/corpus/TARGET those of them that reach code the corpus does not.
# Every input has at most 10 s and the process at most 2 GiB: a panic, a timeout or running out
# of memory fails the script, which saves the input in fuzz/artifacts/TARGET/ and says how to
# make it a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOOLS="${GENPIPE_TOOLS:-/var/cache/genpipe-tools}"
CARGO_FUZZ_VERSION=0.13.2
SECONDS_EACH="${FUZZ_SECONDS:-20}"
WORK="${FUZZ_WORK:-${TMPDIR:-/tmp}/genpipe-fuzz}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/fuzz"
# Longest input of each target: bodies and configs past these sizes only take longer to parse.
declare -A MAX_LEN=([config]=8192 [run_body]=4096 [resume_after]=512 [plugin]=65536)

step() { echo "==> $*" >&2; }
die() {
    echo "fuzz: error: $*" >&2
    exit 1
}

merge=0
if [ "${1:-}" = "--merge" ]; then
    merge=1
    shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config run_body resume_after plugin)
for target in "${targets[@]}"; do
    [ -n "${MAX_LEN[$target]:-}" ] || die "no fuzz target '$target'; the targets are: ${!MAX_LEN[*]}"
done

CARGO_FUZZ="$TOOLS/cargo-fuzz/bin/cargo-fuzz"
if [ "$("$CARGO_FUZZ" fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    step "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS/cargo-fuzz"
    cargo install --locked --quiet --version "$CARGO_FUZZ_VERSION" --root "$TOOLS/cargo-fuzz" cargo-fuzz ||
        die "cargo could not install cargo-fuzz $CARGO_FUZZ_VERSION"
fi

# cargo-fuzz has no --locked: check the fuzz crate's Cargo.lock is current first.
cargo metadata --locked --quiet --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null ||
    die "fuzz/Cargo.lock is out of date: run \`cargo update --workspace --manifest-path fuzz/Cargo.toml\`"
step "building the fuzz targets"
# --dev: overflow checks and debug assertions on, and a build of minutes (see fuzz/Cargo.toml).
CARGO_TERM_QUIET=true "$CARGO_FUZZ" fuzz build --dev --sanitizer none --fuzz-dir fuzz --target-dir "$TARGET_DIR" ||
    die "building the fuzz targets failed (see above)"
BIN="$TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/debug"

if [ "$merge" -eq 1 ]; then
    for target in "${targets[@]}"; do
        [ -d "$WORK/$target" ] || die "$WORK/$target does not exist: fuzz $target first"
        step "merging $WORK/$target into fuzz/corpus/$target"
        "$BIN/$target" -merge=1 -max_len="${MAX_LEN[$target]}" -timeout=10 -rss_limit_mb=2048 \
            "fuzz/corpus/$target" "$WORK/$target" >"$WORK/$target-merge.log" 2>&1 ||
            die "merging failed; see $WORK/$target-merge.log"
        grep -E '^MERGE-OUTER: [0-9]+ new files' "$WORK/$target-merge.log" >&2 || true
    done
    echo "fuzz: review the new files in fuzz/corpus/ (keep the corpus small) and commit them" >&2
    exit 0
fi

failed=()
for target in "${targets[@]}"; do
    step "fuzzing $target for ${SECONDS_EACH} s"
    rm -rf "${WORK:?}/$target"
    mkdir -p "$WORK/$target" "fuzz/artifacts/$target"
    dict=()
    [ -f "fuzz/dicts/$target.dict" ] && dict=("-dict=fuzz/dicts/$target.dict")
    regressions=()
    [ -d "fuzz/regressions/$target" ] && regressions=("fuzz/regressions/$target")
    log="$WORK/$target.log"
    # Without a sanitizer, libFuzzer sees no single allocation (-malloc_limit_mb needs a
    # sanitizer's hooks): -rss_limit_mb bounds memory, checked every second, and an allocation
    # too large to make aborts as a crash.
    if "$BIN/$target" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -max_len="${MAX_LEN[$target]}" "${dict[@]}" -artifact_prefix="fuzz/artifacts/$target/" \
        "$WORK/$target" "fuzz/corpus/$target" "${regressions[@]}" >"$log" 2>&1; then
        grep -E '^Done [0-9]+ runs' "$log" | sed "s/^/$target: /" >&2
    else
        tail -n 60 "$log" >&2
        failed+=("$target")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    cat >&2 <<EOF
fuzz: FAILED: ${failed[*]} (the whole log of each: $WORK/TARGET.log)
The failing input is in fuzz/artifacts/TARGET/ (crash-*, timeout-* or oom-*). Replay it with
    $BIN/TARGET fuzz/artifacts/TARGET/FILE
then fix the bug, and keep the input as a regression test, replayed by \`cargo test\`:
    mkdir -p fuzz/regressions/TARGET && cp fuzz/artifacts/TARGET/FILE fuzz/regressions/TARGET/
    cargo test -p genpipe --test fuzz_corpus
EOF
    exit 1
fi
echo "fuzz: no target failed; \`./scripts/fuzz.sh --merge\` adds what they found to fuzz/corpus/" >&2
