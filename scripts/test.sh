#!/usr/bin/env bash
# Run every test espgw has: formatting, lints, licences, unit and property tests, known-answer
# tests, the scapy cross-check, the fuzz targets (bounded), the root tests in network namespaces
# (XDP steering, netlink next hops, the live gateway against a scapy peer, rekeying through the
# SA ring under traffic), the benchmark smoke runs and both demos. Installs what is missing
# first (scripts/setup.sh). Run as root: the namespace tests need it (they are marked #[ignore]
# for `cargo test` without root).
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

step "root tests in network namespaces: XDP steering, kernel next hops (cargo test -- --ignored)"
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the namespace tests need root (CI runs as root)" >&2
    exit 1
fi
cargo test --quiet -p espgw-dataplane --test xdp_steering --test netlink_nexthops -- --ignored

step "release build"
cargo build --release --quiet -p espgw-dataplane -p espgw-ringctl
BIN=$ROOT/target/release/espgw-dataplane
RINGCTL=$ROOT/target/release/espgw-ringctl

step "cross-check against scapy (independent ESP implementation)"
"$ROOT/.venv/bin/python" tests/scapy/crosscheck.py --bin "$BIN"

step "end to end: the gateway between namespaces, against a scapy peer"
ESPGW_BIN="$BIN" "$ROOT/.venv/bin/python" -m unittest tests/e2e/test_gateway.py -v

step "end to end: make-before-break rekeying every second under traffic (SA ring, espgw-ringctl)"
ESPGW_BIN="$BIN" ESPGW_RINGCTL="$RINGCTL" "$ROOT/.venv/bin/python" -m unittest tests/e2e/test_rekey.py -v

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

step "SA scaling benchmark (smoke: installs through the SA ring, memory, lookups; figures: benches/README.md)"
cargo run --release --quiet -p espgw-benches --bin espgw-sa-scale -- --quick

step "forwarding benchmark over veth (smoke: one short round, also while SAs are installed; figures: bash benches/fwd.sh)"
ESPGW_BIN="$BIN" ESPGW_RINGCTL="$RINGCTL" bash benches/fwd.sh --quick --churn 20000

step "offline demo (espgw-dataplane demo: two gateways in one process, captures)"
DEMO_DIR=$(mktemp -d)
"$BIN" demo --out "$DEMO_DIR" | tee "$DEMO_DIR/summary.txt"
grep -q "40 of 40 plaintext frames arrived" "$DEMO_DIR/summary.txt"
rm -rf "$DEMO_DIR"

step "demo (the README's first command): two live gateways in namespaces"
ESPGW_BIN="$BIN" bash scripts/demo.sh | tee /tmp/espgw-demo-$$.txt
grep -q "^demo OK" /tmp/espgw-demo-$$.txt
rm -f /tmp/espgw-demo-$$.txt

step "all tests passed"
