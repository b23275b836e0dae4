#!/usr/bin/env python3
"""Make-before-break rekeying through the shared-memory SA ring, live (issue 4).

Two espgw gateways with no static SA, each creating its SA ring; `espgw-ringctl tunnel` plays
both IKE peers: it installs a tunnel between them through the two rings and rekeys it every
second. Continuous numbered UDP flows go both ways the whole time; every datagram must arrive
and neither gateway may drop a packet as a replay. Then the control tool is killed with SIGKILL
while the flows go on: the data planes keep forwarding with the SAs they have.

    host-a 10.1.0.10 <-> [LAN 10.1.0.1  gateway A  203.0.113.1 WAN] <-> ESP (in UDP/4500)
        <-> [WAN 203.0.113.2  gateway B  10.2.0.1 LAN] <-> host-b 10.2.0.10

Namespace, interface and segment names carry the test process's pid; everything is removed
afterwards, also on failure. Run as root from the repository root:

    .venv/bin/python -m unittest tests/e2e/test_rekey.py -v

ESPGW_REKEY_SECONDS sets how long the rekeying runs (default 22 s; a soak run sets more).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_gateway as tg  # noqa: E402  (the shared plumbing: agents, gateway processes)

_ctl = Path(os.environ.get("ESPGW_RINGCTL", "target/release/espgw-ringctl"))
RINGCTL = _ctl if _ctl.is_absolute() else tg.REPO / _ctl
REKEY_SECONDS = float(os.environ.get("ESPGW_REKEY_SECONDS", "22"))
RATE = 400  # datagrams per second each way
# Drops that would mean the rekeying lost or refused packets.
BAD_DROPS = ("replay", "too_old", "unknown_spi", "auth_failed", "no_sa", "lifetime_expired",
             "selector_mismatch", "policy_discard", "no_policy")


class TwoGateways:
    """host-a <-> gateway A <-> gateway B <-> host-b, names unique to this process."""

    def __init__(self) -> None:
        pid = os.getpid()
        base = f"espgw-rk-{pid}"
        self.ns = {k: f"{base}-{k}" for k in ("ha", "ga", "gb", "hb")}
        tag = f"r{pid}"
        self.ifs = {k: tag + k for k in ("a", "al", "aw", "bw", "bl", "b")}
        assert max(len(x) for x in self.ifs.values()) <= 15
        self.created: list[str] = []

    def create(self) -> None:
        for ns in self.ns.values():
            tg.sh("ip", "netns", "add", ns)
            self.created.append(ns)
            tg.sh("ip", "-n", ns, "link", "set", "lo", "up")
            tg.sh("ip", "netns", "exec", ns, "sysctl", "-qw",
                  "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        n, i = self.ns, self.ifs
        for (a, na), (b, nb) in (((i["a"], n["ha"]), (i["al"], n["ga"])),
                                 ((i["aw"], n["ga"]), (i["bw"], n["gb"])),
                                 ((i["bl"], n["gb"]), (i["b"], n["hb"]))):
            tg.sh("ip", "link", "add", a, "netns", na, "type", "veth", "peer", "name", b,
                  "netns", nb)
        for ns, ifname, addr in ((n["ha"], i["a"], "10.1.0.10/16"),
                                 (n["ga"], i["al"], "10.1.0.1/16"),
                                 (n["ga"], i["aw"], "203.0.113.1/24"),
                                 (n["gb"], i["bw"], "203.0.113.2/24"),
                                 (n["gb"], i["bl"], "10.2.0.1/16"),
                                 (n["hb"], i["b"], "10.2.0.10/16")):
            tg.sh("ip", "-n", ns, "addr", "add", addr, "dev", ifname)
            tg.sh("ip", "-n", ns, "link", "set", ifname, "up")
            # The hosts' kernels would send partial checksums over veth (ENVIRONMENT.md).
            tg.sh("ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off")
        tg.sh("ip", "-n", n["ha"], "route", "add", "10.2.0.0/16", "via", "10.1.0.1")
        tg.sh("ip", "-n", n["hb"], "route", "add", "10.1.0.0/16", "via", "10.2.0.1")
        # Next hops come from the gateways' kernels: resolve them before any traffic.
        for ns, addr in ((n["ga"], "10.1.0.10"), (n["ga"], "203.0.113.2"),
                         (n["gb"], "10.2.0.10"), (n["gb"], "203.0.113.1"),
                         (n["ha"], "10.1.0.1"), (n["hb"], "10.2.0.1")):
            tg.sh("ip", "netns", "exec", ns, "ping", "-c1", "-W2", addr)

    def destroy(self) -> None:
        for ns in self.created:
            for pid in tg.sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in self.created:
            tg.sh("ip", "netns", "del", ns, check=False)
        self.created = []


def gateway_config(wan: str, lan: str, stats: Path, ring: str, core: int) -> str:
    return f"""
