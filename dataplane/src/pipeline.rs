//! The burst pipeline: a batch of frames in, a verdict per frame out.
//!
//! One [`Pipeline`] belongs to one worker. [`Pipeline::process`] takes the frames that arrived on
//! one port and works through them in chunks of at most [`MAX_BURST`], in stages, each over the
//! whole chunk (the shape of VPP's ESP nodes):
//!
//! 1. **classify**: parse Ethernet/IP, find the SA (SPD lookup outbound, SPI lookup inbound,
//!    remembering the last SA so consecutive packets of one SA cost one lookup), check lengths,
//!    lifetimes and (inbound) the anti-replay window; decide at once for everything that needs
//!    no crypto (bypass, to host, drop);
//! 2. **reserve** (outbound): sequence numbers for each run of packets of one SA in one atomic
//!    operation;
//! 3. **build** (outbound): padding, trailer, ESP/UDP/outer IP/Ethernet headers, in place in the
//!    frame's headroom and tailroom;
//! 4. **crypto**: one `seal`/`open` call per run of consecutive packets of one SA;
//! 5. **finish**: (inbound) replay-window update, trailer and padding check, decapsulation,
//!    selector check, Ethernet rewrite; counters are added to each SA once per run.
//!
//! Nothing here allocates per packet, takes a lock, or panics on packet contents.
//!
//! The per-frame scratch ([`Meta`]) is filled in place and kept small, with the parsed header
//! facts in a 12-byte [`L3`]: building a large record on the stack and copying it into the
//! scratch array cost a store-forwarding stall per packet (measured: 17 % of the non-crypto
//! time). Addresses are read from the packet where they are needed instead of being carried.

use crate::antireplay::ReplayError;
use crate::config::{PortConfig, PortId};
use crate::counters::{DropReason, WorkerCounters};
use crate::icmp;
use crate::nexthop::NextHops;
use crate::policy::{Action, FlowAddr, FlowKey, Spd};
use crate::sa::{
    DfMode, DscpMode, EcnMode, EventSink, Mode, Peer, RunCounts, Sa, SaId, UnknownSpi,
};
use crate::sadb::SaDb;
use arrayvec::ArrayVec;
use espgw_crypto::{EspOp, OpStatus, WorkerCtx};
use espgw_wire::ip::{ecn, protocol};
use espgw_wire::{checksum, esp, ethernet, ipv4, ipv6, natt, udp};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

/// Frames handled per internal chunk (bounds the per-burst scratch arrays, which live on the
/// stack).
pub const MAX_BURST: usize = 64;

/// A packet in a buffer: bytes `start..start+len` of `buf`. The bytes before `start` are
/// headroom for headers to be pushed, the bytes after the end tailroom for the ESP trailer.
#[derive(Debug)]
pub struct Frame<'a> {
    buf: &'a mut [u8],
    start: usize,
    len: usize,
}

impl<'a> Frame<'a> {
    /// A frame of `len` bytes at `start` in `buf`; `None` if that does not fit.
    pub fn new(buf: &'a mut [u8], start: usize, len: usize) -> Option<Self> {
        (start.checked_add(len)? <= buf.len()).then_some(Frame { buf, start, len })
    }

    /// The packet bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// Offset of the packet in the buffer.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Packet length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty frame.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What happens to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send out of the WAN port (the frame holds the new bytes).
    TxWan,
    /// Send out of the LAN port.
    TxLan,
    /// Hand to the gateway's own stack (IKE, ARP, management, transport-mode traffic for us).
    ToHost,
    /// Drop, counted under the reason.
    Drop(DropReason),
    /// Too big for its tunnel, and it may be fragmented (IPv4 without DF, fragmentation before
    /// encryption configured): split the IP packet into fragments of at most this many bytes
    /// ([`crate::icmp::fragment_v4`]) and process those instead. The frame itself is spent.
    Fragment(u16),
}

/// The gateway's ports and how to reach neighbours, shared by all workers.
#[derive(Debug)]
pub struct Network {
    /// WAN port.
    pub wan: PortConfig,
    /// LAN port.
    pub lan: PortConfig,
    /// UDP port carrying ESP-in-UDP on the WAN side.
    pub encap_port: u16,
    /// Next hops.
    pub next_hops: Box<dyn NextHops>,
    /// Clamp TCP SYNs' MSS option to this (both directions), or leave them alone.
    pub tcp_mss: Option<u16>,
    /// Fragment IPv4 packets without DF that do not fit their tunnel before encryption
    /// (Cisco's default, `crypto ipsec fragmentation before-encryption`) instead of dropping
    /// them.
    pub prefragment: bool,
    /// Plain router: forward every routed IP packet by destination, no IPsec (the baseline the
    /// forwarding benchmark compares against, and a way to check the I/O path alone).
    pub forward_only: bool,
    /// Every address of the gateway, and the WAN port's, in the form compared per packet.
    ours: Vec<FlowAddr>,
    wan_ours: Vec<FlowAddr>,
}

impl Network {
    /// Ports, the ESP-in-UDP port and next-hop resolution.
    pub fn new(
        wan: PortConfig,
        lan: PortConfig,
        encap_port: u16,
        next_hops: Box<dyn NextHops>,
    ) -> Self {
        let addrs = |p: &PortConfig| {
            p.addresses
                .iter()
                .map(|(a, _)| FlowAddr::from(*a))
                .collect::<Vec<_>>()
        };
        let wan_ours = addrs(&wan);
        let mut ours = wan_ours.clone();
        ours.extend(addrs(&lan));
        Network {
            wan,
            lan,
            encap_port,
            next_hops,
            tcp_mss: None,
            prefragment: false,
            forward_only: false,
            ours,
            wan_ours,
        }
    }

    #[inline]
    fn is_ours(&self, a: &FlowAddr) -> bool {
        self.ours.contains(a)
    }

    /// ESP for an address that is not the WAN port's is not ours to decrypt (an empty WAN
    /// address list accepts everything).
    #[inline]
    fn is_wan_ours(&self, a: &FlowAddr) -> bool {
        self.wan_ours.is_empty() || self.wan_ours.contains(a)
    }
}

const F_V6: u8 = 1;
const F_FRAG: u8 = 2;
const F_LATER_FRAG: u8 = 4;
const F_DF: u8 = 8;

/// The facts about a frame's IP header that later stages need (offsets relative to the frame
/// start for `eth_len`, to the IP header for the others).
#[derive(Debug, Clone, Copy, Default)]
struct L3 {
    eth_len: u16,
    /// Length of the IP packet (without Ethernet padding).
    ip_len: u16,
    /// Bytes kept in front of an ESP header in transport mode (IPv4 header with options; IPv6
    /// fixed header plus the extension headers that stay in front).
    keep: u16,
    /// Offset of the next-header byte naming what follows `keep`.
    nh_field: u16,
    /// Offset of the upper-layer header.
    upper: u16,
    proto: u8,
    ttl: u8,
    /// DSCP << 2 | ECN.
    tos: u8,
    flags: u8,
}

impl L3 {
    #[inline]
    fn v6(&self) -> bool {
        self.flags & F_V6 != 0
    }
    #[inline]
    fn fragment(&self) -> bool {
        self.flags & F_FRAG != 0
    }
    #[inline]
    fn df(&self) -> bool {
        self.flags & F_DF != 0
    }
    #[inline]
    fn ecn(&self) -> u8 {
        self.tos & 3
    }
    #[inline]
    fn dscp(&self) -> u8 {
        self.tos >> 2
    }
    #[inline]
    fn eth_len(&self) -> usize {
        usize::from(self.eth_len)
    }
    #[inline]
    fn ip_len(&self) -> usize {
        usize::from(self.ip_len)
    }

    /// Source and destination, read from the packet (`ip` starts at the IP header; the parse
    /// checked the length, so the zero fallback is never taken).
    #[inline(always)]
    fn addrs(&self, ip: &[u8]) -> (FlowAddr, FlowAddr) {
        let a4 = |b: &[u8]| {
            let mut x = [0u8; 4];
            x.copy_from_slice(b);
            FlowAddr {
                v6: false,
                bits: u128::from(u32::from_be_bytes(x)),
            }
        };
        let a6 = |b: &[u8]| {
            let mut x = [0u8; 16];
            x.copy_from_slice(b);
            FlowAddr {
                v6: true,
                bits: u128::from_be_bytes(x),
            }
        };
        if self.v6() {
            match ip.first_chunk::<{ ipv6::HEADER_LEN }>() {
                Some(h) => (a6(&h[8..24]), a6(&h[24..40])),
                None => (a6(&[0; 16]), a6(&[0; 16])),
            }
        } else {
            match ip.first_chunk::<{ ipv4::HEADER_LEN }>() {
                Some(h) => (a4(&h[12..16]), a4(&h[16..20])),
                None => (a4(&[0; 4]), a4(&[0; 4])),
            }
        }
    }

