#!/usr/bin/env python3
"""Packet I/O helper for the end-to-end tests, run inside a network namespace.

Python 3.11 has no ``os.setns``, so the tests run this script with
``ip netns exec NS .venv/bin/python tests/e2e/nsagent.py CMD ...``. It does raw I/O only; all
crafting, encryption and checking happens in the test process. Every command prints JSON lines
on stdout: commands that must be running before the test sends anything (``sniff``,
``udp_listen``) first print ``{"ready": true}`` and then one result line.

Commands:
  sniff --iface IF --filter BPF [--count N] [--timeout S]
      scapy AsyncSniffer on IF; result {"frames": [hex, ...]} once N frames matched the
      filter or S seconds passed.
  send --iface IF            (stdin: JSON list of frames as hex)
      sends each frame as is on IF through an AF_PACKET socket; result {"sent": n}.
  udp_listen --ports P,P,... [--addr A] [--count N] [--timeout S]
      binds kernel UDP sockets to A:P; result {"datagrams": [{"src", "sport", "dport",
      "data"}, ...]} once N datagrams arrived or S seconds passed.
  udp_send                   (stdin: JSON list of {"src", "sport", "dst", "dport", "data"})
      sends each datagram from a kernel UDP socket bound to src:sport; result {"sent": n}.
  udp_stream --dst A --dport P --rate PPS --seconds S [--size N]
      sends numbered datagrams (8-byte big-endian counter from 0, padded to N bytes) at PPS
      for S seconds, paced on the clock; result {"sent": n}.
  udp_count --port P [--addr A] [--idle S] [--timeout S]
      counts numbered datagrams; result {"received", "unique", "missing": [first ones],
      "highest"} once S seconds pass without one (after the first) or the timeout.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cmd_sniff(args: argparse.Namespace) -> int:
    from scapy.sendrecv import AsyncSniffer  # noqa: PLC0415 - slow import, only here

    # scapy 2.8's AsyncSniffer takes no timeout: join with one, then stop.
    sniffer = AsyncSniffer(iface=args.iface, filter=args.filter, count=args.count, store=True,
                           started_callback=lambda: emit({"ready": True}))
    sniffer.start()
    sniffer.join(args.timeout)
    if sniffer.running:
        results = sniffer.stop(join=True)
    else:
        results = sniffer.results
    frames = [bytes(p).hex() for p in (results or [])]
    emit({"frames": frames})
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    frames = [bytes.fromhex(h) for h in json.load(sys.stdin)]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((args.iface, 0))
    for f in frames:
        s.send(f)
        if args.gap:
            time.sleep(args.gap)
    s.close()
    emit({"sent": len(frames)})
    return 0


def cmd_udp_listen(args: argparse.Namespace) -> int:
    socks = {}
    for p in (int(x) for x in args.ports.split(",") if x):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((args.addr, p))
        s.setblocking(False)
        socks[s.fileno()] = (s, p)
    emit({"ready": True})
    got: list[dict] = []
    deadline = time.monotonic() + args.timeout
    while (args.count is None or len(got) < args.count):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select(list(socks), [], [], left)
        for fd in r:
            s, p = socks[fd]
            while True:
                try:
                    data, (src, sport) = s.recvfrom(65535)
                except BlockingIOError:
                    break
                got.append({"src": src, "sport": sport, "dport": p, "data": data.hex()})
    emit({"datagrams": got})
    return 0


def cmd_udp_send(args: argparse.Namespace) -> int:
    items = json.load(sys.stdin)
    socks: dict[tuple[str, int], socket.socket] = {}
    for it in items:
        key = (it["src"], int(it["sport"]))
        s = socks.get(key)
        if s is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(key)
            socks[key] = s
        s.sendto(bytes.fromhex(it["data"]), (it["dst"], int(it["dport"])))
        if args.gap:
            time.sleep(args.gap)
    for s in socks.values():
        s.close()
    emit({"sent": len(items)})
    return 0


def cmd_udp_stream(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = b"\x00" * max(0, args.size - 8)
    total = int(args.rate * args.seconds)
    t0 = time.monotonic()
    for n in range(total):
        wait = t0 + n / args.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        s.sendto(n.to_bytes(8, "big") + pad, (args.dst, args.dport))
    s.close()
    emit({"sent": total})
    return 0


def cmd_udp_count(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((args.addr, args.port))
    emit({"ready": True})
    seen: set[int] = set()
    received = 0
    deadline = time.monotonic() + args.timeout
    last = None
    while True:
        now = time.monotonic()
        if now > deadline or (last is not None and now - last > args.idle):
            break
        r, _, _ = select.select([s], [], [], 0.2)
        if not r:
            continue
        data = s.recv(65535)
        if len(data) >= 8:
            received += 1
            seen.add(int.from_bytes(data[:8], "big"))
            last = time.monotonic()
    highest = max(seen) if seen else -1
    missing = [n for n in range(highest + 1) if n not in seen][:50]
    emit({"received": received, "unique": len(seen), "missing": missing, "highest": highest})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sniff")
    p.add_argument("--iface", required=True)
    p.add_argument("--filter", default=None)
    p.add_argument("--count", type=int, default=0, help="0: until the timeout")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(fn=cmd_sniff)
    p = sub.add_parser("send")
    p.add_argument("--iface", required=True)
    p.add_argument("--gap", type=float, default=0.0, help="seconds between frames")
    p.set_defaults(fn=cmd_send)
    p = sub.add_parser("udp_listen")
    p.add_argument("--addr", default="0.0.0.0")
    p.add_argument("--ports", required=True)
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(fn=cmd_udp_listen)
    p = sub.add_parser("udp_send")
    p.add_argument("--gap", type=float, default=0.0)
    p.set_defaults(fn=cmd_udp_send)
    p = sub.add_parser("udp_stream")
    p.add_argument("--dst", required=True)
    p.add_argument("--dport", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(fn=cmd_udp_stream)
    p = sub.add_parser("udp_count")
    p.add_argument("--addr", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--idle", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(fn=cmd_udp_count)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