[dataplane]
cores = [{core}]
stats_socket = "{stats}"
ring = "{ring}"
[dataplane.wan]
interface = "{wan}"
[dataplane.lan]
interface = "{lan}"
"""


class RingCtl:
    """`espgw-ringctl` with its JSON lines on stdout."""

    def __init__(self, args: list[str]) -> None:
        self.cmd = [str(RINGCTL)] + args
        self.p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        self.out = tg.LineReader(self.p.stdout)
        self.err = tg.LineReader(self.p.stderr)
        self.records: list[dict] = []

    def wait_for(self, key: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            line = self.out.next_line(deadline, self.p,
                                      f"{key!r} from {' '.join(self.cmd)} within {timeout} s",
                                      self.err)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.records.append(rec)
            if key in rec:
                return rec

    def parsed(self) -> list[dict]:
        out = []
        for line in self.out.lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(5)
        self.out.t.join(5)
        self.err.t.join(5)


def ring_thread_nice(pid: int) -> int | None:
    """The nice value of the process's "espgw-ring" thread (None: no such thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm == "espgw-ring":
            # Fields after the command: state is field 3, nice field 19 (proc(5)).
            return int(stat[stat.rindex(")") + 2:].split()[16])
    return None


class TestRekey(tg.GatewayTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        if not RINGCTL.is_file():
            raise AssertionError(f"no control tool at {RINGCTL}: build it "
                                 "(cargo build --release -p espgw-ringctl) or set ESPGW_RINGCTL")

    def start_gateway(self, topo: TwoGateways, side: str, core: int) -> tuple[tg.Gateway, str]:
        ns = topo.ns["g" + side]
        stats = self.work / f"{side}.sock"
        ring = f"/dev/shm/espgw-rk-{os.getpid()}-{side}.ring"
        self.addCleanup(lambda: Path(ring).unlink(missing_ok=True))
        cfg = self.work / f"{side}.toml"
        cfg.write_text(gateway_config(topo.ifs[side + "w"], topo.ifs[side + "l"], stats, ring,
                                      core))
        gw = tg.Gateway(types.SimpleNamespace(ns_gw=ns), cfg, stats)
        self.gateways.append(gw)
        self.addCleanup(self._stop_gateway, gw)
        gw.start()
        return gw, ring

    def test_rekey_every_second_under_traffic_then_kill_the_control_tool(self) -> None:
        topo = TwoGateways()
        self.addCleanup(topo.destroy)
        topo.create()
        cores = os.sched_getaffinity(0)
        core_b = 1 if 1 in cores else 0
        gw_a, ring_a = self.start_gateway(topo, "a", 0)
        gw_b, ring_b = self.start_gateway(topo, "b", core_b)

        ctl = RingCtl(["tunnel", "--a-ring", ring_a, "--b-ring", ring_b,
                       "--a-addr", "203.0.113.1", "--b-addr", "203.0.113.2",
                       "--a-net", "10.1.0.0/16", "--b-net", "10.2.0.0/16",
                       "--encap", "4500:4500", "--rekey-every", "1",
                       "--duration", "3600"])
        self.addCleanup(ctl.kill)
        ctl.wait_for("established", 20)

        # Warm up: both directions through the tunnel (the hosts' ARP for their gateways).
        for ns, dst in ((topo.ns["ha"], "10.2.0.10"), (topo.ns["hb"], "10.1.0.10")):
            tg.sh("ip", "netns", "exec", ns, "ping", "-c2", "-i0.2", "-W2", dst, check=False)

        seconds = REKEY_SECONDS + 4
        rx_b = self.agent(topo.ns["hb"], "udp_count", "--port", "5001", "--idle", "3",
                          "--timeout", str(seconds + 30)).ready()
        rx_a = self.agent(topo.ns["ha"], "udp_count", "--port", "5002", "--idle", "3",
                          "--timeout", str(seconds + 30)).ready()
        t0 = time.monotonic()
        tx_a = self.agent(topo.ns["ha"], "udp_stream", "--dst", "10.2.0.10", "--dport", "5001",
                          "--rate", str(RATE), "--seconds", str(seconds))
        tx_b = self.agent(topo.ns["hb"], "udp_stream", "--dst", "10.1.0.10", "--dport", "5002",
                          "--rate", str(RATE), "--seconds", str(seconds))

        # Rekeys every second while the flows run, then SIGKILL of the control tool with
        # ~4 s of traffic still to go.
        time.sleep(max(0.0, REKEY_SECONDS - (time.monotonic() - t0)))
        ctl.kill()
        killed_at = time.monotonic() - t0
        records = ctl.parsed()
        rekeys = [r for r in records if "rekey" in r]
        # The data planes report the first packet on every inbound SA: traffic really moved
        # to each new pair (two inbound SAs per rekey, plus the first pair).
        first = {(r.get("side"), json.dumps(r.get("sa"), sort_keys=True))
                 for r in records if r.get("event") == "first_packet"}

        sent_a = tx_a.result(seconds + 30)["sent"]
        sent_b = tx_b.result(seconds + 30)["sent"]
        got_b = rx_b.result(40)
        got_a = rx_a.result(40)

        problems: list[str] = []
        if len(rekeys) < int(REKEY_SECONDS) - 2:
            problems.append(f"only {len(rekeys)} rekeys in {REKEY_SECONDS} s: "
                            f"{ctl.err.text()[-2000:]}")
        if len(first) < 2 * len(rekeys):
            problems.append(f"first packets on {len(first)} inbound SAs, expected at least "
                            f"{2 * len(rekeys)} after {len(rekeys)} rekeys")
        for name, sent, got in (("a->b", sent_a, got_b), ("b->a", sent_b, got_a)):
            if got["unique"] != sent or got["missing"]:
                problems.append(f"{name}: sent {sent}, {got['unique']} arrived, first missing "
                                f"{got['missing'][:20]}")
        for side, gw in (("A", gw_a), ("B", gw_b)):
            nice = ring_thread_nice(gw.p.pid)
            if nice != 19:
                problems.append(f"gateway {side}: the espgw-ring thread runs at nice {nice}, "
                                "not at the default ring_nice 19")
            st = gw.stats()
            errors = tg.dig(st, "totals", "drops", "errors", default={}) or {}
            bad = {k: v for k, v in errors.items() if k in BAD_DROPS}
            if bad:
                problems.append(f"gateway {side} dropped packets: {bad}")
            if not gw.running():
                problems.append(f"gateway {side} is not running")
        sys.stderr.write(f"\n  {len(rekeys)} rekeys, {len(first)} inbound SAs used, control tool killed at {killed_at:.1f} s; "
                         f"a->b {got_b['unique']}/{sent_a}, b->a {got_a['unique']}/{sent_b}\n")
        self.fail_if(problems, "make-before-break rekeying under traffic")


if __name__ == "__main__":
    unittest.main()