    /// The raw bytes behind [`flow`](Self::flow): protocol, addresses and the first four bytes of
    /// the upper-layer header (ports, when the protocol has them). Equal tags mean equal flows.
    #[inline(always)]
    fn flow_tag(&self, ip: &[u8]) -> FlowTag {
        let upper = usize::from(self.upper);
        let first4 = if self.flags & F_LATER_FRAG != 0 {
            None
        } else {
            ip.get(upper..self.ip_len())
                .and_then(|l4| l4.first_chunk::<4>())
        };
        let l4 = first4.map_or(0, |b| u64::from(u32::from_ne_bytes(*b)) | 1 << 40);
        let c = l4 | u64::from(self.proto) << 32;
        if self.v6() {
            match ip.first_chunk::<{ ipv6::HEADER_LEN }>() {
                Some(h) => {
                    let mut a = [0u8; 16];
                    let mut b = [0u8; 16];
                    a.copy_from_slice(&h[8..24]);
                    b.copy_from_slice(&h[24..40]);
                    FlowTag {
                        a: u128::from_ne_bytes(a),
                        b: u128::from_ne_bytes(b),
                        c: c | 1 << 41,
                    }
                }
                None => FlowTag {
                    a: 0,
                    b: 0,
                    c: u64::MAX,
                },
            }
        } else {
            match ip.first_chunk::<{ ipv4::HEADER_LEN }>() {
                Some(h) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&h[12..20]);
                    FlowTag {
                        a: u128::from(u64::from_ne_bytes(a)),
                        b: 0,
                        c,
                    }
                }
                None => FlowTag {
                    a: 0,
                    b: 0,
                    c: u64::MAX,
                },
            }
        }
    }

    /// The selector view of the packet.
    #[inline(always)]
    fn flow(&self, ip: &[u8]) -> FlowKey {
        let (src, dst) = self.addrs(ip);
        let ports = if self.flags & F_LATER_FRAG != 0 {
            None
        } else {
            ip.get(usize::from(self.upper)..self.ip_len())
                .and_then(|l4| espgw_wire::ip::l4_ports(self.proto, l4))
        };
        FlowKey {
            src,
            dst,
            protocol: self.proto,
            ports,
        }
    }
}

fn wire_err(e: espgw_wire::Error) -> DropReason {
    match e {
        espgw_wire::Error::Truncated => DropReason::Truncated,
        espgw_wire::Error::Malformed => DropReason::Malformed,
        espgw_wire::Error::BadPadding => DropReason::BadPadding,
    }
}

/// Parse the IP packet at `data[0]` into `l3`. IPv4 header checksums are verified (RFC 1812
/// §5.2.2).
#[inline(always)]
fn parse_ip(data: &[u8], eth_len: usize, v6: bool, l3: &mut L3) -> Result<(), DropReason> {
    l3.eth_len = eth_len as u16;
    if !v6 {
        // The common case first: no options, the whole header present, a plausible length.
        // One fixed-size read and three compares decide it; the wire view below makes the same
        // checks one field at a time and says which one failed.
        if let Some(fixed) = data.first_chunk::<{ ipv4::HEADER_LEN }>()
            && fixed[0] == 0x45
            && (ipv4::HEADER_LEN..=data.len()).contains(&usize::from(read_be16(fixed, 2)))
        {
            if !ipv4_header_checksum_ok(fixed) {
                return Err(DropReason::BadChecksum);
            }
            fill_ipv4(l3, fixed, ipv4::HEADER_LEN);
            return Ok(());
        }
        let p = ipv4::Ipv4Packet::new_checked(data).map_err(wire_err)?;
        let hl = p.header_len();
        let Some(fixed) = data.first_chunk::<{ ipv4::HEADER_LEN }>() else {
            return Err(DropReason::Truncated);
        };
        if checksum::sum(&data[..hl]) != 0xFFFF {
            return Err(DropReason::BadChecksum);
        }
        fill_ipv4(l3, fixed, hl);
    } else {
        let p = ipv6::Ipv6Packet::new_checked(data).map_err(wire_err)?;
        let ext = p.walk_ext_headers().map_err(wire_err)?;
        // Extension headers are bounded by the payload length, which fits 16 bits.
        l3.ip_len =
            (ipv6::HEADER_LEN + usize::from(p.payload_len())).min(usize::from(u16::MAX)) as u16;
        l3.keep = ext.esp_insert_offset as u16;
        l3.nh_field = ext.esp_insert_nh_field as u16;
        l3.upper = ext.upper_offset as u16;
        l3.proto = ext.upper_protocol;
        l3.ttl = p.hop_limit();
        l3.tos = p.traffic_class();
        let frag = ext.fragment.is_some();
        let later = ext.fragment.is_some_and(|f| f.offset_bytes != 0);
        l3.flags =
            F_V6 | F_DF | if frag { F_FRAG } else { 0 } | if later { F_LATER_FRAG } else { 0 };
    }
    Ok(())
}

#[inline(always)]
fn read_be16(b: &[u8; ipv4::HEADER_LEN], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// `l3` from a checked IPv4 header of `hl` bytes (`fixed`: its first 20).
#[inline(always)]
fn fill_ipv4(l3: &mut L3, fixed: &[u8; ipv4::HEADER_LEN], hl: usize) {
    let flags_frag = read_be16(fixed, 6);
    let later = flags_frag & 0x1FFF != 0;
    let more = flags_frag & 0x2000 != 0;
    let df = flags_frag & 0x4000 != 0;
    l3.ip_len = read_be16(fixed, 2);
    l3.keep = hl as u16;
    l3.nh_field = 9;
    l3.upper = hl as u16;
    l3.proto = fixed[9];
    l3.ttl = fixed[8];
    l3.tos = fixed[1];
    l3.flags = if later || more { F_FRAG } else { 0 }
        | if later { F_LATER_FRAG } else { 0 }
        | if df { F_DF } else { 0 };
}

/// Does an option-less IPv4 header (with its checksum field) sum to 0xFFFF? Five 32-bit words,
/// summed inline.
#[inline(always)]
fn ipv4_header_checksum_ok(w: &[u8; ipv4::HEADER_LEN]) -> bool {
    let word = |i: usize| u64::from(u32::from_be_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]]));
    let mut s = word(0) + word(4) + word(8) + word(12) + word(16);
    s = (s & 0xFFFF_FFFF) + (s >> 32);
    s = (s & 0xFFFF) + (s >> 16);
    s = (s & 0xFFFF) + (s >> 16);
    s = (s & 0xFFFF) + (s >> 16);
    s == 0xFFFF
}

/// Parse an Ethernet frame carrying IP into `l3`. `Ok(false)`: not IP (ARP, ...).
#[inline(always)]
fn parse_frame(data: &[u8], l3: &mut L3) -> Result<bool, DropReason> {
    // Untagged IPv4, the common case, without the tag checks of the wire view.
    if let Some(head) = data.first_chunk::<{ ethernet::HEADER_LEN }>()
        && head[12..14] == ethernet::ethertype::IPV4.to_be_bytes()
    {
        return parse_ip(
            &data[ethernet::HEADER_LEN..],
            ethernet::HEADER_LEN,
            false,
            l3,
        )
        .map(|()| true);
    }
    let eth = ethernet::EthernetFrame::new_checked(data).map_err(wire_err)?;
    let v6 = match eth.ethertype() {
        ethernet::ethertype::IPV4 => false,
        ethernet::ethertype::IPV6 => true,
        _ => return Ok(false),
    };
    let eth_len = eth.header_len();
    parse_ip(&data[eth_len..], eth_len, v6, l3).map(|()| true)
}

fn is_multicast_or_link_local(a: &FlowAddr) -> bool {
    if a.v6 {
        let b = a.bits >> 112;
        // ff00::/8 multicast, fe80::/10 link-local.
        b >> 8 == 0xff || b & 0xffc0 == 0xfe80
    } else {
        let b = a.bits as u32;
        // 224.0.0.0/4 multicast, 255.255.255.255 broadcast.
        b >> 28 == 0xe || b == u32::MAX
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Todo {
    Done,
    Seal,
    Open,
}

/// Per-frame scratch for one chunk.
#[derive(Debug, Clone, Copy)]
struct Meta<'g> {
    sa: Option<&'g Sa>,
    seq: u64,
    /// Absolute offset of the ESP header in the buffer, and length through the ICV.
    esp_off: u32,
    esp_len: u32,
    /// Plaintext IP bytes for the counters.
    bytes: u32,
    l3: L3,
    /// Outbound: next-hop MAC.
    mac: ethernet::EthernetAddress,
    /// Outbound tunnel mode: index of the SA's header template in the chunk.
    tpl: u8,
    verdict: Verdict,
    todo: Todo,
    status: OpStatus,
    /// Outbound: the largest inner packet that fits the tunnel, when this one did not and may
    /// not be fragmented (an ICMP error goes back with it).
    pmtu: u16,
    /// Inbound, UDP-encapsulated: the outer source differs from the SA's peer (reported as a
    /// NAT mapping change if the packet authenticates).
    nat: bool,
}

impl Meta<'_> {
    const EMPTY: Meta<'static> = Meta {
        sa: None,
        seq: 0,
        esp_off: 0,
        esp_len: 0,
        bytes: 0,
        l3: L3 {
            eth_len: 0,
            ip_len: 0,
            keep: 0,
            nh_field: 0,
            upper: 0,
            proto: 0,
            ttl: 0,
            tos: 0,
            flags: 0,
        },
        mac: ethernet::EthernetAddress([0; 6]),
        tpl: 0,
        verdict: Verdict::Drop(DropReason::Unsupported),
        todo: Todo::Done,
        status: OpStatus::Pending,
        pmtu: 0,
        nat: false,
    };

    #[inline]
    fn esp_range(&self) -> std::ops::Range<usize> {
        self.esp_off as usize..(self.esp_off + self.esp_len) as usize
    }

    /// Mark done with a verdict.
    #[inline]
    fn finish(&mut self, v: Verdict) {
        self.todo = Todo::Done;
        self.verdict = v;
    }
}

fn same_sa(a: Option<&Sa>, b: Option<&Sa>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// The last next-hop answer of a chunk, so that a run of packets towards one destination (one
/// SA's peer outbound, one inner host inbound) asks [`NextHops`] once instead of once per packet.
#[derive(Debug, Default)]
struct HopCache(
    Option<(
        PortId,
        IpAddr,
        Result<ethernet::EthernetAddress, DropReason>,
    )>,
);

impl HopCache {
    #[inline(always)]
    fn resolve(
        &mut self,
        net: &Network,
        port: PortId,
        dst: IpAddr,
    ) -> Result<ethernet::EthernetAddress, DropReason> {
        match self.0 {
            Some((p, d, r)) if p == port && d == dst => r,
            _ => {
                let r = net.next_hops.resolve(port, dst);
                self.0 = Some((port, dst, r));
                r
            }
        }
    }
}

/// The last outbound SA of a chunk, with its next hop and (tunnel mode) its header template, so
/// that a run of packets of one SA does the lookups and builds the outer headers once.
struct OutCache<'g> {
    id: Option<SaId>,
    sa: Option<&'g Sa>,
    mac: Result<ethernet::EthernetAddress, DropReason>,
    tpl: u8,
}

