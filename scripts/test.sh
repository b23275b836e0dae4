#!/usr/bin/env bash
# Run every test espgw has: formatting, lints, licences, unit and property tests, known-answer
# tests, the scapy cross-check, the fuzz targets (bounded), the benchmark smoke run and the demo.
# Installs what is missing first (scripts/setup.sh). Run as root.
#
#   bash scripts/test.sh                 everything
#   ESPGW_FUZZ_SECONDS=300 ...           fuzz longer (default 60 s per target)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ_SECONDS=${ESPGW_FUZZ_SECONDS:-60}
step() { printf '\n\033[1m== %s\033[0m (%s)\n' "$*" "$(date +%T)"; }

step "set-up"
ESPGW_SETUP_QUICK=1 bash scripts/setup.sh

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "licences and banned crates"
cargo deny --log-level error check licenses bans sources

step "unit, property and known-answer tests"
cargo test --workspace --quiet

step "release build"
cargo build --release --quiet -p espgw-dataplane
BIN=$ROOT/target/release/espgw-dataplane

step "cross-check against scapy (independent ESP implementation)"
"$ROOT/.venv/bin/python" tests/scapy/crosscheck.py --bin "$BIN"

step "fuzz: inbound and outbound paths, ${FUZZ_SECONDS}s each"
for t in inbound outbound; do
    log=$(mktemp)
    if ! (cd dataplane/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- \
        -max_total_time="$FUZZ_SECONDS" -print_final_stats=1) >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $t failed (crash or build error): see above" >&2
        exit 1
    fi
    grep -E "^(Done [0-9]+ runs|stat::number_of_executed_units)" "$log" | sed "s/^/  $t: /"
    rm -f "$log"
done

step "benchmarks (smoke: each case once)"
cargo bench --quiet -p espgw-benches -- --test

step "demo (the README's first command)"
DEMO_DIR=$(mktemp -d)
"$BIN" demo --out "$DEMO_DIR" | tee "$DEMO_DIR/summary.txt"
grep -q "40 of 40 plaintext frames arrived" "$DEMO_DIR/summary.txt"
rm -rf "$DEMO_DIR"

step "all tests passed"
