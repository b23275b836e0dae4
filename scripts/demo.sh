#!/usr/bin/env bash
# The espgw demo: two gateways with static SAs between two sites, in network namespaces.
#
#   host-a 10.1.0.10 ── [LAN 10.1.0.1  gateway A  203.0.113.1 WAN] ══ ESP in UDP/4500 ══
#       ══ [WAN 203.0.113.2  gateway B  10.2.0.1 LAN] ── host-b 10.2.0.10
#
# Each gateway is `espgw-dataplane run`: the XDP program on both ports, one AF_XDP worker,
# AES-128-GCM SAs. host-a pings host-b, sends a 2 MB TCP transfer through the tunnel (MSS
# clamped to 1360), and a DF ping too big for the tunnel (answered with "fragmentation
# needed" and the MTU that fits). Then both gateways' counters are printed, the gateways are
# stopped and the namespaces removed. Needs root. Everything stays inside the namespaces.
#
#   bash scripts/demo.sh            (ESPGW_BIN=... to use another binary)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${ESPGW_BIN:-$PWD/target/release/espgw-dataplane}
[ -x "$BIN" ] || { echo "demo: $BIN not built (run scripts/setup.sh)" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (network namespaces, XDP)" >&2; exit 2; }

T=edm$$                                  # unique prefix for namespaces and interfaces
NS_HA=${T}ha NS_GA=${T}ga NS_GB=${T}gb NS_HB=${T}hb
WORK=$(mktemp -d /tmp/espgw-demo.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for n in $NS_HA $NS_GA $NS_GB $NS_HB; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
inns() { local n=$1; shift; ip netns exec "$n" "$@"; }

say "building the topology (namespaces $NS_HA $NS_GA $NS_GB $NS_HB)"
for n in $NS_HA $NS_GA $NS_GB $NS_HB; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip link add ${T}a netns $NS_HA type veth peer name ${T}al netns $NS_GA
ip link add ${T}aw netns $NS_GA type veth peer name ${T}bw netns $NS_GB
ip link add ${T}bl netns $NS_GB type veth peer name ${T}b netns $NS_HB
ip -n $NS_HA addr add 10.1.0.10/16 dev ${T}a
ip -n $NS_GA addr add 10.1.0.1/16 dev ${T}al
ip -n $NS_GA addr add 203.0.113.1/24 dev ${T}aw
ip -n $NS_GB addr add 203.0.113.2/24 dev ${T}bw
ip -n $NS_GB addr add 10.2.0.1/16 dev ${T}bl
ip -n $NS_HB addr add 10.2.0.10/16 dev ${T}b
for x in "$NS_HA ${T}a" "$NS_GA ${T}al" "$NS_GA ${T}aw" "$NS_GB ${T}bw" "$NS_GB ${T}bl" "$NS_HB ${T}b"; do
    set -- $x; ip -n "$1" link set "$2" up
done
ip -n $NS_HA route add 10.2.0.0/16 via 10.1.0.1
ip -n $NS_HB route add 10.1.0.0/16 via 10.2.0.1
# The hosts' kernels would send partial checksums over veth (TX offload); real NICs do not.
inns $NS_HA ethtool -K ${T}a tx off >/dev/null
inns $NS_HB ethtool -K ${T}b tx off >/dev/null

KEY_AB=0x$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
KEY_BA=0x$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
CORE_B=$(( $(nproc) > 1 ? 1 : 0 ))
config() { # name wan lan local remote here there key_out key_in spi_out spi_in core
    cat <<EOF
[dataplane]
cores = [${12}]
stats_socket = "$WORK/$1.sock"
tcp_mss = 1360
[dataplane.wan]
interface = "$2"
[dataplane.lan]
interface = "$3"

[[sa]]
name = "to-peer"
direction = "out"
spi = ${10}
local = "$4"
remote = "$5"
encap = { sport = 4500, dport = 4500 }
aead = "aes128gcm16"
key = "$8"
lifetime = { soft_seconds = 100, hard_seconds = 120 }

[[sa]]
name = "from-peer"
direction = "in"
spi = ${11}
local = "$4"
remote = "$5"
encap = { sport = 4500, dport = 4500 }
aead = "aes128gcm16"
key = "$9"
replay_window = 1024
selectors = [{ src = "$7", dst = "$6" }]

[[policy]]
src = "$6"
dst = "$7"
action = "protect"
sa = "to-peer"
EOF
}
config a ${T}aw ${T}al 203.0.113.1 203.0.113.2 10.1.0.0/16 10.2.0.0/16 "$KEY_AB" "$KEY_BA" 0x1001 0x2001 0 > "$WORK/a.toml"
config b ${T}bw ${T}bl 203.0.113.2 203.0.113.1 10.2.0.0/16 10.1.0.0/16 "$KEY_BA" "$KEY_AB" 0x2001 0x1001 "$CORE_B" > "$WORK/b.toml"

say "starting gateway A and gateway B (espgw-dataplane run)"
for g in a b; do
    ns=$NS_GA; [ $g = b ] && ns=$NS_GB
    # Not through a shell function: $! must be the gateway itself (ip netns exec execs it).
    ip netns exec $ns "$BIN" --log info run --config "$WORK/$g.toml" > "$WORK/$g.out" 2> "$WORK/$g.err" &
    PIDS+=($!)
done
for g in a b; do
    for _ in $(seq 100); do [ -S "$WORK/$g.sock" ] && break; sleep 0.1; done
    [ -S "$WORK/$g.sock" ] || { echo "gateway $g did not start:"; cat "$WORK/$g.err"; exit 1; }
    grep -h "AF_XDP socket bound\|running" "$WORK/$g.err" | sed 's/^/  /' || true
done

say "host-a pings host-b through the tunnel"
# The gateways learn next hops from their kernels (ARP stays with the kernel): the very first
# packet towards a new neighbour is dropped as no_neighbor while the kernel resolves it.
inns $NS_HA ping -c 2 -i 0.3 -W 1 10.2.0.10 >/dev/null 2>&1 || true
inns $NS_HA ping -c 5 -i 0.2 -W 2 10.2.0.10 | sed 's/^/  /' || true

say "host-a sends 2 MB over TCP to host-b (MSS clamped to 1360 by the gateways)"
inns $NS_HB python3 - "$WORK/rx" 2>"$WORK/rx.err" <<'EOF' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.2.0.10", 5001)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20); n = 0; mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
while (b := c.recv(65536)): n += len(b)
open(sys.argv[1], "w").write(f"{n} {mss}\n")
EOF
RX=$!
sleep 0.5
inns $NS_HA python3 - <<'EOF'
import socket, time
t = time.time(); s = socket.create_connection(("10.2.0.10", 5001), timeout=20)
s.sendall(bytes(range(256)) * 8192); s.close()
print(f"  sent 2097152 bytes in {time.time() - t:.2f} s")
EOF
wait $RX || true
read -r GOT MSS < "$WORK/rx" || { GOT=0; MSS=?; cat "$WORK/rx.err"; }
echo "  host-b received $GOT bytes (its TCP MSS for the connection: $MSS)"

say "a DF ping too big for the tunnel gets 'fragmentation needed' with the MTU that fits"
inns $NS_HA ping -c 1 -M do -s 1472 -W 2 10.2.0.10 2>&1 | grep -iE "mtu|frag" | head -2 | sed 's/^/  /' || true

sleep 0.3
for g in a b; do
    say "gateway ${g^^}: espgw-dataplane stats"
    "$BIN" stats --socket "$WORK/$g.sock" | sed 's/^/  /'
done

say "stopping both gateways (SIGTERM): XDP detached, final counters printed as JSON"
for p in "${PIDS[@]}"; do kill -TERM "$p"; done
for p in "${PIDS[@]}"; do wait "$p"; done
PIDS=()
left=$(ip -n $NS_GA link show; ip -n $NS_GB link show)
if grep -q "prog/xdp" <<<"$left"; then echo "  an XDP program was left behind!"; exit 1; fi
echo "  no XDP program left on the gateways' interfaces"
if grep -h "frame accounting" "$WORK"/a.err "$WORK"/b.err; then
    echo "  a gateway lost track of its AF_XDP frames!"; exit 1
fi
if [ "$GOT" = 2097152 ]; then
    echo; echo "demo OK: ping, 2 MB TCP and the PMTU answer went through two espgw gateways."
else
    echo; echo "demo FAILED: the TCP transfer did not complete ($GOT bytes)"; exit 1
fi