impl<'g> OutCache<'g> {
    fn new() -> Self {
        OutCache {
            id: None,
            sa: None,
            mac: Err(DropReason::NoRoute),
            tpl: 0,
        }
    }

    /// The SA for `id`, its next-hop MAC and the index of its header template in `tpls`.
    #[inline]
    fn get(
        &mut self,
        id: SaId,
        db: &'g SaDb,
        guard: &'g crossbeam_epoch::Guard,
        net: &Network,
        hops: &mut HopCache,
        tpls: &mut ArrayVec<OuterTemplate, MAX_BURST>,
    ) -> Option<(&'g Sa, Result<ethernet::EthernetAddress, DropReason>, u8)> {
        if self.id != Some(id) {
            self.id = Some(id);
            self.sa = db.get(id, guard);
            if let Some(sa) = self.sa {
                // One snapshot of the peer for the next hop and the headers (an update may
                // move it at any time).
                let peer = **sa.peer();
                self.mac = hops.resolve(net, PortId::Wan, peer.remote);
                if let (Ok(mac), Mode::Tunnel) = (self.mac, sa.mode) {
                    // At most one template per frame of the chunk: never full.
                    self.tpl = tpls.len() as u8;
                    let _ = tpls.try_push(OuterTemplate::new(sa, &peer, mac, &net.wan));
                }
            }
        }
        self.sa.map(|sa| (sa, self.mac, self.tpl))
    }
}

/// Which other lines of a frame [`prefetch_heads`] asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AlsoLine {
    /// The lines in front of the frame where outbound headers are pushed ([`PUSHED`] bytes).
    Headroom,
    /// Inbound: a small frame whole (its ICV is read before the decryption).
    WholeIfSmall,
}

/// The headroom in front of a frame that encapsulation writes in the common cases: an ESP
/// header, an IV of up to 16 bytes and [`OuterTemplate::SHORT`] bytes of outer headers, in place
/// of the 14-byte Ethernet header. (IPv6 outer headers reach up to 20 bytes further: a miss there
/// is only a miss, as before.)
const PUSHED: usize = OuterTemplate::SHORT + esp::HEADER_LEN + 16 - ethernet::HEADER_LEN;

/// Inbound frames up to this long are prefetched whole (at most five lines); longer ones are
/// left to the crypto backend, one packet ahead.
const SMALL_FRAME: usize = espgw_crypto::PREFETCH_NEXT_FROM;

/// What encapsulation writes behind a frame before encrypting it: padding (one 16-byte block)
/// plus the pad length and next-header bytes.
const TRAILER_MAX: usize = 16 + 2;

/// Hint the CPU to load each frame's first cache line (the headers) and the other lines the
/// stage will touch first, for the whole chunk at once, so that the misses of different frames
/// overlap instead of stalling each packet in turn. Only a hint: see
/// [`espgw_crypto::prefetch_lines`].
#[inline]
fn prefetch_heads(frames: &[Frame<'_>], also: AlsoLine) {
    for f in frames {
        let start = f.buf.as_ptr().wrapping_add(f.start);
        match also {
            // The headroom lines and the first line of the frame itself, and the line(s) after
            // the frame where the ESP trailer goes before the encryption.
            AlsoLine::Headroom => {
                espgw_crypto::prefetch_lines(start.wrapping_sub(PUSHED), PUSHED + 1);
                espgw_crypto::prefetch_lines(start.wrapping_add(f.len), TRAILER_MAX);
            }
            // A small frame whole (the decryption reads every line of it, too few for the
            // hardware prefetcher to notice the stream); of a larger one only the first line,
            // for the headers: the rest of each frame, ICV included, is asked for while the
            // crypto works on the frame before (`Pipeline::crypto`, `prefetch_next_op`).
            AlsoLine::WholeIfSmall if f.len <= SMALL_FRAME => {
                espgw_crypto::prefetch_lines(start, f.len)
            }
            AlsoLine::WholeIfSmall => espgw_crypto::prefetch_lines(start, 1),
        }
    }
    // The first frame's crypto has no frame before it to hide its misses behind: all of it now,
    // while the stages in front of the crypto run.
    if let Some(f) = frames.first() {
        espgw_crypto::prefetch_lines(f.buf.as_ptr().wrapping_add(f.start), f.len);
    }
}

/// The last SA of a chunk (outbound by handle, inbound by SPI and destination).
struct SaCache<'g, K> {
    key: Option<K>,
    sa: Option<&'g Sa>,
}

impl<'g, K: PartialEq + Copy> SaCache<'g, K> {
    fn new() -> Self {
        SaCache {
            key: None,
            sa: None,
        }
    }

    #[inline]
    fn get(&mut self, key: K, lookup: impl FnOnce() -> Option<&'g Sa>) -> Option<&'g Sa> {
        if self.key != Some(key) {
            self.sa = lookup();
            self.key = Some(key);
        }
        self.sa
    }
}

/// One worker's packet processor.
#[derive(Debug)]
pub struct Pipeline {
    db: Arc<SaDb>,
    net: Arc<Network>,
    ctx: WorkerCtx,
    counters: WorkerCounters,
    ident: u16,
}

impl Pipeline {
    /// A pipeline over a shared SA database and network description.
    pub fn new(db: Arc<SaDb>, net: Arc<Network>, ctx: WorkerCtx) -> Self {
        Pipeline {
            db,
            net,
            ctx,
            counters: WorkerCounters::default(),
            ident: 0,
        }
    }

    /// What this worker counted.
    pub fn counters(&self) -> &WorkerCounters {
        &self.counters
    }

    /// The SA database.
    pub fn db(&self) -> &Arc<SaDb> {
        &self.db
    }

