//! Shared harness for the `inbound` and `outbound` fuzz targets.
//!
//! Each target keeps one [`Harness`] (a [`Pipeline`] over a small configuration) for the whole
//! run and feeds it the fuzz input as one burst of frames. After every burst it checks what
//! the pipeline promises: every frame got exactly one verdict, every frame (dropped or not)
//! still lies inside its buffer, the worker counters add up to the verdicts, every drop charged
//! to an SA was counted by the worker too, and what goes out is a well-formed IP packet.
//!
//! # Input format
//!
//! ```text
//! byte 0      flags: bits 0-1 headroom (256, 128, 40, 0 bytes),
//!                    bits 2-3 tailroom (256, 64, 16, 0 bytes),
//!                    bit 4    outbound only: frames come from the host stack, not the LAN
//! then up to MAX_FRAMES records, until the input ends:
//!   raw frame     [tag < 0x80] [len: u16 BE] [len bytes (fewer if the input ends)]
//!   sealed frame  [tag >= 0x80: SA index in the low bits] [outer TOS: u8] [seq: u32 BE]
//!                 [len: u16 BE] [len bytes of ESP plaintext: payload, padding, pad length,
//!                 next header]   (inbound only; the outbound target reads every record raw)
//! ```
//!
//! A sealed record is encrypted with the inbound SA's keys and wrapped in the outer headers
//! that SA expects, so the fuzzer reaches everything behind the ICV check (trailer, padding,
//! next header, inner headers, selectors, ECN, TTL, MTU, transport-mode decapsulation) without
//! having to forge an ICV.
//!
//! Addresses are documentation ranges (RFC 5737, RFC 3849); keys are fuzzing keys.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use espgw_crypto::{
    CryptoProvider, EspOp, OpStatus, SaCrypto, SaKeys, SoftwareProvider, Transform, WorkerCtx,
};
use espgw_dataplane::config::{self, PortId};
use espgw_dataplane::counters::{DropCounts, DropReason, WorkerCounters};
use espgw_dataplane::demo::{udp4_frame, udp6_frame};
use espgw_dataplane::pipeline::{Frame, MAX_BURST, Pipeline, Verdict};
use espgw_wire::ethernet::{self, EthernetAddress};
use espgw_wire::ip::protocol;
use espgw_wire::{esp, ipv4, ipv6, udp};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// The data-plane clock of every burst.
pub const NOW: u64 = 1_000_000_000;
/// At most this many frames per input (more than two internal chunks of [`MAX_BURST`]).
pub const MAX_FRAMES: usize = 160;

const HEADROOM: [usize; 4] = [256, 128, 40, 0];
const TAILROOM: [usize; 4] = [256, 64, 16, 0];

const A4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const B4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);
const MAC_A_WAN: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0x0a, 1]);
const MAC_B_WAN: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0x0b, 1]);

/// One SA pair: outbound on the LAN/host side's gateway, inbound on the WAN side's.
#[derive(Debug, Clone, Copy)]
pub struct SaSpec {
    /// Name (the same on both sides).
    pub name: &'static str,
    /// SPI.
    pub spi: u32,
    /// IPv6 outer addresses.
    pub v6: bool,
    /// ESP in UDP 4500.
    pub udp: bool,
    /// Transport mode.
    pub transport: bool,
    /// Transform in canonical spelling.
    pub transform: &'static str,
    /// Extended sequence numbers.
    pub esn: bool,
    /// Extra TOML lines for the inbound SA.
    pub inbound_extra: &'static str,
    /// Seed for the key bytes.
    pub key_seed: u8,
}

