#!/usr/bin/env python3
"""Cross-check espgw's ESP against scapy's independent ESP implementation.

Both directions, for every transform x mode/address family x (plain ESP | ESP-in-UDP) x
(ESN off | ESN on) combination:

* scapy -> espgw: scapy's ``SecurityAssociation`` encrypts inner packets; the frames are replayed
  into the data plane on the WAN port (``--port wan``); what comes out (tunnel: to the LAN,
  transport: to the host) must be the exact original (tunnel: TTL/hop limit one lower).
* espgw -> scapy: plaintext frames are replayed on the LAN port (tunnel mode) or the host port
  (transport mode); the ESP that comes out must be decrypted by scapy to the exact original, and
  its outer headers, ESP header, IV, padding and length must be what RFC 4303/4106/3948 and the
  gateway's documented behaviour say.

All combinations go through three replay runs (wan, lan, host) of one configuration with one
inbound and one outbound SA per combination. The JSON counters of every run are checked too.

Usage: crosscheck.py --bin PATH/TO/espgw-dataplane [--workdir DIR] [--keep] [--seed N]
Exit status: 0 when everything matched, 1 on any mismatch (each reported per case), 2 on usage
or set-up problems.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    from cryptography.hazmat.primitives.ciphers import algorithms, modes
    from scapy.layers import ipsec
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.ipsec import ESP, IPSecIntegrityError, SecurityAssociation
    from scapy.packet import Raw
except ImportError as e:  # pragma: no cover - set-up problem
    print(f"crosscheck: needs scapy and cryptography ({e}); pip install scapy cryptography",
          file=sys.stderr)
    sys.exit(2)

# ------------------------------------------------------------------------------------------------
# Topology (documentation addresses only).

WAN_MAC = "02:00:00:00:00:01"
LAN_MAC = "02:00:00:00:00:02"
HOST_MAC = "02:00:00:00:00:03"  # source MAC of frames the host stack hands to the data plane
GW4 = "203.0.113.1"
GW6 = "2001:db8:113::1"
LAN4 = "10.1.0.1"
LAN6 = "2001:db8:1::1"
MTU = 1500
OUTER_TTL = 64
NATT_PORT = 4500
OUT_INITIAL_SEQ_ESN = 0xFFFFFFF0  # outbound ESN SAs: first packet 0xFFFFFFF1, crosses 2^32
IN_FIRST_SEQ_ESN = 0xFFFFFFF6  # inbound ESN: scapy's first sequence number, crosses 2^32

# ------------------------------------------------------------------------------------------------
# Transforms: espgw config spelling -> scapy algorithm names and sizes.


@dataclass(frozen=True)
class Transform:
    name: str  # espgw spelling (aead name or "cipher/integrity")
    config: dict  # TOML fields (without keys)
    scapy_crypt: str
    scapy_auth: str | None
    enc_key_len: int
    integ_key_len: int
    iv_len: int
    icv_len: int
    align: int  # RFC minimum: payload + padding + 2 is a multiple of this
    aead: bool
    null_cipher: bool


def _aead(name: str, key: int, icv: int) -> Transform:
    # scapy's stock 'AES-GCM' always produces a 16-byte tag (see register_truncated_gcm).
    crypt = "AES-GCM" if icv == 16 else f"AES-GCM-ICV{icv}"
    return Transform(name, {"aead": name}, crypt, None, key + 4, 0, 8, icv, 4, True, False)


_CIPHERS = {  # espgw name -> (scapy name, key length, IV length = block size)
    "aes128-cbc": ("AES-CBC", 16, 16),
    "aes256-cbc": ("AES-CBC", 32, 16),
    "3des-cbc": ("3DES", 24, 8),
    "null": ("NULL", 0, 0),
}
_INTEGS = {  # espgw name -> (scapy name, key length, ICV length)
    "hmac-sha1-96": ("HMAC-SHA1-96", 20, 12),
    "hmac-sha2-256-128": ("SHA2-256-128", 32, 16),
    "hmac-sha2-384-192": ("SHA2-384-192", 48, 24),
    "hmac-sha2-512-256": ("SHA2-512-256", 64, 32),
    "hmac-md5-96": ("HMAC-MD5-96", 16, 12),
}


def _cbc(cipher: str, integ: str) -> Transform:
    sc, kl, iv = _CIPHERS[cipher]
    si, ikl, icv = _INTEGS[integ]
    return Transform(f"{cipher}/{integ}", {"cipher": cipher, "integrity": integ}, sc, si, kl, ikl,
                     iv, icv, max(iv, 4), False, cipher == "null")


TRANSFORMS = [
    _aead("aes128gcm16", 16, 16),
    _aead("aes256gcm16", 32, 16),
    _aead("aes128gcm12", 16, 12),
    _aead("aes128gcm8", 16, 8),
    _aead("aes256gcm8", 32, 8),
    _aead("aes256gcm12", 32, 12),
    _cbc("aes128-cbc", "hmac-sha1-96"),
    _cbc("aes256-cbc", "hmac-sha1-96"),
    _cbc("aes128-cbc", "hmac-sha2-256-128"),
    _cbc("aes256-cbc", "hmac-sha2-384-192"),
    _cbc("aes256-cbc", "hmac-sha2-512-256"),
    _cbc("3des-cbc", "hmac-md5-96"),
    _cbc("3des-cbc", "hmac-sha1-96"),
    _cbc("null", "hmac-sha1-96"),
    _cbc("null", "hmac-sha2-256-128"),
]

# (mode, inner family, outer family)
MODES = [
    ("tunnel", 4, 4),
    ("tunnel", 6, 6),
    ("tunnel", 4, 6),
    ("tunnel", 6, 4),
    ("transport", 4, 4),
    ("transport", 6, 6),
]


def register_truncated_gcm() -> None:
    """Add AES-GCM with 8- and 12-byte ICVs to scapy.

    scapy's stock 'AES-GCM' uses cryptography's AESGCM AEAD API, which always appends the full
    16-byte tag on encryption and needs it on decryption: scapy's ``crypt_icv_size`` is only
    honoured for AES-CCM. These copies are scapy ``CryptAlgo`` objects with the stock algorithm's
    parameters, but on the ``Cipher(AES, modes.GCM)`` API, for which scapy's own CryptAlgo code
    truncates the tag on encryption and verifies a truncated tag on decryption (RFC 4106 §3,
    the ICV is the leading bytes of the tag). ``self_check_gcm`` proves the copies agree with
    the stock algorithm.
    """
    stock = ipsec.CRYPT_ALGOS["AES-GCM"]
    for icv in (8, 12, 16):
        name = f"AES-GCM-ICV{icv}"
        ipsec.CRYPT_ALGOS[name] = ipsec.CryptAlgo(
            name, cipher=algorithms.AES, mode=modes.GCM, key_size=stock.key_size,
            salt_size=stock.salt_size, block_size=stock.block_size, iv_size=stock.iv_size,
            icv_size=icv, format_mode_iv=stock._format_mode_iv)


def self_check_gcm() -> None:
    """The GCM copies must reproduce scapy's stock AES-GCM (with the tag truncated)."""
    rng = random.Random(4106)
    for klen in (16, 32):
        key = rng.randbytes(klen + 4)
        inner = IP(src="10.9.9.1", dst="10.9.9.2") / UDP(sport=1, dport=2) / Raw(rng.randbytes(37))
        outer = IP(src="198.51.100.250", dst=GW4)
        iv = rng.randbytes(8)

        def enc(algo: str) -> bytes:
            sa = SecurityAssociation(ESP, spi=0x1234, crypt_algo=algo, crypt_key=key,
                                     tunnel_header=outer, esn_en=True)
            return bytes(sa.encrypt(inner, seq_num=7, iv=iv, esn=3))

        stock = enc("AES-GCM")
        if enc("AES-GCM-ICV16") != stock:
            raise SystemExit("crosscheck: scapy GCM copy (ICV 16) differs from stock AES-GCM")
        for icv in (8, 12):
            mine = enc(f"AES-GCM-ICV{icv}")
            want = stock[:len(stock) - 16 + icv]
            # The outer IPv4 total length and checksum differ with the ICV length: compare ESP.
            if mine[20:] != want[20:]:
                raise SystemExit(f"crosscheck: scapy GCM copy (ICV {icv}) is not stock AES-GCM "
                                 "with the tag truncated")
            sa = SecurityAssociation(ESP, spi=0x1234, crypt_algo=f"AES-GCM-ICV{icv}",
                                     crypt_key=key, tunnel_header=outer, esn_en=True)
            if bytes(sa.decrypt(IP(mine), esn=3)) != bytes(inner):
                raise SystemExit(f"crosscheck: scapy GCM copy (ICV {icv}) does not round-trip")
            bad = bytearray(mine)
            bad[-1] ^= 1
            try:
                sa.decrypt(IP(bytes(bad)), esn=3)
                raise SystemExit(f"crosscheck: scapy GCM copy (ICV {icv}) accepts a bad ICV")
            except IPSecIntegrityError:
                pass