    /// Process frames received on `port`. `verdicts[i]` is set for `frames[i]`; a frame whose
    /// verdict is `TxWan`/`TxLan`/`ToHost` holds the bytes to send. `now_ns` is the data-plane
    /// clock (monotonic time, or the capture's timestamps in replay).
    pub fn process(
        &mut self,
        port: PortId,
        frames: &mut [Frame<'_>],
        verdicts: &mut [Verdict],
        now_ns: u64,
    ) {
        let n = frames.len().min(verdicts.len());
        for (f, v) in frames[..n]
            .chunks_mut(MAX_BURST)
            .zip(verdicts[..n].chunks_mut(MAX_BURST))
        {
            self.counters.bursts += 1;
            self.counters.burst_frames += f.len() as u64;
            let rx = match port {
                PortId::Wan => &mut self.counters.wan,
                PortId::Lan => &mut self.counters.lan,
                PortId::Host => &mut self.counters.from_host,
            };
            rx.rx_frames += f.len() as u64;
            rx.rx_bytes += f.iter().map(|x| x.len as u64).sum::<u64>();
            match port {
                _ if self.net.forward_only => self.forward_chunk(port, f, v),
                PortId::Wan => self.inbound_chunk(f, v, now_ns),
                PortId::Lan | PortId::Host => self.outbound_chunk(port, f, v, now_ns),
            }
            for (f, v) in f.iter().zip(v.iter()) {
                let c = match v {
                    Verdict::TxWan => &mut self.counters.wan,
                    Verdict::TxLan => &mut self.counters.lan,
                    Verdict::ToHost => &mut self.counters.to_host,
                    Verdict::Drop(r) => {
                        self.counters.drops.add(*r, 1);
                        continue;
                    }
                    Verdict::Fragment(_) => {
                        self.counters.prefragmented += 1;
                        continue;
                    }
                };
                c.tx_frames += 1;
                c.tx_bytes += f.len as u64;
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Plain forwarding (`mode = "forward"`).

    fn forward_chunk(&mut self, port: PortId, frames: &mut [Frame<'_>], verdicts: &mut [Verdict]) {
        let net = Arc::clone(&self.net);
        for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
            let mut l3 = L3::default();
            *v = match parse_frame(f.data(), &mut l3) {
                Err(r) => Verdict::Drop(r),
                Ok(false) => Verdict::ToHost,
                Ok(true) => {
                    let dst = l3.addrs(&f.data()[l3.eth_len()..]).1;
                    if net.is_ours(&dst) || is_multicast_or_link_local(&dst) {
                        Verdict::ToHost
                    } else {
                        clamp_mss_out(f, &l3, &net);
                        bypass(port != PortId::Host, f, l3, dst.ip(), &net)
                    }
                }
            };
        }
    }

    // -----------------------------------------------------------------------------------------
    // Outbound: LAN (forwarded) or host (locally originated) → WAN.

    fn outbound_chunk(
        &mut self,
        port: PortId,
        frames: &mut [Frame<'_>],
        verdicts: &mut [Verdict],
        now_ns: u64,
    ) {
        let guard = crossbeam_epoch::pin();
        let db = Arc::clone(&self.db);
        let net = Arc::clone(&self.net);
        let sink = db.event_sink();
        let Some(spd) = db.spd(&guard) else {
            verdicts.fill(Verdict::Drop(DropReason::NoPolicy));
            return;
        };
        let mut metas: ArrayVec<Meta<'_>, MAX_BURST> = ArrayVec::new();

        // 1. classify
        let mut sas = OutCache::new();
        let mut hops = HopCache::default();
        let mut memo = None;
        let mut tpls: ArrayVec<OuterTemplate, MAX_BURST> = ArrayVec::new();
        // The outer headers go into the cache lines in front of each frame, which nothing has
        // touched yet (a NIC writes from the frame start), and classifying starts with the
        // frame's first line: ask for all of them for every frame of the chunk now, so that
        // the misses overlap instead of stalling each packet in turn (a store to a line not in
        // the cache stalls the pipeline as surely as a load).
        prefetch_heads(frames, AlsoLine::Headroom);
        for f in frames.iter_mut() {
            metas.push(Meta::EMPTY);
            let Some(m) = metas.last_mut() else { break };
            if let Err(v) = classify_out(
                port, f, m, spd, &db, &net, &guard, &mut sas, &mut hops, &mut memo, &mut tpls,
            ) {
                m.finish(v);
            }
        }

        // 1b. DF packets too big for the tunnel: answer with ICMP instead of dropping silently.
        for (f, m) in frames.iter_mut().zip(metas.iter_mut()) {
            if m.pmtu != 0 && m.verdict == Verdict::Drop(DropReason::MtuExceeded) {
                match too_big_reply(f, m, &net) {
                    Some(v) => {
                        m.finish(v);
                        self.counters.icmp_sent += 1;
                    }
                    None => {
                        if let Some(sa) = m.sa {
                            sa.count_drop(DropReason::MtuExceeded, 1);
                        }
                    }
                }
                m.sa = None;
            }
        }

        // 2. reserve sequence numbers per run, enforcing hard limits per packet.
        let mut i = 0;
        while i < metas.len() {
            let Some(sa) = metas[i].sa.filter(|_| metas[i].todo == Todo::Seal) else {
                i += 1;
                continue;
            };
            let mut j = i;
            let mut pending = RunCounts::default();
            let mut wanted = 0u64;
            while j < metas.len() && metas[j].todo == Todo::Seal && same_sa(metas[j].sa, Some(sa)) {
                let bytes = u64::from(metas[j].bytes);
                if sa.is_dead()
                    || (sa.has_hard_limits() && !sa.within_hard_limits(&pending, bytes, now_ns))
                {
                    metas[j].finish(Verdict::Drop(DropReason::LifetimeExpired));
                    sa.count_drop(DropReason::LifetimeExpired, 1);
                } else {
                    pending.packets += 1;
                    pending.bytes += bytes;
                    wanted += 1;
                }
                j += 1;
            }
            if wanted > 0 {
                let (first, granted) = sa.reserve_seq(wanted, now_ns, &sink);
                let seal = metas[i..j].iter_mut().filter(|m| m.todo == Todo::Seal);
                for (k, m) in (0u64..).zip(seal) {
                    if k < granted {
                        m.seq = first + k;
                    } else {
                        m.finish(Verdict::Drop(DropReason::SeqExhausted));
                        sa.count_drop(DropReason::SeqExhausted, 1);
                    }
                }
            }
            i = j;
        }

        // 3. build headers and trailer in place.
        for (f, m) in frames.iter_mut().zip(metas.iter_mut()) {
            if m.todo == Todo::Seal
                && let Some(sa) = m.sa
            {
                self.ident = self.ident.wrapping_add(1);
                match (sa.mode, tpls.get(usize::from(m.tpl))) {
                    (Mode::Tunnel, Some(t)) => {
                        build_tunnel(f, m, sa, t, self.ident, port == PortId::Lan)
                    }
                    (Mode::Transport, _) => build_transport(f, m, sa, &net.wan),
                    // Every tunnel-mode frame got a template at classify (one per frame at most).
                    (Mode::Tunnel, None) => m.finish(Verdict::Drop(DropReason::Unsupported)),
                }
            }
        }

        // 4. crypto, one call per run of one SA.
        self.crypto(frames, &mut metas, Todo::Seal);

        // 5. finish and count.
        for (f, m) in frames.iter_mut().zip(metas.iter_mut()) {
            if m.todo != Todo::Seal {
                continue;
            }
            let Some(sa) = m.sa else { continue };
            if m.status != OpStatus::Ok {
                m.verdict = Verdict::Drop(DropReason::BadLength);
                sa.count_drop(DropReason::BadLength, 1);
                continue;
            }
            if sa.udp_encap && sa.local.is_ipv6() {
                fill_udp6_checksum(f, m);
            }
            m.verdict = Verdict::TxWan;
        }
        flush_runs(&metas, now_ns, &sink, |m| {
            (m.verdict == Verdict::TxWan).then_some((m.bytes, m.esp_len))
        });
        for (v, m) in verdicts.iter_mut().zip(metas.iter()) {
            *v = m.verdict;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Inbound: WAN → LAN (tunnel) or host (transport).

    fn inbound_chunk(&mut self, frames: &mut [Frame<'_>], verdicts: &mut [Verdict], now_ns: u64) {
        let guard = crossbeam_epoch::pin();
        let db = Arc::clone(&self.db);
        let net = Arc::clone(&self.net);
        let sink = db.event_sink();
        let mut metas: ArrayVec<Meta<'_>, MAX_BURST> = ArrayVec::new();

        prefetch_heads(frames, AlsoLine::WholeIfSmall);
        // 1. classify and look up, in passes over the burst, so that with many SAs the cache
        //    misses of different packets overlap instead of forming one chain per packet:
        //    (a) headers up to the SPI; (b) the SA lookups, back to back; (c) prefetch each new
        //    SA's state, key material and replay word; (d) the checks that read them.
        let mut parsed: ArrayVec<Option<InSpi>, MAX_BURST> = ArrayVec::new();
        for f in frames.iter() {
            metas.push(Meta::EMPTY);
            let Some(m) = metas.last_mut() else { break };
            let p = parse_in(f, m, &net).map_err(|v| m.finish(v)).ok();
            parsed.push(p);
        }
        let mut sas = SaCache::<(u32, FlowAddr)>::new();
        for (m, p) in metas.iter_mut().zip(parsed.iter()) {
            if let Some(p) = p {
                match lookup_in(p, &db, &guard, &mut sas, now_ns) {
                    Ok(sa) => m.sa = Some(sa),
                    Err(v) => m.finish(v),
                }
            }
        }
        let mut last: Option<&Sa> = None;
        for (m, p) in metas.iter().zip(parsed.iter()) {
            if let (Some(sa), Some(p)) = (m.sa, p)
                && !same_sa(Some(sa), last)
            {
                sa.prefetch_inbound(p.seq_low);
                last = Some(sa);
            }
        }
        for ((f, m), p) in frames.iter().zip(metas.iter_mut()).zip(parsed.iter()) {
            if let (Some(sa), Some(p)) = (m.sa, p)
                && let Err(v) = check_in(f, m, sa, p, now_ns)
            {
                m.sa = None;
                m.finish(v);
            }
        }

        // 2. crypto, one call per run of one SA.
        self.crypto(frames, &mut metas, Todo::Open);

        // 3. authenticated: now, and only now, the windows move, one call per run of one SA.
        let mut marks = [Ok(()); MAX_BURST];
        mark_runs(&metas, &mut marks);

        // 4. trailer, decapsulation.
        let mut hops = HopCache::default();
        for ((f, m), mark) in frames.iter_mut().zip(metas.iter_mut()).zip(marks) {
            if m.todo != Todo::Open {
                continue;
            }
            let Some(sa) = m.sa else { continue };
            if m.nat && m.status == OpStatus::Ok && mark.is_ok() {
                // Authenticated: the peer really is behind the new mapping now.
                let (src, sport) = outer_source(f, &m.l3);
                sa.note_source(src, sport, now_ns, &sink);
            }
            m.verdict = match finish_in(f, m, sa, mark, &net, &mut hops) {
                Ok(v) => v,
                Err(r) => {
                    sa.count_drop(r, 1);
                    Verdict::Drop(r)
                }
            };
        }
        flush_runs(&metas, now_ns, &sink, |m| {
            matches!(m.verdict, Verdict::TxLan | Verdict::ToHost).then_some((m.bytes, m.esp_len))
        });
        for (v, m) in verdicts.iter_mut().zip(metas.iter()) {
            *v = m.verdict;
        }
    }

    /// Run the crypto for every frame marked `todo`, one provider call per run of one SA.
    fn crypto(&mut self, frames: &mut [Frame<'_>], metas: &mut [Meta<'_>], todo: Todo) {
        let mut ops: ArrayVec<EspOp<'_>, MAX_BURST> = ArrayVec::new();
        let mut owners: ArrayVec<u8, MAX_BURST> = ArrayVec::new();
        for (i, (f, m)) in frames.iter_mut().zip(metas.iter()).enumerate() {
            if m.todo == todo {
                ops.push(EspOp {
                    esp: &mut f.buf[m.esp_range()],
                    seq: m.seq,
                    status: OpStatus::Pending,
                });
                // MAX_BURST fits a byte.
                owners.push(i as u8);
            }
        }
        let mut a = 0;
        while a < ops.len() {
            let sa = metas[usize::from(owners[a])].sa;
            let mut b = a + 1;
            while b < ops.len() && same_sa(metas[usize::from(owners[b])].sa, sa) {
                b += 1;
            }
            // The backend asks for each op's bytes one op ahead within the run; the first op
            // of the next run is asked for here, so that runs of one packet (many SAs) get the
            // same help.
            if let Some(next) = ops.get(b) {
                espgw_crypto::prefetch_op(next);
            }
            if let Some(sa) = sa {
                match todo {
                    Todo::Seal => sa.crypto.seal(&mut ops[a..b], &mut self.ctx),
                    _ => sa.crypto.open(&mut ops[a..b], &mut self.ctx),
                }
            }
            a = b;
        }
        for (op, i) in ops.iter().zip(owners.iter()) {
            metas[usize::from(*i)].status = op.status;
        }
    }
}

/// Mark the sequence numbers of authenticated packets in their SA's window, one
/// [`ReplayWindow::mark_run`](crate::antireplay::ReplayWindow::mark_run) per run of one SA.
fn mark_runs(metas: &[Meta<'_>], marks: &mut [Result<(), ReplayError>; MAX_BURST]) {
    let ok = |m: &Meta<'_>| m.todo == Todo::Open && m.status == OpStatus::Ok;
    let mut i = 0;
    while i < metas.len() {
        let Some(sa) = metas[i].sa.filter(|_| ok(&metas[i])) else {
            i += 1;
            continue;
        };
        let mut seqs: ArrayVec<u64, MAX_BURST> = ArrayVec::new();
        let mut at: ArrayVec<u8, MAX_BURST> = ArrayVec::new();
        let mut j = i;
        while j < metas.len() && (!ok(&metas[j]) || same_sa(metas[j].sa, Some(sa))) {
            if ok(&metas[j]) {
                seqs.push(metas[j].seq);
                // MAX_BURST fits a byte.
                at.push(j as u8);
            }
            j += 1;
        }
        let mut res = [Ok(()); MAX_BURST];
        sa.replay.mark_run(&seqs, &mut res[..seqs.len()]);
        for (k, r) in at.iter().zip(res) {
            marks[usize::from(*k)] = r;
        }
        i = j;
    }
}

/// Add each SA's successful packets to its counters, once per run of that SA.
fn flush_runs(
    metas: &[Meta<'_>],
    now_ns: u64,
    sink: &EventSink<'_>,
    ok: impl Fn(&Meta<'_>) -> Option<(u32, u32)>,
) {
    let mut run: Option<(&Sa, RunCounts)> = None;
    for m in metas {
        let Some(sa) = m.sa else { continue };
        if let Some((cur, counts)) = &run
            && !std::ptr::eq(*cur, sa)
        {
            cur.flush(counts, now_ns, sink);
            run = None;
        }
        let entry = run.get_or_insert((sa, RunCounts::default()));
        if let Some((bytes, wire)) = ok(m) {
            entry.1.packets += 1;
            entry.1.bytes += u64::from(bytes);
            entry.1.esp_bytes += u64::from(wire);
        }
    }
    if let Some((sa, counts)) = run {
        sa.flush(&counts, now_ns, sink);
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn classify_out<'g>(
    port: PortId,
    f: &mut Frame<'_>,
    m: &mut Meta<'g>,
    spd: &Spd,
    db: &'g SaDb,
    net: &Network,
    guard: &'g crossbeam_epoch::Guard,
    sas: &mut OutCache<'g>,
    hops: &mut HopCache,
    memo: &mut Option<(FlowTag, Decision)>,
    tpls: &mut ArrayVec<OuterTemplate, MAX_BURST>,
) -> Result<(), Verdict> {
    let data = f.data();
    let l3 = &mut m.l3;
    if port == PortId::Lan {
        let eth =
            ethernet::EthernetFrame::new_checked(data).map_err(|e| Verdict::Drop(wire_err(e)))?;
        if !eth.dst_addr().is_unicast() {
            return Err(Verdict::ToHost);
        }
    }
    if !parse_frame(data, l3).map_err(Verdict::Drop)? {
        return Err(Verdict::ToHost);
    }
    let ip = &data[l3.eth_len()..];
    // Bursts are mostly a few flows: the decision for the previous packet's flow is reused. The
    // memo is keyed on the raw header bytes that make up the selector view (equal bytes, equal
    // flow), so a repeated flow costs a compare instead of building a flow key.
    let tag = l3.flow_tag(ip);
    let decision = match *memo {
        Some((t, d)) if t == tag => d,
        _ => {
            let d = decide(port, &l3.flow(ip), spd, net);
            *memo = Some((tag, d));
            d
        }
    };
    let id = match decision {
        Decision::Verdict(v) => return Err(v),
        Decision::Bypass => {
            let dst = l3.addrs(ip).1.ip();
            clamp_mss_out(f, l3, net);
            return Err(bypass(port == PortId::Lan, f, *l3, dst, net));
        }
        Decision::Protect(id) => id,
    };
    clamp_mss_out(f, l3, net);
    let Some((sa, mac, tpl)) = sas.get(id, db, guard, net, hops, tpls) else {
        return Err(Verdict::Drop(DropReason::NoSa));
    };
    let drop = |r: DropReason| {
        sa.count_drop(r, 1);
        Verdict::Drop(r)
    };
    if sa.mode == Mode::Transport && port != PortId::Host {
        return Err(drop(DropReason::TransportNotLocal));
    }
    if port == PortId::Lan && sa.mode == Mode::Tunnel && l3.ttl <= 1 {
        return Err(drop(DropReason::TtlExceeded));
    }
    // Sizes: does the result fit the MTU and the buffer?
    let inner_len = l3.ip_len();
    let udp = if sa.udp_encap { udp::HEADER_LEN } else { 0 };
    let (front, payload) = match sa.mode {
        Mode::Tunnel => (
            if sa.local.is_ipv6() {
                ipv6::HEADER_LEN
            } else {
                ipv4::HEADER_LEN
            },
            inner_len,
        ),
        Mode::Transport => (
            usize::from(l3.keep),
            inner_len.saturating_sub(usize::from(l3.keep)),
        ),
    };
    let pad = esp::pad_len(payload, sa.pad_align);
    let esp_len = esp::HEADER_LEN + sa.iv_len + payload + pad + esp::TRAILER_FIXED_LEN + sa.icv_len;
    let outer_len = front + udp + esp_len;
    if outer_len > usize::from(net.wan.mtu) {
        // The largest inner packet whose ESP packet fits.
        let fixed = front + udp + esp::HEADER_LEN + sa.iv_len + sa.icv_len;
        let room = usize::from(net.wan.mtu).saturating_sub(fixed);
        let align = sa.pad_align.max(1);
        let fit = (room / align * align).saturating_sub(esp::TRAILER_FIXED_LEN);
        if sa.mode == Mode::Tunnel && !l3.v6() && !l3.df() {
            // May be fragmented: before encryption if configured (and the fragments can carry
            // data: a header with options is not split here).
            if net.prefragment && port != PortId::Host && l3.upper == ipv4::HEADER_LEN as u16 {
                let ip_max = fit.min(usize::from(u16::MAX));
                if ip_max >= ipv4::HEADER_LEN + 8 {
                    return Err(Verdict::Fragment(ip_max as u16));
                }
            }
        } else if port == PortId::Lan && sa.mode == Mode::Tunnel {
            // What the sender must use (PMTU discovery), sent back as an ICMP error. The SA is
            // charged with the drop only if no answer can be sent (step 1b).
            let floor = if l3.v6() { 1280 } else { 68 };
            m.pmtu = fit.clamp(floor, usize::from(u16::MAX)) as u16;
            m.sa = Some(sa);
            return Err(Verdict::Drop(DropReason::MtuExceeded));
        }
        return Err(drop(DropReason::MtuExceeded));
    }
    let eth_out = if net.wan.vlan.is_some() {
        ethernet::VLAN_HEADER_LEN
    } else {
        ethernet::HEADER_LEN
    };
    // Headroom: new headers end where the payload starts today.
    let payload_at = f.start + l3.eth_len() + (inner_len - payload);
    let head = eth_out + front + udp + esp::HEADER_LEN + sa.iv_len;
    let tail_end = payload_at + payload + pad + esp::TRAILER_FIXED_LEN + sa.icv_len;
    if payload_at < head
        || tail_end > f.buf.len()
        || outer_len > usize::from(u16::MAX)
        || tail_end > u32::MAX as usize
    {
        return Err(drop(DropReason::NoBufferSpace));
    }
    m.mac = mac.map_err(drop)?;
    m.tpl = tpl;
    m.sa = Some(sa);
    m.todo = Todo::Seal;
    // Bounded by the checks above (u16 lengths, buffer offsets within u32).
    m.esp_off = (payload_at - esp::HEADER_LEN - sa.iv_len) as u32;
    m.esp_len = esp_len as u32;
    m.bytes = inner_len as u32;
    Ok(())
}

/// A flow's identity in raw bytes (see [`L3::flow_tag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowTag {
    a: u128,
    b: u128,
    c: u64,
}

/// What the policy (and the LAN-side sanity checks) say about a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Verdict(Verdict),
    Bypass,
    Protect(SaId),
}

fn decide(port: PortId, key: &FlowKey, spd: &Spd, net: &Network) -> Decision {
    if port == PortId::Lan {
        if net.is_ours(&key.dst) || is_multicast_or_link_local(&key.dst) {
            return Decision::Verdict(Verdict::ToHost);
        }
        if net.is_ours(&key.src) {
            return Decision::Verdict(Verdict::Drop(DropReason::Martian));
        }
    }
    match spd.lookup(key) {
        (Action::Discard, None) => Decision::Verdict(Verdict::Drop(DropReason::NoPolicy)),
        (Action::Discard, Some(_)) => Decision::Verdict(Verdict::Drop(DropReason::PolicyDiscard)),
        (Action::Bypass, _) => Decision::Bypass,
        (Action::Protect(id), _) => Decision::Protect(id),
    }
}

/// `ip tcp adjust-mss` for a frame about to be forwarded.
#[inline]
fn clamp_mss_out(f: &mut Frame<'_>, l3: &L3, net: &Network) {
    if let Some(mss) = net.tcp_mss
        && l3.proto == protocol::TCP
    {
        let ip_at = f.start + l3.eth_len();
        if let Some(pkt) = f.buf.get_mut(ip_at..ip_at + l3.ip_len()) {
            icmp::clamp_mss(pkt, usize::from(l3.upper), mss);
        }
    }
}

/// Turn a LAN frame that does not fit the tunnel into the ICMP error for its sender, sent back
/// out of the LAN port to the MAC it came from.
fn too_big_reply(f: &mut Frame<'_>, m: &Meta<'_>, net: &Network) -> Option<Verdict> {
    let l3 = m.l3;
    let src_mac = ethernet::EthernetAddress(f.buf.get(f.start + 6..f.start + 12)?.try_into().ok()?);
    let ours = net
        .lan
        .addresses
        .iter()
        .map(|(a, _)| *a)
        .find(|a| a.is_ipv6() == l3.v6())?;
    let ip_at = f.start + l3.eth_len();
    let (at, len) = icmp::too_big(f.buf, ip_at, l3.ip_len(), l3.v6(), ours, u32::from(m.pmtu))?;
    f.start = at;
    rewrite_ethernet(f, 0, len, l3.v6(), src_mac, &net.lan).ok()?;
    Some(Verdict::TxLan)
}

/// Forward in the clear (a bypass policy): routed by destination, TTL decremented when
/// forwarding. Always returns the verdict (as the `Err` side of classification).
fn bypass(forwarded: bool, f: &mut Frame<'_>, l3: L3, dst: IpAddr, net: &Network) -> Verdict {
    let (out, mac) = match net.next_hops.route(dst) {
        Ok(x) => x,
        Err(r) => return Verdict::Drop(r),
    };
    let pc = if out == PortId::Wan {
        &net.wan
    } else {
        &net.lan
    };
    if l3.ip_len() > usize::from(pc.mtu) {
        return Verdict::Drop(DropReason::MtuExceeded);
    }
    let ip_at = f.start + l3.eth_len();
    if forwarded && !decrement_ttl(&mut f.buf[ip_at..ip_at + l3.ip_len()], l3.v6()) {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    if let Err(r) = rewrite_ethernet(f, l3.eth_len(), l3.ip_len(), l3.v6(), mac, pc) {
        return Verdict::Drop(r);
    }
    if out == PortId::Wan {
        Verdict::TxWan
    } else {
        Verdict::TxLan
    }
}

/// What `parse_in` found in front of an inbound ESP packet's SA lookup.
#[derive(Debug, Clone, Copy)]
struct InSpi {
    spi: u32,
    src: FlowAddr,
    dst: FlowAddr,
    /// UDP source and destination ports (0, 0 for plain ESP).
    ports: (u16, u16),
    esp_at: usize,
    esp_end: usize,
    /// The sequence number field (low 32 bits).
    seq_low: u32,
}

/// Inbound, first pass: the outer headers up to the SPI (no SA touched yet).
#[inline(always)]
fn parse_in(f: &Frame<'_>, m: &mut Meta<'_>, net: &Network) -> Result<InSpi, Verdict> {
    let data = f.data();
    let l3 = &mut m.l3;
    if !parse_frame(data, l3).map_err(Verdict::Drop)? {
        return Err(Verdict::ToHost);
    }
    let ip_at = l3.eth_len();
    let ip_end = ip_at + l3.ip_len();
    let (src, dst) = l3.addrs(&data[ip_at..]);
    if !net.is_wan_ours(&dst) {
        return Err(Verdict::ToHost);
    }
    let upper = ip_at + usize::from(l3.upper);
    let mut ports = (0u16, 0u16);
    let (esp_at, esp_end) = match l3.proto {
        protocol::ESP => {
            if l3.fragment() {
                return Err(Verdict::Drop(DropReason::OuterFragment));
            }
            (upper, ip_end)
        }
        protocol::UDP => {
            if l3.fragment() {
                // Could be a fragmented IKE message: the kernel reassembles it.
                return Err(Verdict::ToHost);
            }
            let u = udp::UdpPacket::new_checked(&data[upper..ip_end])
                .map_err(|e| Verdict::Drop(wire_err(e)))?;
            if u.dst_port() != net.encap_port {
                return Err(Verdict::ToHost);
            }
            match natt::classify(u.payload()).map_err(|e| Verdict::Drop(wire_err(e)))? {
                natt::UdpEncapPayload::Keepalive => {
                    return Err(Verdict::Drop(DropReason::NattKeepalive));
                }
                natt::UdpEncapPayload::NonEsp => return Err(Verdict::ToHost),
                natt::UdpEncapPayload::Esp => {}
            }
            ports = (u.src_port(), u.dst_port());
            (upper + udp::HEADER_LEN, upper + usize::from(u.len()))
        }
        _ => return Err(Verdict::ToHost),
    };
    let e = esp::EspPacket::new_checked(&data[esp_at..esp_end])
        .map_err(|e| Verdict::Drop(wire_err(e)))?;
    Ok(InSpi {
        spi: e.spi(),
        src,
        dst,
        ports,
        esp_at,
        esp_end,
        seq_low: e.sequence_number(),
    })
}

/// Inbound, second pass: the SA by SPI (and destination); an unknown SPI is reported.
#[inline(always)]
fn lookup_in<'g>(
    p: &InSpi,
    db: &'g SaDb,
    guard: &'g crossbeam_epoch::Guard,
    sas: &mut SaCache<'g, (u32, FlowAddr)>,
    now_ns: u64,
) -> Result<&'g Sa, Verdict> {
    let (spi, dst) = (p.spi, p.dst);
    match sas.get((spi, dst), || db.lookup_inbound(spi, dst.ip(), guard)) {
        Some(sa) => Ok(sa),
        None => {
            db.report_unknown_spi(UnknownSpi {
                at_ns: now_ns,
                spi,
                src: p.src.ip(),
                dst: dst.ip(),
                sport: p.ports.0,
                dport: p.ports.1,
            });
            Err(Verdict::Drop(DropReason::UnknownSpi))
        }
    }
}

/// Inbound, last pass before the crypto: limits, length, anti-replay, NAT mapping.
#[inline(always)]
fn check_in<'g>(
    f: &Frame<'_>,
    m: &mut Meta<'g>,
    sa: &'g Sa,
    p: &InSpi,
    now_ns: u64,
) -> Result<(), Verdict> {
    let drop = |r: DropReason| {
        sa.count_drop(r, 1);
        Verdict::Drop(r)
    };
    if sa.is_dead()
        || (sa.has_hard_limits() && !sa.within_hard_limits(&RunCounts::default(), 0, now_ns))
    {
        return Err(drop(DropReason::LifetimeExpired));
    }
    let (esp_at, esp_end, src, ports) = (p.esp_at, p.esp_end, p.src, p.ports);
    let esp_len = esp_end - esp_at;
    if esp_len < esp::HEADER_LEN + sa.iv_len + esp::TRAILER_FIXED_LEN + sa.icv_len {
        return Err(drop(DropReason::BadLength));
    }
    let seq = sa.replay.infer_seq(p.seq_low, sa.esn);
    if let Err(r) = sa.replay.check(seq) {
        return Err(drop(replay_reason(r)));
    }
    if sa.udp_encap {
        let peer = sa.peer();
        m.nat = peer.remote != src.ip() || peer.encap.is_some_and(|e| e.dport != ports.0);
    }
    m.sa = Some(sa);
    m.todo = Todo::Open;
    // A frame's offsets fit u32 (frames are at most 64 KiB into a buffer).
    m.esp_off = (f.start + esp_at) as u32;
    m.esp_len = esp_len as u32;
    m.seq = seq;
    Ok(())
}

fn replay_reason(r: ReplayError) -> DropReason {
    match r {
        ReplayError::Replay => DropReason::Replay,
        ReplayError::TooOld => DropReason::TooOld,
    }
}

/// The outer source address and UDP source port of a received ESP-in-UDP frame (before
/// decapsulation), from its parsed outer header.
fn outer_source(f: &Frame<'_>, l3: &L3) -> (IpAddr, u16) {
    let data = f.data();
    let ip_at = l3.eth_len();
    let (src, _) = l3.addrs(&data[ip_at..]);
    let at = ip_at + usize::from(l3.upper);
    let sport = data
        .get(at..at + 2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    (src.ip(), sport)
}

/// After `open`: replay window, trailer, decapsulation. Returns the verdict or a drop reason to
/// count on the SA.
#[inline(always)]
fn finish_in(
    f: &mut Frame<'_>,
    m: &mut Meta<'_>,
    sa: &Sa,
    mark: Result<(), ReplayError>,
    net: &Network,
    hops: &mut HopCache,
) -> Result<Verdict, DropReason> {
    match m.status {
        OpStatus::Ok => {}
        OpStatus::AuthFailed => return Err(DropReason::AuthFailed),
        _ => return Err(DropReason::BadLength),
    }
    // The window was updated for authenticated packets (`mark_runs`); a loser of a race between
    // workers, or a duplicate within the burst, is a replay.
    mark.map_err(replay_reason)?;
    let esp = m.esp_range();
    let plain_at = esp.start + esp::HEADER_LEN + sa.iv_len;
    let plain_end = esp.end - sa.icv_len;
    let t = esp::parse_trailer(&f.buf[plain_at..plain_end]).map_err(wire_err)?;
    if t.next_header == esp::NEXT_HEADER_NO_NEXT {
        return Err(DropReason::Dummy);
    }
    let outer = m.l3;
    match sa.mode {
        Mode::Tunnel => decap_tunnel(f, m, sa, &outer, t, plain_at, net, hops),
        Mode::Transport => decap_transport(f, m, sa, &outer, t, plain_at),
    }
}

#[allow(clippy::too_many_arguments)]
fn decap_tunnel(
    f: &mut Frame<'_>,
    m: &mut Meta<'_>,
    sa: &Sa,
    outer: &L3,
    t: esp::Trailer,
    at: usize,
    net: &Network,
    hops: &mut HopCache,
) -> Result<Verdict, DropReason> {
    let v6 = match t.next_header {
        protocol::IPIP => false,
        protocol::IPV6 => true,
        _ => return Err(DropReason::BadNextHeader),
    };
    let mut inner = L3::default();
    parse_ip(&f.buf[at..at + t.payload_len], 0, v6, &mut inner)?;
    // Anything after the inner packet is TFC padding (RFC 4303 §2.7).
    let inner_len = inner.ip_len();
    let pkt = &mut f.buf[at..at + inner_len];
    let key = inner.flow(pkt);
    if !sa.selectors.is_empty() && !sa.selectors.iter().any(|s| s.matches(&key)) {
        return Err(DropReason::SelectorMismatch);
    }
    if let Some(mss) = net.tcp_mss
        && inner.proto == protocol::TCP
    {
        icmp::clamp_mss(pkt, usize::from(inner.upper), mss);
    }
    if sa.ecn == EcnMode::Normal {
        let new = ecn::decap(outer.ecn(), inner.ecn()).ok_or(DropReason::EcnDrop)?;
        if new != inner.ecn() {
            set_ecn(pkt, v6, new);
        }
    }
    if !decrement_ttl(pkt, v6) {
        return Err(DropReason::TtlExceeded);
    }
    if inner_len > usize::from(net.lan.mtu) {
        return Err(DropReason::MtuExceeded);
    }
    let mac = hops.resolve(net, PortId::Lan, key.dst.ip())?;
    let eth_len = if net.lan.vlan.is_some() {
        ethernet::VLAN_HEADER_LEN
    } else {
        ethernet::HEADER_LEN
    };
    let eth_at = at.checked_sub(eth_len).ok_or(DropReason::NoBufferSpace)?;
    let ethertype = if v6 {
        ethernet::ethertype::IPV6
    } else {
        ethernet::ethertype::IPV4
    };
    ethernet::emit_header(
        &mut f.buf[eth_at..at],
        mac,
        net.lan.mac,
        net.lan.vlan,
        ethertype,
    )
    .map_err(wire_err)?;
    f.start = eth_at;
    f.len = eth_len + inner_len;
    m.bytes = inner_len as u32;
    Ok(Verdict::TxLan)
}

fn decap_transport(
    f: &mut Frame<'_>,
    m: &mut Meta<'_>,
    sa: &Sa,
    outer: &L3,
    t: esp::Trailer,
    at: usize,
) -> Result<Verdict, DropReason> {
    // The header part that stays: everything in front of the UDP/ESP headers. For IPv6 that is
    // the fixed header plus the extension headers in front of ESP; a Destination Options header
    // in front of ESP is legal but rare and not handled.
    let keep = usize::from(outer.upper);
    if outer.v6() && outer.keep != outer.upper {
        return Err(DropReason::Unsupported);
    }
    let v6 = outer.v6();
    let ip_at = f.start + outer.eth_len();
    let shift = at - (ip_at + keep);
    // Move Ethernet + kept IP header forward so they sit right before the payload.
    f.buf.copy_within(f.start..ip_at + keep, f.start + shift);
    f.start += shift;
    let ip_at = ip_at + shift;
    let total = keep + t.payload_len;
    f.len = outer.eth_len() + total;
    let pkt = &mut f.buf[ip_at..ip_at + total];
    pkt[usize::from(outer.nh_field)] = t.next_header;
    if v6 {
        let mut p = ipv6::Ipv6Packet::new_unchecked(&mut *pkt);
        p.set_payload_len((total - ipv6::HEADER_LEN) as u16);
    } else {
        let mut p = ipv4::Ipv4Packet::new_unchecked(&mut *pkt);
        p.set_total_len(total as u16);
        p.fill_checksum();
    }
    // RFC 3948 §3.1.2: behind a NAT the peer computed TCP/UDP checksums over addresses that
    // changed on the way; the payload is authenticated, so recompute them.
    if sa.udp_encap {
        fix_l4_checksum(pkt, v6, keep, t.next_header);
    }
    let mut inner = L3::default();
    parse_ip(pkt, 0, v6, &mut inner)?;
    if !sa.selectors.is_empty() {
        let key = inner.flow(pkt);
        if !sa.selectors.iter().any(|s| s.matches(&key)) {
            return Err(DropReason::SelectorMismatch);
        }
    }
    m.bytes = total as u32;
    Ok(Verdict::ToHost)
}

fn fix_l4_checksum(pkt: &mut [u8], v6: bool, l4_at: usize, proto: u8) {
    let off = match proto {
        protocol::TCP => 16,
        protocol::UDP => 6,
        _ => return,
    };
    let len = pkt.len() - l4_at;
    if len < off + 2 {
        return;
    }
    if proto == protocol::UDP && !v6 && pkt[l4_at + 6] == 0 && pkt[l4_at + 7] == 0 {
        return; // IPv4 UDP without checksum stays so.
    }
    pkt[l4_at + off] = 0;
    pkt[l4_at + off + 1] = 0;
    let pseudo = if v6 {
        let p = ipv6::Ipv6Packet::new_unchecked(&*pkt);
        checksum::pseudo_header_v6(&p.src_addr(), &p.dst_addr(), proto, len as u32)
    } else {
        let p = ipv4::Ipv4Packet::new_unchecked(&*pkt);
        checksum::pseudo_header_v4(&p.src_addr(), &p.dst_addr(), proto, len as u32)
    };
    let mut c = !checksum::combine(&[pseudo, checksum::sum(&pkt[l4_at..])]);
    if c == 0 && proto == protocol::UDP {
        c = 0xFFFF;
    }
    pkt[l4_at + off..l4_at + off + 2].copy_from_slice(&c.to_be_bytes());
}

fn set_ecn(pkt: &mut [u8], v6: bool, value: u8) {
    if v6 {
        ipv6::Ipv6Packet::new_unchecked(pkt).set_ecn(value);
    } else {
        ipv4::Ipv4Packet::new_unchecked(pkt).set_ecn_update_checksum(value);
    }
}

#[inline(always)]
fn decrement_ttl(pkt: &mut [u8], v6: bool) -> bool {
    if v6 {
        pkt.first_chunk_mut::<{ ipv6::HEADER_LEN }>()
            .is_some_and(|h| ipv6::Ipv6Packet::new_unchecked(h).decrement_hop_limit())
    } else {
        pkt.first_chunk_mut::<{ ipv4::HEADER_LEN }>()
            .is_some_and(|h| ipv4::Ipv4Packet::new_unchecked(h).decrement_ttl())
    }
}

/// Replace the Ethernet header of a frame carrying an IP packet of `ip_len` bytes.
fn rewrite_ethernet(
    f: &mut Frame<'_>,
    old_eth: usize,
    ip_len: usize,
    v6: bool,
    mac: ethernet::EthernetAddress,
    port: &PortConfig,
) -> Result<(), DropReason> {
    let ip_at = f.start + old_eth;
    let eth_len = if port.vlan.is_some() {
        ethernet::VLAN_HEADER_LEN
    } else {
        ethernet::HEADER_LEN
    };
    let at = ip_at
        .checked_sub(eth_len)
        .ok_or(DropReason::NoBufferSpace)?;
    let ethertype = if v6 {
        ethernet::ethertype::IPV6
    } else {
        ethernet::ethertype::IPV4
    };
    ethernet::emit_header(&mut f.buf[at..ip_at], mac, port.mac, port.vlan, ethertype)
        .map_err(wire_err)?;
    f.start = at;
    f.len = eth_len + ip_len;
    Ok(())
}

/// The outer headers of one tunnel-mode SA's packets, built once per chunk (per run of that SA):
/// Ethernet (next hop, port MAC, VLAN), outer IPv4/IPv6 and UDP, right-aligned in `bytes` so
/// that one fixed-size copy ending at the ESP header lays them down; the per-packet fields
/// (lengths, identification, DSCP/ECN, DF, checksum) are patched after the copy.
#[derive(Debug, Clone, Copy)]
struct OuterTemplate {
    bytes: [u8; OuterTemplate::MAX],
    /// Length of the headers (the last `len` bytes of `bytes`).
    len: u8,
    /// Offset of the IP header from the start of the headers.
    ip_at: u8,
    v6: bool,
    udp: bool,
    /// IPv4: one's-complement sum of the header words that are the same for every packet.
    sum: u32,
}

impl OuterTemplate {
    const MAX: usize = ethernet::VLAN_HEADER_LEN + ipv6::HEADER_LEN + udp::HEADER_LEN;
    /// Headers up to this long (Ethernet with or without a VLAN tag, IPv4, UDP) are laid down
    /// with one fixed-size copy of this many bytes.
    const SHORT: usize = ethernet::VLAN_HEADER_LEN + ipv4::HEADER_LEN + udp::HEADER_LEN;

    fn new(sa: &Sa, peer: &Peer, mac: ethernet::EthernetAddress, wan: &PortConfig) -> Self {
        let eth_len = if wan.vlan.is_some() {
            ethernet::VLAN_HEADER_LEN
        } else {
            ethernet::HEADER_LEN
        };
        let v6 = peer.remote.is_ipv6();
        let ip_len = if v6 {
            ipv6::HEADER_LEN
        } else {
            ipv4::HEADER_LEN
        };
        let udp = peer.encap.is_some();
        let len = eth_len + ip_len + if udp { udp::HEADER_LEN } else { 0 };
        let mut t = OuterTemplate {
            bytes: [0; Self::MAX],
            len: len as u8,
            ip_at: eth_len as u8,
            v6,
            udp,
            sum: 0,
        };
        let h = &mut t.bytes[Self::MAX - len..];
        let ethertype = if v6 {
            ethernet::ethertype::IPV6
        } else {
            ethernet::ethertype::IPV4
        };
        let _ = ethernet::emit_header(h, mac, wan.mac, wan.vlan, ethertype);
        let next = if udp { protocol::UDP } else { protocol::ESP };
        match (sa.local, peer.remote) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ip = ipv4::Ipv4Header {
                    src,
                    dst,
                    protocol: next,
                    ttl: sa.outer_ttl,
                    dscp: 0,
                    ecn: 0,
                    dont_frag: false,
                    ident: 0,
                    payload_len: 0,
                };
                let _ = ipv4::emit_header(&mut h[eth_len..], &ip);
                // Constant words: version/IHL, TTL/protocol, addresses (TOS, lengths,
                // identification and flags are added per packet).
                let w = |b: &[u8]| u32::from(u16::from_be_bytes([b[0], b[1]]));
                let c = &h[eth_len..eth_len + ipv4::HEADER_LEN];
                t.sum = (u32::from(c[0]) << 8)
                    + w(&c[8..])
                    + w(&c[12..])
                    + w(&c[14..])
                    + w(&c[16..])
                    + w(&c[18..]);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ip = ipv6::Ipv6Header {
                    src,
                    dst,
                    next_header: next,
                    hop_limit: sa.outer_ttl,
                    traffic_class: 0,
                    flow_label: 0,
                    payload_len: 0,
                };
                let _ = ipv6::emit_header(&mut h[eth_len..], &ip);
            }
            // Configuration guarantees one family for both outer addresses.
            _ => {}
        }
        if let Some(e) = peer.encap {
            let _ = udp::emit_header(
                &mut h[eth_len + ip_len..],
                e.sport,
                e.dport,
                udp::HEADER_LEN as u16,
            );
        }
        t
    }
}

/// The default padding bytes for up to 15 bytes of padding, written as one fixed-size copy.
const PAD16: [u8; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

/// Write ESP header, trailer, UDP, outer IP and Ethernet around an inner packet (tunnel mode).
#[inline(always)]
fn build_tunnel(
    f: &mut Frame<'_>,
    m: &mut Meta<'_>,
    sa: &Sa,
    t: &OuterTemplate,
    ident: u16,
    forwarded: bool,
) {
    let l3 = m.l3;
    let inner_at = f.start + l3.eth_len();
    let inner_len = l3.ip_len();
    if forwarded {
        // Router semantics: the inner packet crosses this hop. (Checked > 1 at classify.)
        decrement_ttl(&mut f.buf[inner_at..inner_at + inner_len], l3.v6());
    }
    let nh = if l3.v6() {
        protocol::IPV6
    } else {
        protocol::IPIP
    };
    let esp_off = m.esp_off as usize;
    let esp_end = esp_off + m.esp_len as usize;
    let tail = inner_at + inner_len;
    let pad = esp::pad_len(inner_len, sa.pad_align);
    // The trailer. Up to 15 bytes of padding: one 16-byte copy (it runs into the ICV space, which
    // the crypto overwrites; classify checked the room).
    if pad < PAD16.len() && tail + PAD16.len() <= esp_end {
        f.buf[tail..tail + PAD16.len()].copy_from_slice(&PAD16);
        f.buf[tail + pad] = pad as u8;
        f.buf[tail + pad + 1] = nh;
    } else {
        let _ = esp::write_trailer(&mut f.buf[tail..tail + pad + 2], pad, nh);
    }
    write_esp_header(f.buf, esp_off, sa.spi, m.seq);

    // Outer headers from the template, then the per-packet fields.
    let len = usize::from(t.len);
    let start = esp_off - len;
    if len <= OuterTemplate::SHORT && esp_off >= OuterTemplate::SHORT {
        // Ethernet + IPv4 (+ UDP): one fixed-size copy, no call to memcpy. The bytes in front
        // of `start` are headroom; the block is no longer than it must be, because a store to
        // a line the frame does not otherwise use costs a cache miss.
        f.buf[esp_off - OuterTemplate::SHORT..esp_off]
            .copy_from_slice(&t.bytes[OuterTemplate::MAX - OuterTemplate::SHORT..]);
    } else {
        f.buf[start..esp_off].copy_from_slice(&t.bytes[OuterTemplate::MAX - len..]);
    }
    let dscp = match sa.dscp {
        DscpMode::Copy => l3.dscp(),
        DscpMode::Set(v) => v,
    };
    let ecn_out = match sa.ecn {
        EcnMode::Normal => ecn::encap(l3.ecn()),
        EcnMode::Compat => ecn::NOT_ECT,
    };
    let tos = (dscp << 2) | ecn_out;
    let ip_at = start + usize::from(t.ip_at);
    let payload_len = (esp_end - ip_at) as u16
        - if t.v6 {
            ipv6::HEADER_LEN as u16
        } else {
            ipv4::HEADER_LEN as u16
        };
    if t.udp {
        let u = esp_off - udp::HEADER_LEN;
        f.buf[u + 4..u + 6].copy_from_slice(&((esp_end - u) as u16).to_be_bytes());
    }
    if t.v6 {
        if let Some(h) = f.buf[ip_at..].first_chunk_mut::<{ ipv6::HEADER_LEN }>() {
            let vtf = 0x6000_0000u32 | (u32::from(tos) << 20);
            h[..4].copy_from_slice(&vtf.to_be_bytes());
            h[4..6].copy_from_slice(&payload_len.to_be_bytes());
        }
    } else if let Some(h) = f.buf[ip_at..].first_chunk_mut::<{ ipv4::HEADER_LEN }>() {
        let df = match sa.df {
            DfMode::Copy => l3.df(),
            DfMode::Set => true,
            DfMode::Clear => false,
        };
        let total = payload_len + ipv4::HEADER_LEN as u16;
        let flags: u16 = if df { 0x4000 } else { 0 };
        let mut sum =
            t.sum + u32::from(tos) + u32::from(total) + u32::from(ident) + u32::from(flags);
        sum = (sum & 0xFFFF) + (sum >> 16);
        sum = (sum & 0xFFFF) + (sum >> 16);
        h[1] = tos;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&ident.to_be_bytes());
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    f.start = start;
    f.len = esp_end - start;
}

/// Insert UDP/ESP between an IP header and its payload (transport mode).
fn build_transport(f: &mut Frame<'_>, m: &mut Meta<'_>, sa: &Sa, wan: &PortConfig) {
    let l3 = m.l3;
    let old_ip = f.start + l3.eth_len();
    let keep = usize::from(l3.keep);
    let nh_field = usize::from(l3.nh_field);
    let payload_at = old_ip + keep;
    let payload_len = l3.ip_len() - keep;
    let esp_off = m.esp_off as usize;
    let esp_len = m.esp_len as usize;
    let udp_len = if sa.udp_encap { udp::HEADER_LEN } else { 0 };
    let ip_at = esp_off - udp_len - keep;
    f.buf.copy_within(old_ip..old_ip + keep, ip_at);
    let nh = f.buf[ip_at + nh_field];
    f.buf[ip_at + nh_field] = if sa.udp_encap {
        protocol::UDP
    } else {
        protocol::ESP
    };
    let tail = payload_at + payload_len;
    let pad = esp::pad_len(payload_len, sa.pad_align);
    let _ = esp::write_trailer(&mut f.buf[tail..tail + pad + 2], pad, nh);
    write_esp_header(f.buf, esp_off, sa.spi, m.seq);
    if let Some(e) = sa.peer().encap {
        let at = esp_off - udp::HEADER_LEN;
        let _ = udp::emit_header(
            &mut f.buf[at..esp_off],
            e.sport,
            e.dport,
            (udp_len + esp_len) as u16,
        );
    }
    let total = keep + udp_len + esp_len;
    let pkt = &mut f.buf[ip_at..ip_at + total];
    if l3.v6() {
        ipv6::Ipv6Packet::new_unchecked(pkt).set_payload_len((total - ipv6::HEADER_LEN) as u16);
    } else {
        let mut p = ipv4::Ipv4Packet::new_unchecked(pkt);
        p.set_total_len(total as u16);
        p.fill_checksum();
    }
    finish_outer(f, m, ip_at, l3.v6(), wan);
}

#[inline(always)]
fn write_esp_header(buf: &mut [u8], at: usize, spi: u32, seq: u64) {
    let mut h = [0u8; esp::HEADER_LEN];
    h[..4].copy_from_slice(&spi.to_be_bytes());
    h[4..].copy_from_slice(&(seq as u32).to_be_bytes());
    buf[at..at + esp::HEADER_LEN].copy_from_slice(&h);
}

/// Ethernet header in front of the outer IP header; set the frame's new extent.
#[inline(always)]
fn finish_outer(f: &mut Frame<'_>, m: &Meta<'_>, ip_at: usize, v6: bool, wan: &PortConfig) {
    let eth_len = if wan.vlan.is_some() {
        ethernet::VLAN_HEADER_LEN
    } else {
        ethernet::HEADER_LEN
    };
    let at = ip_at - eth_len;
    let ethertype = if v6 {
        ethernet::ethertype::IPV6
    } else {
        ethernet::ethertype::IPV4
    };
    let _ = ethernet::emit_header(&mut f.buf[at..ip_at], m.mac, wan.mac, wan.vlan, ethertype);
    f.start = at;
    f.len = m.esp_range().end - at;
}

/// UDP checksum of an IPv6 ESP-in-UDP packet (mandatory over IPv6, RFC 8200 §8.1); after the
/// crypto because it covers the ciphertext.
/// The UDP checksum of an ESP-in-UDP packet we built over IPv6 (mandatory there), over the
/// addresses in the packet's own outer header (what was sent, whatever an update did since).
fn fill_udp6_checksum(f: &mut Frame<'_>, m: &Meta<'_>) {
    let Ok(eth) = ethernet::EthernetFrame::new_checked(f.data()) else {
        return;
    };
    let ip = f.start + eth.header_len();
    let Some(h) = f.buf.get(ip..ip + ipv6::HEADER_LEN) else {
        return;
    };
    let addr = |at: usize| {
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[at..at + 16]);
        Ipv6Addr::from(b)
    };
    let (s, d) = (addr(8), addr(24));
    let esp = m.esp_range();
    let at = esp.start - udp::HEADER_LEN;
    let mut u = udp::UdpPacket::new_unchecked(&mut f.buf[at..esp.end]);
    u.fill_checksum_v6(&s, &d);
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
