#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted bytes (fuzz/, cargo-fuzz
# + libFuzzer on nightly). See README "Fuzzing".
#
#   scripts/fuzz.sh smoke              every target ~10 s (CI); fails on any crash
#   scripts/fuzz.sh long SECONDS [T…]  every target (or the named ones) SECONDS
#                                      each, one after the other; prints
#                                      executions, coverage and crashes per target
#
# cargo-fuzz (pinned) is installed once into $BASTION_TOOLS (default
# ~/.cache/bastion-tools), outside the checkout; build artifacts stay in
# fuzz/target (git-ignored) and are reused. Each run starts from the seed
# corpus fuzz/corpus/<target> (read only) plus a working corpus in
# fuzz/target/corpus/<target> that grows from run to run. A crashing input is
# written to fuzz/artifacts/<target>/: fix the bug, add a regression test to
# the crate's tests and copy the input into fuzz/corpus/<target>.
#
# Environment: BASTION_TOOLS, FUZZ_SMOKE_SECONDS (default 10), FUZZ_JOBS
# (cargo build jobs, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TOOLS=${BASTION_TOOLS:-$HOME/.cache/bastion-tools}
export PATH="$TOOLS/bin:$PATH"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export CARGO_BUILD_JOBS=${FUZZ_JOBS:-${CARGO_BUILD_JOBS:-2}}

# One per parser of untrusted bytes (ARCHITECTURE.md, "fuzz/").
TARGETS=(pdu pdata dimse_command scan ingest_parse cfind_query multipart qido blob_reader audit_record)

# Safe Rust only (`unsafe_code = "forbid"`): no sanitizer, so that the
# targets run at full speed; libFuzzer still catches panics, overflows
# (debug assertions), timeouts and oversized allocations.
FUZZ_FLAGS=(--sanitizer none)
# 2 GiB RSS / single allocation cap, 10 s per input: a hostile length that
# makes a parser allocate what it declares, or a loop that never ends, fails.
LIBFUZZER_FLAGS=(-rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 -print_final_stats=1)

step() { printf '\n==> %s\n' "$*"; }

usage() {
    sed -n '2,9p' "$0" >&2
    exit 2
}

install_tools() {
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        step "installing the nightly toolchain (minimal profile)"
        rustup toolchain install nightly --profile minimal
    fi
    if [[ "$(cargo-fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
        step "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS"
        cargo install cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --locked --root "$TOOLS"
    else
        echo "cargo-fuzz $CARGO_FUZZ_VERSION cached in $TOOLS"
    fi
}

# run TARGET SECONDS: fuzz one target; prints libFuzzer's summary; returns
# non-zero on a crash, a timeout or an out-of-memory input.
run() {
    local t=$1 secs=$2 log
    mkdir -p "fuzz/target/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/target/$t.log"
    if cargo +nightly fuzz run "${FUZZ_FLAGS[@]}" "$t" "fuzz/target/corpus/$t" "fuzz/corpus/$t" -- \
        "${LIBFUZZER_FLAGS[@]}" -max_total_time="$secs" >"$log" 2>&1; then
        summary "$t" "$log" ok
    else
        summary "$t" "$log" FAILED
        echo "--- last lines of $log:" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
}

# summary TARGET LOG RESULT: one line per target: executions, coverage
# (libFuzzer's cov = edges, ft = features), corpus size, crashes.
summary() {
    local t=$1 log=$2 result=$3 execs cov ft corp crashes
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
    corp=$(grep -oE 'corp: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
    crashes=$(find "fuzz/artifacts/$t" -type f -newer "$log.start" 2>/dev/null | wc -l)
    printf '%-14s %-6s execs=%-10s cov=%-6s ft=%-6s corpus=%-6s new-artifacts=%s\n' \
        "$t" "$result" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes"
}

fuzz_all() {
    local secs=$1
    shift
    local failed=()
    for t in "$@"; do
        touch "fuzz/target/$t.log.start"
        run "$t" "$secs" || failed+=("$t")
    done
    # Scratch directories of the blob and audit targets (tmpfs).
    rm -rf /dev/shm/bastion-fuzz-* "${TMPDIR:-/tmp}"/bastion-fuzz-* 2>/dev/null || true
    if ((${#failed[@]})); then
        echo "fuzzing failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
        return 1
    fi
}

# fuzz/target (build artifacts, working corpus, logs) lives outside the
# checkout, in $BASTION_FUZZ_CACHE (default ~/.cache/bastion-fuzz), so a
# fresh clone (CI) reuses the nightly builds of aws-lc-sys, SQLCipher & co.
# An existing fuzz/target directory (a developer's) is used as it is.
fuzz_target_dir() {
    if [[ ! -e fuzz/target ]]; then
        local cache=${BASTION_FUZZ_CACHE:-$HOME/.cache/bastion-fuzz}
        mkdir -p "$cache/target"
        ln -s "$cache/target" fuzz/target
    fi
    mkdir -p fuzz/target
}

mode=${1:-}
case "$mode" in
smoke)
    secs=${FUZZ_SMOKE_SECONDS:-10}
    install_tools
    step "building the fuzz targets (nightly, fuzz/target)"
    fuzz_target_dir
    cargo +nightly fuzz build "${FUZZ_FLAGS[@]}"
    step "fuzz smoke: ${#TARGETS[@]} targets, ${secs} s each"
    fuzz_all "$secs" "${TARGETS[@]}"
    ;;
long)
    secs=${2:-}
    [[ "$secs" =~ ^[0-9]+$ ]] || usage
    shift 2
    targets=("$@")
    ((${#targets[@]})) || targets=("${TARGETS[@]}")
    install_tools
    fuzz_target_dir
    cargo +nightly fuzz build "${FUZZ_FLAGS[@]}"
    step "fuzz long run: ${targets[*]}, ${secs} s each"
    fuzz_all "$secs" "${targets[@]}"
    ;;
*)
    usage
    ;;
esac