/// The SA pairs, in the order a sealed record's SA index selects them.
pub const SAS: [SaSpec; 6] = [
    SaSpec {
        name: "gcm4-udp",
        spi: 0x0000_1001,
        v6: false,
        udp: true,
        transport: false,
        transform: "aes128gcm16",
        esn: false,
        inbound_extra: "",
        key_seed: 0x10,
    },
    SaSpec {
        name: "cbc4",
        spi: 0x0000_2002,
        v6: false,
        udp: false,
        transport: false,
        transform: "aes128-cbc/hmac-sha1-96",
        esn: false,
        // Anti-replay off: this SA's results do not depend on earlier inputs.
        inbound_extra: "replay_window = 0\n",
        key_seed: 0x20,
    },
    SaSpec {
        name: "cbc6-esn",
        spi: 0x0000_4004,
        v6: true,
        udp: false,
        transport: false,
        transform: "aes256-cbc/hmac-sha2-256-128",
        esn: true,
        inbound_extra: "",
        key_seed: 0x30,
    },
    SaSpec {
        name: "gcm6-udp-esn",
        spi: 0x0000_8008,
        v6: true,
        udp: true,
        transport: false,
        transform: "aes256gcm12",
        esn: true,
        // RFC 6040 compatibility mode: the outer ECN field is ignored on decapsulation.
        inbound_extra: "ecn = \"compat\"\n",
        key_seed: 0x40,
    },
    SaSpec {
        name: "gcm4-transport",
        spi: 0x0001_0010,
        v6: false,
        udp: true,
        transport: true,
        transform: "aes128gcm16",
        esn: false,
        inbound_extra: "",
        key_seed: 0x50,
    },
    SaSpec {
        name: "null4",
        spi: 0x0002_0020,
        v6: false,
        udp: false,
        transport: false,
        transform: "null/hmac-sha2-512-256",
        esn: false,
        inbound_extra: "",
        key_seed: 0x60,
    },
];

impl SaSpec {
    /// The transform.
    pub fn t(&self) -> Transform {
        Transform::from_name(self.transform).unwrap()
    }
    fn enc_key(&self) -> Vec<u8> {
        (0..self.t().enc_key_len())
            .map(|i| self.key_seed.wrapping_add(i as u8))
            .collect()
    }
    fn integ_key(&self) -> Vec<u8> {
        (0..self.t().integ_key_len())
            .map(|i| (self.key_seed ^ 0x80).wrapping_add(i as u8))
            .collect()
    }
    fn ip_hdr(&self) -> usize {
        if self.v6 {
            ipv6::HEADER_LEN
        } else {
            ipv4::HEADER_LEN
        }
    }
    fn udp_len(&self) -> usize {
        if self.udp { udp::HEADER_LEN } else { 0 }
    }
    fn esp_at(&self) -> usize {
        ethernet::HEADER_LEN + self.ip_hdr() + self.udp_len()
    }
    /// A plaintext frame that the outbound gateway sends through this SA.
    pub fn plain_frame(&self, payload: usize) -> Vec<u8> {
        if self.transport {
            return udp4_frame(A4, B4, 1024, 7, payload, 64);
        }
        let last = self.spi.trailing_zeros() as u8;
        if self.v6 {
            let dst = Ipv6Addr::new(0x2001, 0xdb8, 2, u16::from(last), 0, 0, 0, 0x20);
            udp6_frame("2001:db8:1::10".parse().unwrap(), dst, 1024, 7, payload, 64)
        } else {
            udp4_frame(
                Ipv4Addr::new(198, 51, 100, 10),
                Ipv4Addr::new(198, 51, 100, 138 + last),
                1024,
                7,
                payload,
                64,
            )
        }
    }
    /// The inner packet (tunnel) or upper-layer segment (transport) of [`Self::plain_frame`],
    /// and the ESP next header for it.
    pub fn plain(&self, payload: usize) -> (Vec<u8>, u8) {
        let f = self.plain_frame(payload);
        if self.transport {
            (
                f[ethernet::HEADER_LEN + ipv4::HEADER_LEN..].to_vec(),
                protocol::UDP,
            )
        } else if self.v6 {
            (f[ethernet::HEADER_LEN..].to_vec(), protocol::IPV6)
        } else {
            (f[ethernet::HEADER_LEN..].to_vec(), protocol::IPIP)
        }
    }

