#!/usr/bin/env bash
# Install everything espgw needs on a fresh Debian 12 machine, then build it.
# Idempotent: a second run only checks. Run as root (or with sudo).
#
#   bash scripts/setup.sh            install and build (release)
#   ESPGW_SETUP_QUICK=1 ...          skip the release build (used by scripts/test.sh)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# --- Debian packages -----------------------------------------------------------------------
# python3-venv: the scapy cross-check runs in a project-local virtualenv (.venv);
# clang, libbpf-dev: the XDP steering program (ebpf/, C built with clang -target bpf);
# m4, libelf-dev, zlib1g-dev: xsk-rs builds libxdp/libbpf from C for the AF_XDP sockets;
# iproute2, ethtool, iputils-ping, tcpdump: the network-namespace tests and the demo.
APT_PACKAGES=(ca-certificates curl build-essential pkg-config clang llvm libbpf-dev m4 libelf-dev
    zlib1g-dev iproute2 ethtool iputils-ping tcpdump)
# A Python with venv support that is not Debian's (pyenv, as on the CI images) is fine too.
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    APT_PACKAGES+=(python3 python3-venv python3-pip)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# --- Rust toolchain ------------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
    log "installing rustup and the stable toolchain"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
for c in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
        log "rustup component add $c"
        rustup component add "$c"
    fi
done

# --- cargo tools (pinned versions, built from crates.io) ------------------------------------
install_tool() { # name version binary
    if ! command -v "$3" >/dev/null || ! "$3" --version 2>/dev/null | grep -q "$2"; then
        log "cargo install $1@$2"
        cargo install --locked --quiet "$1@$2"
    fi
}
install_tool cargo-deny 0.20.2 cargo-deny
install_tool cargo-fuzz 0.13.2 cargo-fuzz

# --- Python: scapy, the independent ESP implementation for the cross-check -------------------
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    log "creating .venv"
    python3 -m venv "$ROOT/.venv"
fi
if ! "$ROOT/.venv/bin/python" -c 'import scapy, cryptography' 2>/dev/null; then
    log "pip install scapy cryptography (into .venv)"
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check 'scapy==2.8.0' 'cryptography>=42'
fi

# --- Build ---------------------------------------------------------------------------------
if [ -z "${ESPGW_SETUP_QUICK:-}" ]; then
    log "cargo build --release"
    cargo build --release --quiet --workspace
fi
log "ready"