# ------------------------------------------------------------------------------------------------
# Small byte helpers (independent of the data plane's code).


def csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def mac_bytes(m: str) -> bytes:
    return bytes(int(x, 16) for x in m.split(":"))


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def ip_bytes(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def eth(dst: str, src: str, v6: bool) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + (b"\x86\xdd" if v6 else b"\x08\x00")


def minus_one_hop(pkt: bytes) -> bytes:
    """The packet as a router forwards it: TTL / hop limit - 1 (IPv4 checksum recomputed)."""
    b = bytearray(pkt)
    if b[0] >> 4 == 4:
        b[8] -= 1
        ihl = (b[0] & 0xF) * 4
        b[10:12] = b"\0\0"
        b[10:12] = struct.pack("!H", csum(bytes(b[:ihl])))
    else:
        b[7] -= 1
    return bytes(b)


def first_diff(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return (f"first difference at byte {i} of the IP packet: expected "
                    f"{a[i:i + 8].hex()} got {b[i:i + 8].hex()}")
    return f"lengths differ: expected {len(a)} bytes, got {len(b)}"


def pad_len(n: int, align: int) -> int:
    return (-(n + 2)) % align


# ------------------------------------------------------------------------------------------------
# pcap files.


def write_pcap(path: Path, frames: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        t0 = 1_700_000_000
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", t0 + i // 1_000_000, i % 1_000_000, len(fr), len(fr)))
            f.write(fr)


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file")
    magic_le = struct.unpack("<I", data[:4])[0]
    if magic_le in (0xA1B2C3D4, 0xA1B23C4D):
        e = "<"
    elif struct.unpack(">I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D):
        e = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    linktype = struct.unpack(e + "I", data[20:24])[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype} is not Ethernet")
    out, off = [], 24
    while off < len(data):
        _, _, incl, orig = struct.unpack(e + "IIII", data[off:off + 16])
        if incl != orig:
            raise ValueError(f"{path}: truncated record at offset {off}")
        out.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return out


# ------------------------------------------------------------------------------------------------
# Cases.


@dataclass
class Pkt:
    j: int  # index within the case
    ip: bytes  # the original IP packet
    scapy: object  # the same as a scapy packet (for scapy's encryption)
    desc: str
    expect_drop: str | None = None  # outbound: the drop reason expected instead of output
    expect_icmp: bool = False  # outbound: answered with ICMP frag-needed / packet-too-big
    tos: int = 0  # inner DSCP/ECN byte
    df: bool = True  # inner IPv4 DF (True for IPv6)


@dataclass
class Case:
    idx: int
    t: Transform
    mode: str
    inner: int
    outer: int
    encap: bool
    esn: bool
    peer: str = ""
    peer_mac: str = ""
    gw: str = ""
    local_inner: str = ""  # tunnel: LAN-side host
    remote_inner: str = ""  # tunnel: host behind the peer
    local_mac: str = ""
    keys_out: tuple = ()
    keys_in: tuple = ()
    out_pkts: list = field(default_factory=list)  # plaintext -> espgw encrypts
    in_pkts: list = field(default_factory=list)  # scapy encrypts -> espgw decrypts
    in_seqs: list = field(default_factory=list)
    # Outbound SA's `pad_align` setting (0: not set). The gateway pads to whole cipher blocks by
    # default (16 for AES, GCM included; 8 for 3DES; 4 for NULL); half of the GCM cases set the
    # RFC 4106 minimum of 4 instead, so both paddings are cross-checked.
    pad_align: int = 0

    @property
    def align(self) -> int:
        """Alignment of payload + padding + 2 in packets the gateway sends."""
        if self.pad_align:
            return self.pad_align
        return 16 if self.t.aead else self.t.align

    @property
    def spi_out(self) -> int:
        return 0x00100000 + self.idx

    @property
    def spi_in(self) -> int:
        return 0x00200000 + self.idx

    @property
    def name(self) -> str:
        fam = (f"v{self.inner}-in-v{self.outer}" if self.mode == "tunnel" else f"v{self.inner}")
        return (f"{self.t.name} {self.mode} {fam} {'esp-in-udp' if self.encap else 'esp'} "
                f"{'esn' if self.esn else 'no-esn'}")

    @property
    def tag(self) -> str:
        return f"c{self.idx:03d}"

    def outer_len(self, ip_len: int) -> int:
        """Length of the outer IP packet that carries an inner packet of ip_len bytes."""
        fam = self.outer
        hdr = 20 if fam == 4 else 40
        payload = ip_len if self.mode == "tunnel" else ip_len - hdr
        return hdr + (8 if self.encap else 0) + self.esp_len(payload)

    def esp_len(self, payload: int, align: int | None = None) -> int:
        """ESP length for a payload, padded to `align` (default: as the gateway pads)."""
        t = self.t
        a = align or self.align
        return 8 + t.iv_len + payload + pad_len(payload, a) + 2 + t.icv_len

    def esp_payload(self, ip_len: int) -> int:
        return ip_len if self.mode == "tunnel" else ip_len - (20 if self.outer == 4 else 40)

    def max_fit(self) -> int:
        n = MTU
        while self.outer_len(n) > MTU:
            n -= 1
        return n

    def out_seq(self, k: int) -> int:
        """Sequence number of the k-th (0-based) packet the gateway sends on the outbound SA."""
        return (OUT_INITIAL_SEQ_ESN if self.esn else 0) + 1 + k


def build_cases(seed: int) -> list[Case]:
    cases = []
    n4 = 0
    for t in TRANSFORMS:
        for mode, inner, outer in MODES:
            for encap in (False, True):
                for esn in (False, True):
                    c = Case(len(cases), t, mode, inner, outer, encap, esn)
                    i = c.idx
                    if t.aead and i % 2 == 1:
                        c.pad_align = 4
                    if outer == 4:
                        n4 += 1
                        assert n4 < 255
                        c.peer, c.gw = f"198.51.100.{n4}", GW4
                    else:
                        c.peer, c.gw = f"2001:db8:5100::{i + 1:x}", GW6
                    c.peer_mac = f"02:00:00:01:{i >> 8:02x}:{i & 255:02x}"
                    if mode == "tunnel":
                        if inner == 4:
                            c.local_inner = f"10.1.{1 + i // 200}.{1 + i % 200}"
                            c.remote_inner = f"10.2.{1 + i // 200}.{1 + i % 200}"
                        else:
                            c.local_inner = f"2001:db8:1::{0x100 + i:x}"
                            c.remote_inner = f"2001:db8:2::{0x100 + i:x}"
                        c.local_mac = f"02:00:00:02:{i >> 8:02x}:{i & 255:02x}"
                    rng = random.Random(f"{seed}/{i}/keys")
                    c.keys_out = (rng.randbytes(t.enc_key_len), rng.randbytes(t.integ_key_len))
                    c.keys_in = (rng.randbytes(t.enc_key_len), rng.randbytes(t.integ_key_len))
                    cases.append(c)
    return cases


def make_packet(c: Case, j: int, kind: str, size: int, src: str, dst: str,
                rng: random.Random, ttl: int) -> Pkt:
    """An inner packet: `kind` udp (total IP length `size`), icmp or tcp."""
    v6 = ":" in src
    hdr = 40 if v6 else 20
    tos = (rng.randrange(64) << 2) | (j % 4)  # every ECN codepoint, DSCP varies
    df = j % 3 != 1
    if v6:
        ip = IPv6(src=src, dst=dst, tc=tos, fl=0x10000 + j, hlim=ttl)
    else:
        ip = IP(src=src, dst=dst, tos=tos, id=0x4000 + j, flags="DF" if df else 0, ttl=ttl)
    if kind == "udp":
        u = UDP(sport=1024 + rng.randrange(60000), dport=53 + j)
        if not v6 and j == 3:
            u.chksum = 0  # IPv4 UDP without checksum must stay so (RFC 3948 §3.1.2)
        p = ip / u / Raw(rng.randbytes(size - hdr - 8))
        desc = "udp"
    elif kind == "icmp":
        payload = rng.randbytes(56)
        if v6:
            p = ip / ICMPv6EchoRequest(id=c.idx, seq=j, data=payload)
        else:
            p = ip / ICMP(type=8, id=c.idx, seq=j) / Raw(payload)
        desc = "icmp echo"
    else:
        p = ip / TCP(sport=40000 + j, dport=443, seq=rng.randrange(1 << 32),
                     ack=rng.randrange(1 << 32), flags="PA", window=502) / Raw(rng.randbytes(100))
        desc = "tcp"
    raw = bytes(p)
    if kind == "udp" and len(raw) != size:
        raise AssertionError(f"built {len(raw)} bytes, wanted {size}")
    return Pkt(j, raw, p.__class__(raw), f"{desc}, {len(raw)} bytes", tos=tos, df=df or v6)


def build_packets(c: Case, seed: int) -> None:
    """The inner packets of a case, both directions.

    16 consecutive UDP sizes (every padding length for 4-, 8- and 16-byte alignment), an ICMP
    echo, a TCP segment, 1000 bytes, 1400 bytes (or the largest that fits the WAN MTU with this
    case's overhead) and the largest that fits; outbound also one byte more than fits, which the
    gateway must drop as mtu_exceeded.
    """
    hdr = 20 if c.inner == 4 else 40
    fit = c.max_fit()
    plan = [("udp", hdr + 8 + k) for k in range(16)]
    plan += [("icmp", 0), ("tcp", 0), ("udp", 1000), ("udp", min(1400, fit))]
    if fit > 1400:
        plan.append(("udp", fit))
    for direction in ("out", "in"):
        rng = random.Random(f"{seed}/{c.idx}/{direction}")
        if c.mode == "tunnel":
            src, dst = ((c.local_inner, c.remote_inner) if direction == "out"
                        else (c.remote_inner, c.local_inner))
        else:
            src, dst = (c.gw, c.peer) if direction == "out" else (c.peer, c.gw)
        # Tunnel traffic is forwarded (TTL >= 2); host traffic may have any TTL, even 1.
        ttls = [64, 2, 255, 128] if c.mode == "tunnel" else [64, 1, 255, 128]
        pk = [make_packet(c, j, kind, size, src, dst, rng, ttls[j % 4])
              for j, (kind, size) in enumerate(plan)]
        if direction == "out":
            p = make_packet(c, len(plan), "udp", fit + 1, src, dst, rng, 64)
            p.expect_drop = "mtu_exceeded"
            # From the LAN (tunnel mode) a DF or IPv6 packet is answered with the MTU that fits
            # (and then not counted as a drop).
            p.expect_icmp = c.mode == "tunnel" and (c.inner == 6 or p.df)
            pk.append(p)
            c.out_pkts = pk
        else:
            c.in_pkts = pk


# ------------------------------------------------------------------------------------------------
# scapy SAs.


def scapy_sa(c: Case, keys: tuple) -> SecurityAssociation:
    t = c.t
    enc, integ = keys
    sa = SecurityAssociation(
        ESP, spi=0,  # set by the caller
        crypt_algo=t.scapy_crypt, crypt_key=enc if enc else None,
        auth_algo=t.scapy_auth, auth_key=integ if integ else None,
        tunnel_header=(IP() if c.outer == 4 else IPv6()) if c.mode == "tunnel" else None,
        nat_t_header=UDP(sport=NATT_PORT, dport=NATT_PORT) if c.encap else None,
        esn_en=c.esn, esn=0)
    return sa


def scapy_encrypt_inbound(c: Case, seed: int) -> list[bytes]:
    """scapy as the peer: ESP frames towards the gateway, one per inbound packet."""
    sa = scapy_sa(c, c.keys_in)
    sa.spi = c.spi_in
    rng = random.Random(f"{seed}/{c.idx}/iv")
    frames = []
    first = IN_FIRST_SEQ_ESN if c.esn else 1
    c.in_seqs = []
    for k, p in enumerate(c.in_pkts):
        seq = first + k
        c.in_seqs.append(seq)
        if c.mode == "tunnel":
            # An RFC 6040 normal-mode encapsulator: DSCP and ECN copied outward, so the
            # decapsulated ECN equals the inner one.
            if c.outer == 4:
                sa.tunnel_header = IP(src=c.peer, dst=c.gw, tos=p.tos, ttl=64,
                                      flags="DF" if p.df else 0)
            else:
                sa.tunnel_header = IPv6(src=c.peer, dst=c.gw, tc=p.tos, hlim=64)
        # scapy treats seq_num=0 and esn=0 as "not given": set the SA's own state instead.
        sa.seq_num = seq & 0xFFFFFFFF
        sa.esn = seq >> 32
        iv = seq.to_bytes(8, "big") if c.t.aead else rng.randbytes(c.t.iv_len)
        e = sa.encrypt(p.scapy, iv=iv)
        if c.encap and c.outer == 6 and k % 2:
            # scapy always sends a zero UDP checksum; over IPv6 that is only allowed under
            # RFC 6936's conditions (RFC 8200 §8.1). Send half of the packets with a valid one,
            # computed by scapy.
            del e[UDP].chksum
        raw = bytes(e)
        frames.append(eth(WAN_MAC, c.peer_mac, c.outer == 6) + raw)
    return frames


# ------------------------------------------------------------------------------------------------
# Configuration.


def toml_config(cases: list[Case]) -> str:
    L = [
        "# Generated by tests/scapy/crosscheck.py: one inbound and one outbound SA per case.",
        "[dataplane]",
        "replay_window = 1024",
        # Oversize non-DF packets are dropped (mtu_exceeded), not fragmented before encryption:
        # that path is checked in tests/e2e and the pipeline's own tests.
        'fragmentation = "off"',
        "[dataplane.wan]",
        f'mac = "{WAN_MAC}"',
        f'addresses = ["{GW4}/24", "{GW6}/64"]',
        "[dataplane.lan]",
        f'mac = "{LAN_MAC}"',
        f'addresses = ["{LAN4}/16", "{LAN6}/64"]',
        "",
    ]

    def keylines(t: Transform, keys: tuple) -> list[str]:
        out = [f'{k} = "{v}"' for k, v in t.config.items()]
        if keys[0]:
            out.append(f'key = "0x{keys[0].hex()}"')
        if keys[1]:
            out.append(f'integrity_key = "0x{keys[1].hex()}"')
        return out

    for c in cases:
        common = [f'mode = "{c.mode}"', f'local = "{c.gw}"', f'remote = "{c.peer}"']
        if c.encap:
            common.append(f"encap = {{ sport = {NATT_PORT}, dport = {NATT_PORT} }}")
        common.append(f"esn = {'true' if c.esn else 'false'}")
        if c.mode == "tunnel":
            sel_in = f'{{ src = "{c.remote_inner}", dst = "{c.local_inner}" }}'
            pol = (c.local_inner, c.remote_inner)
        else:
            sel_in = f'{{ src = "{c.peer}", dst = "{c.gw}" }}'
            pol = (c.gw, c.peer)
        L += ["[[sa]]", f'name = "{c.tag}-out"', 'direction = "out"', f"spi = {c.spi_out:#x}",
              f"# {c.name}"] + common + keylines(c.t, c.keys_out)
        if c.esn:
            L.append(f"initial_seq = {OUT_INITIAL_SEQ_ESN:#x}")
        if c.pad_align:
            L.append(f"pad_align = {c.pad_align}")
        L += ["", "[[sa]]", f'name = "{c.tag}-in"', 'direction = "in"', f"spi = {c.spi_in:#x}"]
        L += common + keylines(c.t, c.keys_in) + [f"selectors = [{sel_in}]", ""]
        L += ["[[policy]]", f'src = "{pol[0]}"', f'dst = "{pol[1]}"', 'protocol = "any"',
              'action = "protect"', f'sa = "{c.tag}-out"', ""]
        L += ["[[neighbor]]", f'ip = "{c.peer}"', f'mac = "{c.peer_mac}"', ""]
        if c.mode == "tunnel":
            L += ["[[neighbor]]", f'ip = "{c.local_inner}"', f'mac = "{c.local_mac}"', ""]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------
# Running the data plane.


# Burst sizes per run: the CLI default, and ones that make the pipeline split a burst into
# several internal chunks (64 frames) with a partial last chunk.
BURST = {"lan": 256, "host": 32, "wan": 100}


def run_replay(binary: str, cfg: Path, inp: Path, port: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([binary, "replay", "--config", str(cfg), "--input", str(inp),
                             "--port", port, "--output", str(out), "--burst", str(BURST[port])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_replay(p: subprocess.Popen, what: str) -> dict:
    out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"crosscheck: replay {what} failed (exit {p.returncode}):\n{err}")
    try:
        return json.loads(out)
    except json.JSONDecodeError as e:
        raise SystemExit(f"crosscheck: replay {what} printed no JSON ({e}):\n{out[:2000]}")


# ------------------------------------------------------------------------------------------------
# Checks.


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.cases: set[tuple[str, int]] = set()

    def add(self, direction: str, c: Case | None, msg: str) -> None:
        where = f"[{direction}] case {c.tag} ({c.name})" if c else f"[{direction}]"
        self.items.append(f"{where}: {msg}")
        if c:
            self.cases.add((direction, c.idx))


def parse_outer(frame: bytes) -> dict:
    """Outer Ethernet / IP / (UDP) / ESP header fields of a frame the gateway sent to the WAN."""
    r = {"eth_dst": frame[0:6], "eth_src": frame[6:12],
         "ethertype": struct.unpack("!H", frame[12:14])[0]}
    ip = frame[14:]
    r["ip"] = ip
    v = ip[0] >> 4
    r["v"] = v
    if v == 4:
        ihl = (ip[0] & 0xF) * 4
        r.update(ihl=ihl, tos=ip[1], total=struct.unpack("!H", ip[2:4])[0],
                 flags_frag=struct.unpack("!H", ip[6:8])[0], ttl=ip[8], proto=ip[9],
                 hdr_ok=csum(ip[:ihl]) == 0, src=ip[12:16], dst=ip[16:20])
        l4 = ihl
    else:
        r.update(tos=((ip[0] & 0xF) << 4) | (ip[1] >> 4),
                 total=40 + struct.unpack("!H", ip[4:6])[0], ttl=ip[7], proto=ip[6],
                 src=ip[8:24], dst=ip[24:40])
        l4 = 40
    r["l4"] = l4
    if r["proto"] == 17:
        sport, dport, ulen, uck = struct.unpack("!HHHH", ip[l4:l4 + 8])
        r.update(udp=(sport, dport, ulen, uck))
        esp_at = l4 + 8
    else:
        r["udp"] = None
        esp_at = l4
    r["esp_at"] = esp_at
    r["spi"], r["seq"] = struct.unpack("!II", ip[esp_at:esp_at + 8])
    return r


def udp_checksum_ok(r: dict) -> bool:
    ip, l4 = r["ip"], r["l4"]
    seg = ip[l4:r["total"]]
    if r["v"] == 4:
        pseudo = r["src"] + r["dst"] + struct.pack("!BBH", 0, 17, len(seg))
    else:
        pseudo = r["src"] + r["dst"] + struct.pack("!IxxxB", len(seg), 17)
    return csum(pseudo + seg) == 0


def check_outbound(direction: str, cases: list[Case], order: list[tuple[Case, Pkt]],
                   frames: list[bytes], report: dict, port: str, fails: Failures) -> int:
    """espgw encrypted; scapy decrypts. Returns the number of packets verified."""
    by_key: dict[tuple[int, int], tuple[Case, Pkt, int, int]] = {}
    expect_out = []
    k_of: dict[int, int] = {}
    for pos, (c, p) in enumerate(order):
        if p.expect_drop:
            continue
        k = k_of.get(c.idx, 0)
        k_of[c.idx] = k + 1
        seq = c.out_seq(k)
        by_key[(c.spi_out, seq & 0xFFFFFFFF)] = (c, p, seq, pos)
        expect_out.append(pos)
    sas = {}
    for c in cases:
        s = scapy_sa(c, c.keys_out)
        s.spi = c.spi_out
        sas[c.idx] = s
    seen: set[int] = set()
    last_pos = -1
    ivs: dict[bytes, str] = {}
    bad: set[int] = set()
    # ICMP answers to oversize packets go back to the LAN, in order among the ESP output.
    want_icmp = [(c, p) for c, p in order if p.expect_icmp]
    icmp_frames = [fr for fr in frames if fr[6:12] == mac_bytes(LAN_MAC)]
    check_icmp_answers(direction, want_icmp, icmp_frames, fails)
    frames = [fr for fr in frames if fr[6:12] != mac_bytes(LAN_MAC)]
    for n, fr in enumerate(frames):
        try:
            r = parse_outer(fr)
        except (struct.error, IndexError) as e:
            fails.add(direction, None, f"output frame {n} cannot be parsed ({e}): {fr[:64].hex()}")
            continue
        hit = by_key.get((r["spi"], r["seq"]))
        if hit is None:
            fails.add(direction, None, f"output frame {n} is unexpected: SPI {r['spi']:#x} "
                      f"sequence number {r['seq']:#x}")
            continue
        c, p, seq, pos = hit
        tagp = f"packet {p.j} ({p.desc}, 64-bit seq {seq:#x})"
        if pos in seen:
            fails.add(direction, c, f"{tagp}: came out twice")
            continue
        seen.add(pos)
        if pos < last_pos:
            fails.add(direction, c, f"{tagp}: out of order (output frame {n})")
            bad.add(pos)
        last_pos = max(last_pos, pos)
        errs = check_one_outbound(c, p, seq, r, fr, sas[c.idx], ivs)
        for e in errs:
            fails.add(direction, c, f"{tagp}: {e}")
        if errs:
            bad.add(pos)
    for pos in expect_out:
        if pos not in seen:
            c, p = order[pos]
            sa_json = next((s for s in report.get("sas", []) if s["name"] == f"{c.tag}-out"), {})
            fails.add(direction, c, f"packet {p.j} ({p.desc}) did not come out; SA drops "
                      f"{sa_json.get('drops')}, run drops {report['counters']['drops']}")
    check_counters_out(direction, cases, order, frames, icmp_frames, report, port, fails)
    return len(seen - bad)


def check_icmp_answers(direction: str, want: list[tuple[Case, "Pkt"]], frames: list[bytes],
                       fails: Failures) -> None:
    """Each oversize DF/IPv6 packet from the LAN got ICMP "fragmentation needed" (type 3 code 4)
    or ICMPv6 "packet too big" (type 2) from the gateway's LAN address, with the largest inner
    size that fits the case's SA and the original quoted."""
    if len(frames) != len(want):
        fails.add(direction, None, f"{len(frames)} ICMP answers on the LAN, expected {len(want)}")
    for fr, (c, p) in zip(frames, want):
        ip = fr[14:]
        if ip[0] >> 4 == 4:
            ihl = (ip[0] & 0xF) * 4
            kind, code, mtu = ip[ihl], ip[ihl + 1], struct.unpack("!H", ip[ihl + 6:ihl + 8])[0]
            ok = (ip[9] == 1 and csum(ip[:ihl]) == 0 and csum(ip[ihl:]) == 0
                  and ip[12:16] == ip_bytes(LAN4) and (kind, code) == (3, 4)
                  and ip[ihl + 8:ihl + 28] == p.ip[:20])
        else:
            kind, code, mtu = ip[40], ip[41], struct.unpack("!I", ip[44:48])[0]
            ok = (ip[6] == 58 and ip[8:24] == ip_bytes(LAN6) and (kind, code) == (2, 0)
                  and ip[48:88] == p.ip[:40])
        # Back to the MAC the packet came from (per case here), from the gateway's LAN MAC.
        if not ok or mtu != c.max_fit() or fr[0:6] in (mac_bytes(LAN_MAC), mac_bytes(WAN_MAC)):
            fails.add(direction, c, f"packet {p.j} ({p.desc}): ICMP answer wrong: type {kind} "
                      f"code {code} MTU {mtu} (expected {c.max_fit()}): {fr[:80].hex()}")


def check_one_outbound(c: Case, p: Pkt, seq: int, r: dict, fr: bytes,
                       sa: SecurityAssociation, ivs: dict) -> list[str]:
    errs = []
    t = c.t
    v6 = c.outer == 6
    if r["eth_dst"] != mac_bytes(c.peer_mac):
        errs.append(f"Ethernet destination {mac_str(r['eth_dst'])}, expected the peer's "
                    f"{c.peer_mac}")
    if r["eth_src"] != mac_bytes(WAN_MAC):
        errs.append(f"Ethernet source {mac_str(r['eth_src'])}, expected WAN {WAN_MAC}")
    if r["ethertype"] != (0x86DD if v6 else 0x0800) or r["v"] != c.outer:
        errs.append(f"outer ethertype {r['ethertype']:#06x} / IP version {r['v']}, "
                    f"expected IPv{c.outer}")
        return errs
    if len(fr) != 14 + r["total"]:
        errs.append(f"frame is {len(fr)} bytes, outer IP length says {14 + r['total']}")
    if r["src"] != ip_bytes(c.gw) or r["dst"] != ip_bytes(c.peer):
        errs.append("outer addresses are not gateway -> peer")
    want_proto = 17 if c.encap else 50
    if r["proto"] != want_proto:
        errs.append(f"outer next protocol {r['proto']}, expected {want_proto}")
        return errs
    if not v6 and not r["hdr_ok"]:
        errs.append("outer IPv4 header checksum is wrong")
    payload = c.esp_payload(len(p.ip))
    want_total = c.outer_len(len(p.ip))
    if r["total"] != want_total:
        errs.append(f"outer IP length {r['total']}, expected {want_total} (ESP padded to "
                    f"{c.align}: payload {payload}, pad {pad_len(payload, c.align)})")
    if c.mode == "tunnel":
        if r["tos"] != p.tos:
            errs.append(f"outer DSCP/ECN {r['tos']:#04x}, expected {p.tos:#04x} (DSCP copied, "
                        "ECN copied per RFC 6040 normal mode)")
        if r["ttl"] != OUTER_TTL:
            errs.append(f"outer TTL/hop limit {r['ttl']}, expected {OUTER_TTL}")
        if not v6:
            df = bool(r["flags_frag"] & 0x4000)
            if df != p.df:
                errs.append(f"outer DF {df}, expected {p.df} (copied from an IPv4 inner packet, "
                            "set for IPv6)")
            if r["flags_frag"] & 0x3FFF:
                errs.append("outer header has MF or a fragment offset")
    if c.encap:
        sport, dport, ulen, uck = r["udp"]
        if (sport, dport) != (NATT_PORT, NATT_PORT):
            errs.append(f"UDP ports {sport}->{dport}, expected {NATT_PORT}->{NATT_PORT}")
        if ulen != r["total"] - r["l4"]:
            errs.append(f"UDP length {ulen}, expected {r['total'] - r['l4']}")
        if v6:
            if uck == 0 or not udp_checksum_ok(r):
                errs.append(f"IPv6 UDP checksum {uck:#06x} is not valid (RFC 8200 §8.1)")
        elif uck != 0:
            errs.append(f"IPv4 UDP checksum {uck:#06x}, expected 0 (RFC 3948 §2.1)")
    ip = r["ip"][:r["total"]]
    esp_at = r["esp_at"]
    iv = ip[esp_at + 8:esp_at + 8 + t.iv_len]
    if t.aead:
        if iv != seq.to_bytes(8, "big"):
            errs.append(f"GCM IV {iv.hex()}, expected the 64-bit sequence number {seq:016x}")
    elif t.iv_len:
        prev = ivs.get(iv)
        if prev is not None or iv == bytes(len(iv)):
            errs.append(f"CBC IV {iv.hex()} repeats ({prev}) or is zero; it must be random")
        ivs[iv] = f"{c.tag} seq {seq:#x}"
    if errs:
        return errs
    # Let scapy verify the ICV and decrypt, with the high sequence bits we expect.
    hi = seq >> 32
    cls = IPv6 if v6 else IP
    try:
        plain = sa.decrypt(cls(ip), esn=hi)
    except IPSecIntegrityError as e:
        return [f"scapy: ICV does not verify (high sequence bits {hi}): {e}"]
    except Exception as e:  # noqa: BLE001 - any scapy failure is a finding
        return [f"scapy could not decrypt: {type(e).__name__}: {e}"]
    got = bytes(plain)
    want = minus_one_hop(p.ip) if c.mode == "tunnel" else p.ip
    if got != want:
        errs.append("scapy decrypted something else than the original"
                    + (" (TTL/hop limit - 1)" if c.mode == "tunnel" else "") + ": "
                    + first_diff(want, got))
    # The trailer: RFC 4303 §2.4 default padding 1, 2, 3, ..., minimal for the SA's alignment.
    esp = ESP(ip[esp_at:])
    icv = sa.crypt_icv_size or sa.crypt_algo.icv_size or sa.auth_algo.icv_size
    try:
        pl = sa.crypt_algo.decrypt(sa, esp, sa.crypt_key, icv, esn_en=c.esn, esn=hi)
    except Exception as e:  # noqa: BLE001
        return errs + [f"scapy could not decrypt the trailer: {e}"]
    want_pad = pad_len(payload, c.align)
    if pl.padlen != want_pad or pl.padding != bytes(range(1, want_pad + 1)):
        errs.append(f"padding {pl.padding.hex()} (length {pl.padlen}), expected "
                    f"{bytes(range(1, want_pad + 1)).hex()} (length {want_pad})")
    want_nh = ((4 if c.inner == 4 else 41) if c.mode == "tunnel"
               else (p.ip[9] if c.inner == 4 else p.ip[6]))
    if pl.nh != want_nh:
        errs.append(f"ESP next header {pl.nh}, expected {want_nh}")
    return errs


def check_inbound(cases: list[Case], order: list[tuple[Case, Pkt]], in_frames: list[bytes],
                  frames: list[bytes], report: dict, fails: Failures) -> int:
    """scapy encrypted; espgw decrypted. Returns the number of packets verified."""
    direction = "scapy->espgw"
    # Every output must be exactly one expected packet, in input order.
    want_frames = []
    for pos, (c, p) in enumerate(order):
        if c.mode == "tunnel":
            want_frames.append(eth(c.local_mac, LAN_MAC, c.inner == 6) + minus_one_hop(p.ip))
        else:
            want_frames.append(in_frames[pos][:14] + p.ip)
    index = {f: pos for pos, f in enumerate(want_frames)}
    assert len(index) == len(want_frames), "expected frames must be distinct"
    seen: set[int] = set()
    bad: set[int] = set()
    last = -1
    for n, fr in enumerate(frames):
        pos = index.get(fr)
        if pos is None:
            fails.add(direction, None, diagnose_inbound(fr, order, want_frames))
            continue
        c, p = order[pos]
        if pos in seen:
            fails.add(direction, c, f"packet {p.j} ({p.desc}) came out twice")
            bad.add(pos)
        if pos < last:
            fails.add(direction, c, f"packet {p.j} ({p.desc}) out of order")
            bad.add(pos)
        seen.add(pos)
        last = max(last, pos)
    for pos, (c, p) in enumerate(order):
        if pos not in seen:
            sa_json = next((s for s in report.get("sas", []) if s["name"] == f"{c.tag}-in"), {})
            fails.add(direction, c, f"packet {p.j} ({p.desc}, seq {c.in_seqs[p.j]:#x}) did not "
                      f"come out intact; SA drops {sa_json.get('drops')}, run drops "
                      f"{report['counters']['drops']}")
    check_counters_in(cases, order, frames, report, fails)
    return len(seen - bad)


def diagnose_inbound(fr: bytes, order: list[tuple[Case, Pkt]], want_frames: list[bytes]) -> str:
    """Find the expected frame an unexpected output is closest to (same addresses and IP id /
    flow label) and describe the difference."""
    best = None
    for pos, w in enumerate(want_frames):
        if len(w) > 14 and len(fr) > 14 and w[12:14] == fr[12:14]:
            a, b = w[14:], fr[14:]
            if a[0] >> 4 == 4:
                same = a[12:20] == b[12:20] and a[4:6] == b[4:6]
            else:
                same = a[8:40] == b[8:40] and a[1:4] == b[1:4]
            if same:
                best = pos
                break
    if best is None:
        return f"unexpected output frame: {fr[:80].hex()}"
    c, p = order[best]
    w = want_frames[best]
    where = ("Ethernet header" if w[:14] != fr[:14] else first_diff(w[14:], fr[14:]))
    return (f"case {c.tag} ({c.name}) packet {p.j} ({p.desc}) came out different: {where}; "
            f"expected {w[:14].hex()} + IP, got {fr[:14].hex()} + IP")


def sa_by_name(report: dict) -> dict:
    return {s["name"]: s for s in report.get("sas", [])}


def check_sa_common(direction: str, c: Case, s: dict, dirn: str, fails: Failures) -> None:
    want = {"direction": dirn, "mode": c.mode, "transform": c.t.name, "esn": c.esn,
            "spi": f"{c.spi_out if dirn == 'out' else c.spi_in:#010x}", "local": None,
            "state": "active"}
    for k, v in want.items():
        if v is not None and s.get(k) != v:
            fails.add(direction, c, f"SA {s['name']} JSON {k} = {s.get(k)!r}, expected {v!r}")
    encap = {"sport": NATT_PORT, "dport": NATT_PORT} if c.encap else None
    if s.get("encap") != encap:
        fails.add(direction, c, f"SA {s['name']} JSON encap = {s.get('encap')!r}, "
                  f"expected {encap!r}")


def check_run_totals(direction: str, report: dict, n_in: int, n_out: int, drops: dict,
                     rx_port: str, tx: dict, frames: list[bytes], fails: Failures) -> None:
    if report.get("frames_in") != n_in:
        fails.add(direction, None, f"frames_in {report.get('frames_in')}, expected {n_in}")
    if report.get("frames_out") != n_out or len(frames) != n_out:
        fails.add(direction, None, f"frames_out {report.get('frames_out')} ({len(frames)} in "
                  f"the output file), expected {n_out}")
    ctr = report["counters"]
    got_drops = ctr["drops"]
    if got_drops.get("errors") != drops or got_drops.get("absorbed") != {}:
        fails.add(direction, None, f"drop counters {got_drops}, expected errors {drops} and "
                  "nothing absorbed")
    if ctr[rx_port]["rx_frames"] != n_in:
        fails.add(direction, None, f"{rx_port}.rx_frames {ctr[rx_port]['rx_frames']}, "
                  f"expected {n_in}")
    for port, (nf, nb) in tx.items():
        if ctr[port]["tx_frames"] != nf or ctr[port]["tx_bytes"] != nb:
            fails.add(direction, None, f"{port}.tx frames/bytes {ctr[port]['tx_frames']}/"
                      f"{ctr[port]['tx_bytes']}, expected {nf}/{nb}")


def check_counters_out(direction: str, cases: list[Case], order: list[tuple[Case, Pkt]],
                       frames: list[bytes], icmp_frames: list[bytes], report: dict, port: str,
                       fails: Failures) -> None:
    n_drop = sum(1 for _, p in order if p.expect_drop and not p.expect_icmp)
    n_icmp = sum(1 for _, p in order if p.expect_icmp)
    n_ok = len(order) - n_drop - n_icmp
    check_run_totals(direction, report, len(order), n_ok + n_icmp,
                     {"mtu_exceeded": n_drop} if n_drop else {},
                     "lan" if port == "lan" else "from_host",
                     {"wan": (n_ok, sum(len(f) for f in frames)),
                      "lan": (n_icmp, sum(len(f) for f in icmp_frames)),
                      "to_host": (0, 0)}, frames + icmp_frames, fails)
    if report["counters"].get("icmp_sent") != n_icmp:
        fails.add(direction, None, f"icmp_sent {report['counters'].get('icmp_sent')}, "
                  f"expected {n_icmp}")
    sas = sa_by_name(report)
    used = {c.idx for c, _ in order}
    for c in cases:
        for dirn in ("out", "in"):
            s = sas.get(f"{c.tag}-{dirn}")
            if s is None:
                fails.add(direction, c, f"SA {c.tag}-{dirn} missing from the JSON report")
                continue
            check_sa_common(direction, c, s, dirn, fails)
            ctr = s["counters"]
            want_drops: dict = {}
            if dirn == "out" and c.idx in used:
                ok = [p for p in c.out_pkts if not p.expect_drop]
                for p in c.out_pkts:
                    if p.expect_drop and not p.expect_icmp:  # answered: not a drop
                        want_drops[p.expect_drop] = want_drops.get(p.expect_drop, 0) + 1
                n = len(ok)
                # bytes_esp counts the ESP packet (SPI through ICV), without outer IP/UDP.
                # A drop is counted on the SA the packet was attributed to (counters.rs).
                want = {"pkts_encaps": n, "pkts_encrypt": 0 if c.t.null_cipher else n,
                        "pkts_digest": n, "bytes_encaps": sum(len(p.ip) for p in ok),
                        "bytes_esp": sum(c.esp_len(c.esp_payload(len(p.ip))) for p in ok),
                        "send_errors": sum(want_drops.values())}
                last = c.out_seq(n - 1)
                if s.get("last_seq") != last:
                    fails.add(direction, c, f"SA {s['name']} last_seq {s.get('last_seq')}, "
                              f"expected {last:#x}")
            else:
                want = {k: 0 for k in ctr}
            if ctr != want:
                fails.add(direction, c, f"SA {s['name']} counters {ctr}, expected {want}")
            if s["drops"] != {"errors": want_drops, "absorbed": {}}:
                fails.add(direction, c, f"SA {s['name']} drops {s['drops']}, expected "
                          f"{want_drops or 'none'}")


def check_counters_in(cases: list[Case], order: list[tuple[Case, Pkt]], frames: list[bytes],
                      report: dict, fails: Failures) -> None:
    direction = "scapy->espgw"
    n = len(order)
    tun = [(c, p) for c, p in order if c.mode == "tunnel"]
    tra = [(c, p) for c, p in order if c.mode == "transport"]
    check_run_totals(direction, report, n, n, {}, "wan",
                     {"lan": (len(tun), sum(14 + len(p.ip) for _, p in tun)),
                      "to_host": (len(tra), sum(14 + len(p.ip) for _, p in tra)),
                      "wan": (0, 0)}, frames, fails)
    sas = sa_by_name(report)
    for c in cases:
        for dirn in ("out", "in"):
            s = sas.get(f"{c.tag}-{dirn}")
            if s is None:
                fails.add(direction, c, f"SA {c.tag}-{dirn} missing from the JSON report")
                continue
            check_sa_common(direction, c, s, dirn, fails)
            ctr = s["counters"]
            if dirn == "in":
                k = len(c.in_pkts)
                want = {"pkts_decaps": k, "pkts_decrypt": 0 if c.t.null_cipher else k,
                        "pkts_verify": k, "bytes_decaps": sum(len(p.ip) for p in c.in_pkts),
                        # scapy pads to the RFC minimum.
                        "bytes_esp": sum(c.esp_len(c.esp_payload(len(p.ip)), c.t.align)
                                         for p in c.in_pkts),
                        "recv_errors": 0}
                if s.get("highest_seq") != c.in_seqs[-1]:
                    fails.add(direction, c, f"SA {s['name']} highest_seq {s.get('highest_seq')}, "
                              f"expected {c.in_seqs[-1]:#x}")
            else:
                want = {k: 0 for k in ctr}
                if s.get("last_seq") != (OUT_INITIAL_SEQ_ESN if c.esn else 0):
                    fails.add(direction, c, f"SA {s['name']} last_seq {s.get('last_seq')} moved")
            if ctr != want:
                fails.add(direction, c, f"SA {s['name']} counters {ctr}, expected {want}")
            if s["drops"] != {"errors": {}, "absorbed": {}}:
                fails.add(direction, c, f"SA {s['name']} drops {s['drops']}, expected none")


# ------------------------------------------------------------------------------------------------


def interleave(items: list[tuple[Case, list[Pkt]]]) -> list[tuple[Case, Pkt]]:
    """All cases' packets in runs of four per SA, round-robin over the cases (so bursts mix SAs
    and the per-SA crypto batches still see several packets)."""
    flat = [(p.j // 4, c.idx, p.j, c, p) for c, pk in items for p in pk]
    flat.sort(key=lambda x: x[:3])
    return [(c, p) for *_, c, p in flat]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="path to espgw-dataplane")
    ap.add_argument("--workdir", help="directory for config and captures (default: a fresh "
                    "temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=4303, help="seed for keys and payloads")
    ap.add_argument("--max-report", type=int, default=40, help="mismatches printed in full")
    args = ap.parse_args()

    binary = shutil.which(args.bin) or args.bin
    if not Path(binary).is_file():
        print(f"crosscheck: {args.bin}: no such binary", file=sys.stderr)
        return 2
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="espgw-scapy-"))
    t_start = time.monotonic()
    try:
        rc = run(binary, work, args)
    finally:
        if args.keep or args.workdir:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total time {time.monotonic() - t_start:.1f} s")
    return rc


def run(binary: str, work: Path, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    register_truncated_gcm()
    self_check_gcm()
    cases = build_cases(args.seed)
    for c in cases:
        build_packets(c, args.seed)
    cfg = work / "crosscheck.toml"
    cfg.write_text(toml_config(cases))

    # espgw -> scapy: plaintext in, on the LAN (tunnel) and host (transport) ports.
    out_runs = {}
    for port, mode in (("lan", "tunnel"), ("host", "transport")):
        order = interleave([(c, c.out_pkts) for c in cases if c.mode == mode])
        frames = []
        for c, p in order:
            src = HOST_MAC if port == "host" else c.local_mac
            dst = WAN_MAC if port == "host" else LAN_MAC
            fr = eth(dst, src, c.inner == 6) + p.ip
            frames.append(fr + bytes(max(0, 60 - len(fr))))  # Ethernet minimum frame
        write_pcap(work / f"{port}-in.pcap", frames)
        proc = run_replay(binary, cfg, work / f"{port}-in.pcap", port, work / f"{port}-out.pcap")
        out_runs[port] = (order, proc)

    # scapy -> espgw: scapy encrypts (while the data plane runs the other two).
    t1 = time.monotonic()
    enc: dict[int, list[bytes]] = {c.idx: scapy_encrypt_inbound(c, args.seed) for c in cases}
    order_in = interleave([(c, c.in_pkts) for c in cases])
    in_frames = [enc[c.idx][p.j] for c, p in order_in]
    write_pcap(work / "wan-in.pcap", in_frames)
    t_enc = time.monotonic() - t1
    wan_proc = run_replay(binary, cfg, work / "wan-in.pcap", "wan", work / "wan-out.pcap")

    fails = Failures()
    summary = []
    t2 = time.monotonic()
    for port in ("lan", "host"):
        order, proc = out_runs[port]
        report = finish_replay(proc, f"--port {port}")
        (work / f"{port}-report.json").write_text(json.dumps(report, indent=1))
        frames = read_pcap(work / f"{port}-out.pcap")
        v = check_outbound("espgw->scapy", cases, order, frames, report, port, fails)
        nc = len({c.idx for c, _ in order})
        nd = sum(1 for _, p in order if p.expect_drop)
        ni = sum(1 for _, p in order if p.expect_icmp)
        summary.append(f"espgw->scapy ({port} port, {'tunnel' if port == 'lan' else 'transport'}"
                       f"): {nc} cases, {v} of {len(order) - nd} ESP packets decrypted by scapy "
                       f"to the original, {nd} oversize packets dropped as mtu_exceeded "
                       f"({ni} of them answered with ICMP and the MTU that fits)")
    report = finish_replay(wan_proc, "--port wan")
    (work / "wan-report.json").write_text(json.dumps(report, indent=1))
    frames = read_pcap(work / "wan-out.pcap")
    v = check_inbound(cases, order_in, in_frames, frames, report, fails)
    summary.append(f"scapy->espgw (wan port, tunnel + transport): {len(cases)} cases, {v} of "
                   f"{len(order_in)} scapy ESP packets decrypted by espgw to the original")
    t_check = time.monotonic() - t2

    print(f"scapy {getattr(sys.modules.get('scapy'), 'VERSION', '?')} vs "
          f"{Path(binary).name}: {len(TRANSFORMS)} transforms x {len(MODES)} modes x "
          f"2 encapsulations x 2 ESN settings = {len(cases)} combinations per direction")
    print(f"  (build {t1 - t0:.1f} s, scapy encryption {t_enc:.1f} s, replay + checks "
          f"{t_check:.1f} s)")
    fits = [c.max_fit() for c in cases]
    sizes = [len(p.ip) for c in cases for p in c.in_pkts]
    print(f"  inner packets {min(sizes)}..{max(sizes)} bytes, 16 consecutive sizes per case "
          f"(every padding length); 1400-byte packets in {sum(f >= 1400 for f in fits)} cases, "
          f"the largest that fits the {MTU}-byte WAN MTU in all (smallest: {min(fits)} bytes)")
    print(f"  ESN cases cross 2^32: outbound from {OUT_INITIAL_SEQ_ESN + 1:#x}, inbound from "
          f"{IN_FIRST_SEQ_ESN:#x}")
    for s in summary:
        print("  " + s)
    if fails.items:
        for d in ("espgw->scapy", "scapy->espgw"):
            bad = sorted(i for dd, i in fails.cases if dd == d)
            if bad:
                print(f"FAILED {d}: {len(bad)} combinations: "
                      + ", ".join(cases[i].name for i in bad[:10])
                      + (" ..." if len(bad) > 10 else ""))
        for msg in fails.items[:args.max_report]:
            print("  " + msg)
        if len(fails.items) > args.max_report:
            print(f"  ... and {len(fails.items) - args.max_report} more mismatches")
        return 1
    print("OK: every combination matched in both directions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