    fn toml(&self, out: bool) -> String {
        let (dir, local, remote): (_, IpAddr, IpAddr) = match (out, self.v6) {
            (true, false) => ("out", A4.into(), B4.into()),
            (true, true) => ("out", A6.into(), B6.into()),
            (false, false) => ("in", B4.into(), A4.into()),
            (false, true) => ("in", B6.into(), A6.into()),
        };
        let mode = if self.transport {
            "transport"
        } else {
            "tunnel"
        };
        let encap = if self.udp {
            "encap = { sport = 4500, dport = 4500 }\n"
        } else {
            ""
        };
        let alg = match self.t() {
            Transform::Aead { .. } => format!("aead = \"{}\"\n", self.transform),
            Transform::CipherAuth { cipher, integ } => format!(
                "cipher = \"{}\"\nintegrity = \"{}\"\nintegrity_key = \"0x{}\"\n",
                cipher.name(),
                integ.name(),
                hex(&self.integ_key())
            ),
        };
        let key = if self.t().enc_key_len() > 0 {
            format!("key = \"0x{}\"\n", hex(&self.enc_key()))
        } else {
            String::new()
        };
        let extra = match (out, self.transport, self.v6) {
            (true, ..) => String::new(),
            (false, true, _) => format!(
                "{}selectors = [{{ src = \"203.0.113.1\", dst = \"203.0.113.2\", protocol = \"udp\" }}]\n",
                self.inbound_extra
            ),
            (false, false, false) => format!(
                "{}selectors = [{{ src = \"198.51.100.0/25\", dst = \"198.51.100.128/25\" }}]\n",
                self.inbound_extra
            ),
            (false, false, true) => format!(
                "{}selectors = [{{ src = \"2001:db8:1::/48\", dst = \"2001:db8:2::/48\" }}]\n",
                self.inbound_extra
            ),
        };
        format!(
            "[[sa]]\nname = \"{}\"\ndirection = \"{dir}\"\nspi = {}\nmode = \"{mode}\"\n\
             local = \"{local}\"\nremote = \"{remote}\"\n{encap}{alg}{key}esn = {}\n{extra}\n",
            self.name, self.spi, self.esn
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The encrypting gateway: LAN 198.51.100.0/25 and 2001:db8:1::/48, WAN tagged VLAN 100,
/// protect / bypass / discard policies, one SA whose sequence numbers run out.
pub fn outbound_config() -> String {
    let mut s = String::from(
        r#"
[dataplane.wan]
mac = "02:00:00:00:0a:01"
addresses = ["203.0.113.1/24", "2001:db8:ff::1/64"]
vlan = 100

[dataplane.lan]
mac = "02:00:00:00:0a:02"
addresses = ["198.51.100.1/25", "2001:db8:1::1/48"]

[[neighbor]]
ip = "203.0.113.2"
mac = "02:00:00:00:0b:01"

[[neighbor]]
ip = "2001:db8:ff::2"
mac = "02:00:00:00:0b:01"

[[neighbor]]
ip = "203.0.113.254"
mac = "02:00:00:00:0f:fe"

[[neighbor]]
ip = "198.51.100.20"
mac = "02:00:00:00:0c:20"

[[route]]
dst = "192.0.2.0/24"
via = "203.0.113.254"
port = "wan"

[[policy]]
src = "198.51.100.0/25"
dst = "192.0.2.0/25"
action = "bypass"

[[policy]]
src = "198.51.100.0/25"
dst = "192.0.2.128/25"
action = "discard"

[[policy]]
src = "203.0.113.1"
dst = "198.51.100.0/25"
action = "bypass"

[[policy]]
src = "198.51.100.0/25"
dst = "198.51.100.250"
action = "protect"
sa = "exhaust"

[[sa]]
name = "exhaust"
direction = "out"
spi = 0x00040040
local = "203.0.113.1"
remote = "203.0.113.2"
aead = "aes128gcm8"
key = "0x000102030405060708090a0b0c0d0e0f10111213"
initial_seq = 4294967000

"#,
    );
    for sa in &SAS {
        let last = sa.spi.trailing_zeros();
        let selector = match (sa.transport, sa.v6) {
            (true, _) => {
                "src = \"203.0.113.1\"\ndst = \"203.0.113.2\"\nprotocol = \"udp\"\ndport = 7"
                    .to_string()
            }
            (false, false) => format!(
                "src = \"198.51.100.0/25\"\ndst = \"198.51.100.{}\"",
                138 + last
            ),
            (false, true) => {
                format!("src = \"2001:db8:1::/48\"\ndst = \"2001:db8:2:{last:x}::/64\"")
            }
        };
        s += &format!(
            "[[policy]]\n{selector}\naction = \"protect\"\nsa = \"{}\"\n\n",
            sa.name
        );
        s += &sa.toml(true);
    }
    s
}

/// The decrypting gateway: the mirror image, LAN tagged VLAN 200 with an MTU of 1400.
pub fn inbound_config() -> String {
    let mut s = String::from(
        r#"
[dataplane]
replay_window = 64

[dataplane.wan]
mac = "02:00:00:00:0b:01"
addresses = ["203.0.113.2/24", "2001:db8:ff::2/64"]

[dataplane.lan]
mac = "02:00:00:00:0b:02"
addresses = ["198.51.100.129/25", "2001:db8:2::1/48"]
mtu = 1400
vlan = 200

"#,
    );
    for sa in &SAS {
        let last = sa.spi.trailing_zeros();
        if !sa.transport {
            let ip = if sa.v6 {
                format!("2001:db8:2:{last:x}::20")
            } else {
                format!("198.51.100.{}", 138 + last)
            };
            s += &format!("[[neighbor]]\nip = \"{ip}\"\nmac = \"02:00:00:00:0c:20\"\n\n");
        }
        s += &sa.toml(false);
    }
    s
}

/// One pipeline and its buffers.
#[derive(Debug)]
pub struct Harness {
    pipe: Pipeline,
    /// Inbound only: crypto objects with the inbound SAs' keys, for sealed records.
    sealers: Vec<(SaSpec, Box<dyn SaCrypto>)>,
    ctx: WorkerCtx,
    bufs: Vec<Vec<u8>>,
    /// Where each frame of the last burst ended up in its buffer (start, length).
    extents: Vec<(usize, usize)>,
}

/// Which way a harness processes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// WAN frames into the decrypting gateway.
    Inbound,
    /// LAN or host frames into the encrypting gateway.
    Outbound,
}

impl Harness {
    /// A fresh pipeline for `dir`.
    pub fn new(dir: Direction) -> Self {
        let text = match dir {
            Direction::Inbound => inbound_config(),
            Direction::Outbound => outbound_config(),
        };
        let cfg =
            config::parse_str(&text, Path::new("fuzz.toml")).unwrap_or_else(|e| panic!("{e}"));
        let (db, net) = config::instantiate(cfg, &SoftwareProvider, NOW).unwrap();
        let sealers = match dir {
            Direction::Inbound => SAS
                .iter()
                .map(|s| {
                    let keys = SaKeys::new(&s.enc_key(), &s.integ_key());
                    (*s, SoftwareProvider.new_sa(s.t(), &keys, s.esn).unwrap())
                })
                .collect(),
            Direction::Outbound => Vec::new(),
        };
        Harness {
            pipe: Pipeline::new(db, net, WorkerCtx::from_seed([7; 32])),
            sealers,
            ctx: WorkerCtx::from_seed([9; 32]),
            bufs: Vec::new(),
            extents: Vec::new(),
        }
    }

    /// The bytes of frame `i` of the last burst.
    pub fn frame(&self, i: usize) -> &[u8] {
        let (start, len) = self.extents[i];
        &self.bufs[i][start..start + len]
    }

    /// Decode `data`, run it as one `process` call and check the invariants (panics if one
    /// does not hold). Returns the verdicts.
    pub fn run(&mut self, dir: Direction, data: &[u8]) -> Vec<Verdict> {
        let Some((&flags, mut rest)) = data.split_first() else {
            return Vec::new();
        };
        let head = HEADROOM[usize::from(flags & 3)];
        let tail = TAILROOM[usize::from((flags >> 2) & 3)];
        let port = match dir {
            Direction::Inbound => PortId::Wan,
            Direction::Outbound if flags & 0x10 != 0 => PortId::Host,
            Direction::Outbound => PortId::Lan,
        };
        let mut frames: Vec<Vec<u8>> = Vec::new();
        while !rest.is_empty() && frames.len() < MAX_FRAMES {
            let tag = rest[0];
            if tag >= 0x80 && dir == Direction::Inbound {
                let Some((frame, r)) = self.sealed_record(tag, &rest[1..]) else {
                    break;
                };
                frames.push(frame);
                rest = r;
            } else {
                let (frame, r) = take_len(&rest[1..]);
                frames.push(frame.to_vec());
                rest = r;
            }
        }
        self.process(port, &frames, head, tail)
    }

    /// Decode a sealed record: seal the plaintext with SA `tag & 7` and wrap it in that SA's
    /// outer headers.
    fn sealed_record<'d>(&mut self, tag: u8, rest: &'d [u8]) -> Option<(Vec<u8>, &'d [u8])> {
        let [tos, s0, s1, s2, s3, rest @ ..] = rest else {
            return None;
        };
        let seq = u32::from_be_bytes([*s0, *s1, *s2, *s3]);
        let (body, rest) = take_len(rest);
        let (spec, crypto) = &self.sealers[usize::from(tag & 7) % self.sealers.len()];
        let t = spec.t();
        let block = match t {
            Transform::Aead { .. } => 1,
            Transform::CipherAuth { cipher, .. } => cipher.iv_len().max(1),
        };
        // The crypto wants at least the 2-byte trailer, in whole cipher blocks.
        let mut body = body.to_vec();
        let n = (body.len() / block * block).max(block.max(2).next_multiple_of(block));
        body.resize(n, 0);
        let mut p = vec![0u8; esp::HEADER_LEN + t.iv_len() + body.len() + t.icv_len()];
        p[..4].copy_from_slice(&spec.spi.to_be_bytes());
        p[4..8].copy_from_slice(&seq.to_be_bytes());
        let at = esp::HEADER_LEN + t.iv_len();
        p[at..at + body.len()].copy_from_slice(&body);
        // ESN: the high half is taken from the receiver's window, which this cannot see;
        // high half 0 is what a peer early in the SA's life sends.
        let mut ops = [EspOp::new(&mut p, u64::from(seq))];
        crypto.seal(&mut ops, &mut self.ctx);
        assert_eq!(ops[0].status, OpStatus::Ok, "sealing a fuzz record");
        Some((wrap(spec, *tos, &p), rest))
    }

    /// One `process` call over `frames` with the given room around each, then the checks.
    pub fn process(
        &mut self,
        port: PortId,
        frames: &[Vec<u8>],
        head: usize,
        tail: usize,
    ) -> Vec<Verdict> {
        if self.bufs.len() < frames.len() {
            self.bufs.resize_with(frames.len(), Vec::new);
        }
        for (b, f) in self.bufs.iter_mut().zip(frames) {
            b.clear();
            b.resize(head + f.len() + tail, 0);
            b[head..head + f.len()].copy_from_slice(f);
        }
        let w0 = self.pipe.counters().clone();
        let s0 = sa_drops(&self.pipe);
        let mut fr: Vec<Frame<'_>> = self
            .bufs
            .iter_mut()
            .zip(frames)
            .map(|(b, f)| Frame::new(b, head, f.len()).unwrap())
            .collect();
        let mut verdicts = vec![Verdict::Drop(DropReason::Unsupported); frames.len()];
        self.pipe.process(port, &mut fr, &mut verdicts, NOW);

        // Every frame, dropped or not, still describes bytes of its own buffer, and what is
        // sent is a well-formed IP packet.
        self.extents.clear();
        for ((f, v), input) in fr.iter().zip(&verdicts).zip(frames) {
            let d = f.data();
            if matches!(v, Verdict::TxWan | Verdict::TxLan) {
                // Sent to the WAN and the IP header is not where it arrived: the pipeline wrote
                // it. (A decapsulated inner header moves too, but is forwarded as it came.)
                let built = *v == Verdict::TxWan && f.start() + eth_len(d) != head + eth_len(input);
                check_ip(d, built);
            }
            self.extents.push((f.start(), f.len()));
        }
        drop(fr);
        check_counters(port, &w0, self.pipe.counters(), &verdicts);
        let s1 = sa_drops(&self.pipe);
        let worker = diff(&self.pipe.counters().drops, &w0.drops);
        let mut charged = DropCounts::default();
        for (name, after) in &s1 {
            let d = diff(after, &s0[name]);
            for r in DropReason::ALL {
                charged.add(*r, d.get(*r));
            }
        }
        for r in DropReason::ALL {
            assert!(
                charged.get(*r) <= worker.get(*r),
                "{r:?}: {} charged to SAs, {} counted by the worker",
                charged.get(*r),
                worker.get(*r)
            );
        }
        verdicts
    }
}

fn take_len(rest: &[u8]) -> (&[u8], &[u8]) {
    match rest {
        [hi, lo, rest @ ..] => {
            let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
            rest.split_at(n)
        }
        _ => (rest, &[]),
    }
}

/// Outer Ethernet, IP (A to B, with `tos`) and for UDP SAs UDP 4500 around an ESP packet.
fn wrap(spec: &SaSpec, tos: u8, esp_packet: &[u8]) -> Vec<u8> {
    let l4 = (spec.udp_len() + esp_packet.len()) as u16;
    let mut f = vec![0u8; spec.esp_at() + esp_packet.len()];
    let ip = ethernet::HEADER_LEN;
    if spec.v6 {
        let _ = ethernet::emit_header(
            &mut f,
            MAC_B_WAN,
            MAC_A_WAN,
            None,
            ethernet::ethertype::IPV6,
        );
        let h = ipv6::Ipv6Header {
            src: A6,
            dst: B6,
            next_header: if spec.udp {
                protocol::UDP
            } else {
                protocol::ESP
            },
            hop_limit: 64,
            traffic_class: tos,
            flow_label: 0,
            payload_len: l4,
        };
        ipv6::emit_header(&mut f[ip..], &h).unwrap();
    } else {
        let _ = ethernet::emit_header(
            &mut f,
            MAC_B_WAN,
            MAC_A_WAN,
            None,
            ethernet::ethertype::IPV4,
        );
        let h = ipv4::Ipv4Header {
            src: A4,
            dst: B4,
            protocol: if spec.udp {
                protocol::UDP
            } else {
                protocol::ESP
            },
            ttl: 64,
            dscp: tos >> 2,
            ecn: tos & 3,
            dont_frag: false,
            ident: 1,
            payload_len: l4,
        };
        ipv4::emit_header(&mut f[ip..], &h).unwrap();
    }
    if spec.udp {
        let at = ip + spec.ip_hdr();
        udp::emit_header(&mut f[at..], 4500, 4500, l4).unwrap();
    }
    let at = spec.esp_at();
    f[at..].copy_from_slice(esp_packet);
    if spec.udp && spec.v6 {
        let at = ip + spec.ip_hdr();
        udp::UdpPacket::new_unchecked(&mut f[at..]).fill_checksum_v6(&A6, &B6);
    }
    f
}

fn eth_len(frame: &[u8]) -> usize {
    ethernet::EthernetFrame::new_checked(frame).map_or(0, |e| e.header_len())
}

fn sa_drops(pipe: &Pipeline) -> BTreeMap<String, DropCounts> {
    let g = crossbeam_epoch::pin();
    pipe.db()
        .iter(&g)
        .map(|sa| (sa.name.clone(), sa.counters.drops.snapshot()))
        .collect()
}

fn diff(after: &DropCounts, before: &DropCounts) -> DropCounts {
    DropCounts(std::array::from_fn(|i| after.0[i] - before.0[i]))
}

/// A sent frame: Ethernet (maybe tagged), then an IP packet whose length fields cover exactly
/// the rest of the frame. An IPv4 header the pipeline wrote (`built`: tunnel mode's new outer
/// header, transport mode's moved one) has a valid checksum; a forwarded header keeps whatever
/// checksum it came with (the data plane updates it incrementally and does not verify it).
fn check_ip(d: &[u8], built: bool) {
    let e = ethernet::EthernetFrame::new_checked(d).expect("sent frame: Ethernet header");
    let ip = &d[e.header_len()..];
    match e.ethertype() {
        ethernet::ethertype::IPV4 => {
            let p = ipv4::Ipv4Packet::new_checked(ip).expect("sent frame: IPv4 header");
            assert_eq!(usize::from(p.total_len()), ip.len(), "sent IPv4 length");
            if built {
                assert!(p.verify_checksum(), "IPv4 checksum of a header we built");
            }
        }
        ethernet::ethertype::IPV6 => {
            let p = ipv6::Ipv6Packet::new_checked(ip).expect("sent frame: IPv6 header");
            assert_eq!(
                usize::from(p.payload_len()) + 40,
                ip.len(),
                "sent IPv6 length"
            );
        }
        other => panic!("sent frame with EtherType {other:#06x}"),
    }
}

/// Each verdict counted exactly once, and nothing else counted.
fn check_counters(port: PortId, w0: &WorkerCounters, w1: &WorkerCounters, verdicts: &[Verdict]) {
    let mut drops = DropCounts::default();
    let (mut wan, mut lan, mut host, mut frag) = (0, 0, 0, 0);
    for v in verdicts {
        match v {
            Verdict::Drop(r) => drops.add(*r, 1),
            Verdict::TxWan => wan += 1,
            Verdict::TxLan => lan += 1,
            Verdict::ToHost => host += 1,
            Verdict::Fragment(_) => frag += 1,
        }
    }
    assert_eq!(w1.prefragmented - w0.prefragmented, frag, "prefragmented");
    let n = verdicts.len() as u64;
    assert_eq!(diff(&w1.drops, &w0.drops), drops, "drop counters");
    assert_eq!(w1.wan.tx_frames - w0.wan.tx_frames, wan, "wan tx");
    assert_eq!(w1.lan.tx_frames - w0.lan.tx_frames, lan, "lan tx");
    assert_eq!(
        w1.to_host.tx_frames - w0.to_host.tx_frames,
        host,
        "to-host tx"
    );
    let rx = match port {
        PortId::Wan => w1.wan.rx_frames - w0.wan.rx_frames,
        PortId::Lan => w1.lan.rx_frames - w0.lan.rx_frames,
        PortId::Host => w1.from_host.rx_frames - w0.from_host.rx_frames,
    };
    assert_eq!(rx, n, "rx frames");
    assert_eq!(
        w1.bursts - w0.bursts,
        n.div_ceil(MAX_BURST as u64),
        "bursts"
    );
}

// ---------------------------------------------------------------------------------------------
// Seeds.

fn raw_record(out: &mut Vec<u8>, frame: &[u8]) {
    out.push(0);
    out.extend((frame.len() as u16).to_be_bytes());
    out.extend(frame);
}

fn sealed_record(out: &mut Vec<u8>, sa: usize, tos: u8, seq: u32, body: &[u8]) {
    out.push(0x80 | sa as u8);
    out.push(tos);
    out.extend(seq.to_be_bytes());
    out.extend((body.len() as u16).to_be_bytes());
    out.extend(body);
}

/// Seed inputs for the outbound target, named.
pub fn outbound_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut all = vec![0u8];
    for sa in &SAS {
        for size in [0, 100] {
            let flags = if sa.transport { 0x10 } else { 0 };
            let mut s = vec![flags];
            raw_record(&mut s, &sa.plain_frame(size));
            if !sa.transport {
                raw_record(&mut all, &sa.plain_frame(size));
            }
            seeds.push((format!("{}-{size}", sa.name), s));
        }
    }
    seeds.push(("lan-burst".into(), all));
    for (name, dst) in [
        ("bypass", Ipv4Addr::new(192, 0, 2, 10)),
        ("discard", Ipv4Addr::new(192, 0, 2, 200)),
        ("exhaust", Ipv4Addr::new(198, 51, 100, 250)),
        ("no-policy", Ipv4Addr::new(198, 51, 100, 251)),
    ] {
        let mut s = vec![0u8];
        raw_record(
            &mut s,
            &udp4_frame(Ipv4Addr::new(198, 51, 100, 10), dst, 1, 2, 30, 64),
        );
        seeds.push((name.into(), s));
    }
    let mut s = vec![0x10u8];
    raw_record(
        &mut s,
        &udp4_frame(A4, Ipv4Addr::new(198, 51, 100, 20), 1, 2, 30, 64),
    );
    seeds.push(("host-bypass-to-lan".into(), s));
    seeds
}

/// Seed inputs for the inbound target, named: ESP frames made by the outbound gateway, sealed
/// records with valid plaintext, NAT-T keepalive and IKE.
pub fn inbound_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Harness::new(Direction::Outbound);
    let mut seeds = Vec::new();
    let mut burst = vec![0u8];
    for (i, sa) in SAS.iter().enumerate() {
        let port = if sa.transport {
            PortId::Host
        } else {
            PortId::Lan
        };
        let plain = vec![sa.plain_frame(37)];
        let v = out.process(port, &plain, 256, 256);
        assert_eq!(v, [Verdict::TxWan], "seed for {}", sa.name);
        let frame = out.frame(0).to_vec();
        let mut s = vec![0u8];
        raw_record(&mut s, &frame);
        raw_record(&mut burst, &frame);
        seeds.push((format!("esp-{}", sa.name), s));

        let (payload, nh) = sa.plain(37);
        let pad = esp::pad_len(payload.len(), sa.t().block_align());
        let mut body = payload.clone();
        body.resize(payload.len() + pad + 2, 0);
        esp::write_trailer(&mut body[payload.len()..], pad, nh).unwrap();
        let mut s = vec![0u8];
        sealed_record(&mut s, i, 0, 1000, &body);
        seeds.push((format!("sealed-{}", sa.name), s));
    }
    seeds.push(("esp-burst".into(), burst));
    let mut s = vec![0u8];
    raw_record(&mut s, &udp4_frame(A4, B4, 4500, 4500, 1, 64));
    let n = s.len();
    s[n - 1] = 0xff;
    seeds.push(("natt-keepalive".into(), s));
    let mut s = vec![0u8];
    raw_record(&mut s, &udp6_frame(A6, B6, 500, 500, 28, 64));
    seeds.push(("ike".into(), s));
    seeds
}

/// Check the seeds against fresh pipelines (every valid packet must be delivered), then write
/// them as `seed-<name>` into the first directory named on the command line (the corpus
/// directory `cargo fuzz run` passes), unless they are there already.
pub fn init(dir: Direction) {
    let seeds = match dir {
        Direction::Inbound => inbound_seeds(),
        Direction::Outbound => outbound_seeds(),
    };
    for (name, s) in &seeds {
        // Each seed on its own pipeline: they reuse sequence numbers.
        let v = Harness::new(dir).run(dir, s);
        let delivered = v
            .iter()
            .all(|v| matches!(v, Verdict::TxWan | Verdict::TxLan | Verdict::ToHost));
        let expect_drop = matches!(name.as_str(), "discard" | "no-policy" | "natt-keepalive");
        assert!(
            delivered != expect_drop,
            "seed {name}: unexpected verdicts {v:?}"
        );
    }
    let Some(corpus) = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && Path::new(a).is_dir())
    else {
        return;
    };
    for (name, s) in seeds {
        let p = Path::new(&corpus).join(format!("seed-{name}"));
        if !p.exists() {
            let _ = std::fs::write(p, s);
        }
    }
}
