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

use crate::config::{PortConfig, PortId};
use crate::counters::{DropReason, WorkerCounters};
use crate::nexthop::NextHops;
use crate::policy::{Action, FlowAddr, FlowKey};
use crate::sa::{DfMode, DscpMode, EcnMode, EventSink, Mode, RunCounts, Sa};
use crate::sadb::SaDb;
use arrayvec::ArrayVec;
use espgw_crypto::{EspOp, OpStatus, WorkerCtx};
use espgw_wire::ip::{ecn, protocol};
use espgw_wire::{checksum, esp, ethernet, ipv4, ipv6, natt, udp};
use std::net::IpAddr;
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
}

impl Network {
    fn is_ours(&self, a: &IpAddr) -> bool {
        self.wan.is_local(a) || self.lan.is_local(a)
    }
}

/// Parsed outer view of a received frame (offsets relative to the frame start).
#[derive(Debug, Clone, Copy)]
struct L3 {
    eth_len: usize,
    v6: bool,
    /// Length of the IP packet (without Ethernet padding).
    ip_len: usize,
    /// Bytes kept in front of an ESP header in transport mode (IPv4 header with options; IPv6
    /// fixed header plus the extension headers that stay in front).
    keep: usize,
    /// Offset (from the IP header) of the next-header byte naming what follows `keep`.
    nh_field: usize,
    /// Offset (from the IP header) of the upper-layer header.
    upper: usize,
    proto: u8,
    fragment: bool,
    later_fragment: bool,
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    dscp: u8,
    ecn: u8,
    df: bool,
}

impl L3 {
    fn flow(&self, data: &[u8]) -> FlowKey {
        let ports = if self.later_fragment {
            None
        } else {
            let ip = self.eth_len;
            data.get(ip + self.upper..ip + self.ip_len)
                .and_then(|l4| espgw_wire::ip::l4_ports(self.proto, l4))
        };
        FlowKey {
            src: FlowAddr::from(self.src),
            dst: FlowAddr::from(self.dst),
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

/// Parse an IP packet starting at `data[0]`.
fn parse_ip(data: &[u8], eth_len: usize, v6: bool) -> Result<L3, DropReason> {
    if !v6 {
        let p = ipv4::Ipv4Packet::new_checked(data).map_err(wire_err)?;
        let hl = p.header_len();
        Ok(L3 {
            eth_len,
            v6,
            ip_len: usize::from(p.total_len()),
            keep: hl,
            nh_field: 9,
            upper: hl,
            proto: p.next_header(),
            fragment: p.is_fragment(),
            later_fragment: p.frag_offset() != 0,
            src: IpAddr::V4(p.src_addr()),
            dst: IpAddr::V4(p.dst_addr()),
            ttl: p.ttl(),
            dscp: p.dscp(),
            ecn: p.ecn(),
            df: p.dont_frag(),
        })
    } else {
        let p = ipv6::Ipv6Packet::new_checked(data).map_err(wire_err)?;
        let ext = p.walk_ext_headers().map_err(wire_err)?;
        Ok(L3 {
            eth_len,
            v6,
            ip_len: ipv6::HEADER_LEN + usize::from(p.payload_len()),
            keep: ext.esp_insert_offset,
            nh_field: ext.esp_insert_nh_field,
            upper: ext.upper_offset,
            proto: ext.upper_protocol,
            fragment: ext.fragment.is_some(),
            later_fragment: ext.fragment.is_some_and(|f| f.offset_bytes != 0),
            src: IpAddr::V6(p.src_addr()),
            dst: IpAddr::V6(p.dst_addr()),
            ttl: p.hop_limit(),
            dscp: p.dscp(),
            ecn: p.ecn(),
            df: true,
        })
    }
}

/// Parse an Ethernet frame carrying IP. `Ok(None)`: not IP (ARP, ...).
fn parse_frame(data: &[u8]) -> Result<Option<L3>, DropReason> {
    let eth = ethernet::EthernetFrame::new_checked(data).map_err(wire_err)?;
    let v6 = match eth.ethertype() {
        ethernet::ethertype::IPV4 => false,
        ethernet::ethertype::IPV6 => true,
        _ => return Ok(None),
    };
    let eth_len = eth.header_len();
    parse_ip(&data[eth_len..], eth_len, v6).map(Some)
}

fn is_multicast_or_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local(),
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
    verdict: Verdict,
    todo: Todo,
    sa: Option<&'g Sa>,
    l3: Option<L3>,
    /// Absolute offset of the ESP header in the buffer, and length through the ICV.
    esp_off: usize,
    esp_len: usize,
    seq: u64,
    status: OpStatus,
    /// Outbound: next-hop MAC (resolved once per SA run).
    mac: ethernet::EthernetAddress,
    /// Plaintext IP bytes for the counters.
    bytes: usize,
}

impl<'g> Meta<'g> {
    fn done(v: Verdict) -> Self {
        Meta {
            verdict: v,
            todo: Todo::Done,
            sa: None,
            l3: None,
            esp_off: 0,
            esp_len: 0,
            seq: 0,
            status: OpStatus::Pending,
            mac: ethernet::EthernetAddress([0; 6]),
            bytes: 0,
        }
    }
}

fn same_sa(a: Option<&Sa>, b: Option<&Sa>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
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
                };
                c.tx_frames += 1;
                c.tx_bytes += f.len as u64;
            }
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
        let mut last: Option<(crate::sa::SaId, Option<&Sa>)> = None;
        for f in frames.iter_mut() {
            let m = match self.classify_out(port, f, spd, &db, &net, &guard, &mut last, now_ns) {
                Ok(m) => m,
                Err(v) => Meta::done(v),
            };
            metas.push(m);
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
                let bytes = metas[j].bytes as u64;
                if sa.is_dead() || !sa.within_hard_limits(&pending, bytes, now_ns) {
                    metas[j] = Meta {
                        todo: Todo::Done,
                        verdict: Verdict::Drop(DropReason::LifetimeExpired),
                        ..metas[j]
                    };
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
                        m.todo = Todo::Done;
                        m.verdict = Verdict::Drop(DropReason::SeqExhausted);
                        sa.count_drop(DropReason::SeqExhausted, 1);
                    }
                }
            }
            i = j;
        }

        // 3. build headers and trailer in place.
        for (f, m) in frames.iter_mut().zip(metas.iter_mut()) {
            if m.todo == Todo::Seal
                && let (Some(sa), Some(l3)) = (m.sa, m.l3)
            {
                self.ident = self.ident.wrapping_add(1);
                match sa.mode {
                    Mode::Tunnel => {
                        build_tunnel(f, m, sa, &l3, &net.wan, self.ident, port == PortId::Lan)
                    }
                    Mode::Transport => build_transport(f, m, sa, &l3, &net.wan),
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
            if m.status != OpStatus::Ok {
                m.verdict = Verdict::Drop(DropReason::BadLength);
                if let Some(sa) = m.sa {
                    sa.count_drop(DropReason::BadLength, 1);
                }
                continue;
            }
            if let (Some(sa), Some(l3)) = (m.sa, m.l3)
                && sa.encap.is_some()
                && sa.remote.is_ipv6()
            {
                fill_udp6_checksum(f, m, sa, &l3);
            }
            m.verdict = Verdict::TxWan;
        }
        flush_runs(&metas, Todo::Seal, now_ns, &sink, |m| {
            (m.verdict == Verdict::TxWan).then_some((m.bytes, m.esp_len))
        });
        for (v, m) in verdicts.iter_mut().zip(metas.iter()) {
            *v = m.verdict;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn classify_out<'g>(
        &mut self,
        port: PortId,
        f: &mut Frame<'_>,
        spd: &crate::policy::Spd,
        db: &'g SaDb,
        net: &Network,
        guard: &'g crossbeam_epoch::Guard,
        last: &mut Option<(crate::sa::SaId, Option<&'g Sa>)>,
        _now_ns: u64,
    ) -> Result<Meta<'g>, Verdict> {
        let data = f.data();
        let eth =
            ethernet::EthernetFrame::new_checked(data).map_err(|e| Verdict::Drop(wire_err(e)))?;
        if port == PortId::Lan && !eth.dst_addr().is_unicast() {
            return Err(Verdict::ToHost);
        }
        let Some(l3) = parse_frame(data).map_err(Verdict::Drop)? else {
            return Err(Verdict::ToHost);
        };
        if port == PortId::Lan && (net.is_ours(&l3.dst) || is_multicast_or_link_local(&l3.dst)) {
            return Err(Verdict::ToHost);
        }
        let key = l3.flow(data);
        let (action, matched) = spd.lookup(&key);
        let id = match action {
            Action::Discard if matched.is_none() => {
                return Err(Verdict::Drop(DropReason::NoPolicy));
            }
            Action::Discard => return Err(Verdict::Drop(DropReason::PolicyDiscard)),
            Action::Bypass => return self.bypass(port, f, &l3, net),
            Action::Protect(id) => id,
        };
        let sa = match *last {
            Some((lid, sa)) if lid == id => sa,
            _ => {
                let sa = db.get(id, guard);
                *last = Some((id, sa));
                sa
            }
        };
        let Some(sa) = sa else {
            return Err(Verdict::Drop(DropReason::NoSa));
        };
        if sa.mode == Mode::Transport && port != PortId::Host {
            sa.count_drop(DropReason::TransportNotLocal, 1);
            return Err(Verdict::Drop(DropReason::TransportNotLocal));
        }
        if port == PortId::Lan && sa.mode == Mode::Tunnel && l3.ttl <= 1 {
            return Err(Verdict::Drop(DropReason::TtlExceeded));
        }
        // Sizes: does the result fit the MTU and the buffer?
        let inner_len = l3.ip_len;
        let udp = if sa.encap.is_some() {
            udp::HEADER_LEN
        } else {
            0
        };
        let (front, payload) = match sa.mode {
            Mode::Tunnel => (
                if sa.remote.is_ipv6() {
                    ipv6::HEADER_LEN
                } else {
                    ipv4::HEADER_LEN
                },
                inner_len,
            ),
            Mode::Transport => (l3.keep, inner_len.saturating_sub(l3.keep)),
        };
        let pad = esp::pad_len(payload, sa.block_align);
        let esp_len =
            esp::HEADER_LEN + sa.iv_len + payload + pad + esp::TRAILER_FIXED_LEN + sa.icv_len;
        let outer_len = front + udp + esp_len;
        if outer_len > usize::from(net.wan.mtu) {
            return Err(Verdict::Drop(DropReason::MtuExceeded));
        }
        let eth_out = if net.wan.vlan.is_some() {
            ethernet::VLAN_HEADER_LEN
        } else {
            ethernet::HEADER_LEN
        };
        // Headroom: new headers end where the payload starts today.
        let payload_at = f.start + l3.eth_len + (inner_len - payload);
        let head = eth_out + front + udp + esp::HEADER_LEN + sa.iv_len;
        let tail_end = payload_at + payload + pad + esp::TRAILER_FIXED_LEN + sa.icv_len;
        if payload_at < head || tail_end > f.buf.len() || outer_len > usize::from(u16::MAX) {
            sa.count_drop(DropReason::NoBufferSpace, 1);
            return Err(Verdict::Drop(DropReason::NoBufferSpace));
        }
        let mac = net.next_hops.resolve(PortId::Wan, sa.remote).map_err(|r| {
            sa.count_drop(r, 1);
            Verdict::Drop(r)
        })?;
        Ok(Meta {
            verdict: Verdict::Drop(DropReason::Unsupported),
            todo: Todo::Seal,
            sa: Some(sa),
            l3: Some(l3),
            esp_off: payload_at - esp::HEADER_LEN - sa.iv_len,
            esp_len,
            seq: 0,
            status: OpStatus::Pending,
            mac,
            bytes: inner_len,
        })
    }

    fn bypass<'g>(
        &mut self,
        port: PortId,
        f: &mut Frame<'_>,
        l3: &L3,
        net: &Network,
    ) -> Result<Meta<'g>, Verdict> {
        let (out, mac) = if port == PortId::Host {
            net.next_hops.route(l3.dst).map_err(Verdict::Drop)?
        } else {
            (
                PortId::Wan,
                net.next_hops
                    .resolve(PortId::Wan, l3.dst)
                    .map_err(Verdict::Drop)?,
            )
        };
        let pc = if out == PortId::Wan {
            &net.wan
        } else {
            &net.lan
        };
        if l3.ip_len > usize::from(pc.mtu) {
            return Err(Verdict::Drop(DropReason::MtuExceeded));
        }
        let ip_at = f.start + l3.eth_len;
        if port == PortId::Lan && !decrement_ttl(&mut f.buf[ip_at..ip_at + l3.ip_len], l3.v6) {
            return Err(Verdict::Drop(DropReason::TtlExceeded));
        }
        rewrite_ethernet(f, l3.eth_len, l3.ip_len, l3.v6, mac, pc).map_err(Verdict::Drop)?;
        Err(if out == PortId::Wan {
            Verdict::TxWan
        } else {
            Verdict::TxLan
        })
    }

    // -----------------------------------------------------------------------------------------
    // Inbound: WAN → LAN (tunnel) or host (transport).

    fn inbound_chunk(&mut self, frames: &mut [Frame<'_>], verdicts: &mut [Verdict], now_ns: u64) {
        let guard = crossbeam_epoch::pin();
        let db = Arc::clone(&self.db);
        let net = Arc::clone(&self.net);
        let sink = db.event_sink();
        let mut metas: ArrayVec<Meta<'_>, MAX_BURST> = ArrayVec::new();

        // 1. classify, look up, pre-check.
        let mut last: Option<(u32, IpAddr, &Sa)> = None;
        for f in frames.iter() {
            let m = match classify_in(f, &db, &net, &guard, &mut last, now_ns) {
                Ok(m) => m,
                Err(v) => Meta::done(v),
            };
            metas.push(m);
        }

        // 4. crypto.
        self.crypto(frames, &mut metas, Todo::Open);

        // 5. replay update, trailer, decapsulation.
        for (f, m) in frames.iter_mut().zip(metas.iter_mut()) {
            if m.todo != Todo::Open {
                continue;
            }
            let (Some(sa), Some(l3)) = (m.sa, m.l3) else {
                continue;
            };
            m.verdict = match finish_in(f, m, sa, &l3, &net) {
                Ok(v) => v,
                Err(r) => {
                    sa.count_drop(r, 1);
                    Verdict::Drop(r)
                }
            };
        }
        flush_runs(&metas, Todo::Open, now_ns, &sink, |m| {
            matches!(m.verdict, Verdict::TxLan | Verdict::ToHost).then_some((m.bytes, m.esp_len))
        });
        for (v, m) in verdicts.iter_mut().zip(metas.iter()) {
            *v = m.verdict;
        }
    }

    /// Run the crypto for every frame marked `todo`, one provider call per run of one SA.
    fn crypto(&mut self, frames: &mut [Frame<'_>], metas: &mut [Meta<'_>], todo: Todo) {
        let mut ops: ArrayVec<EspOp<'_>, MAX_BURST> = ArrayVec::new();
        let mut owners: ArrayVec<usize, MAX_BURST> = ArrayVec::new();
        for (i, (f, m)) in frames.iter_mut().zip(metas.iter()).enumerate() {
            if m.todo == todo {
                ops.push(EspOp {
                    esp: &mut f.buf[m.esp_off..m.esp_off + m.esp_len],
                    seq: m.seq,
                    status: OpStatus::Pending,
                });
                owners.push(i);
            }
        }
        let mut a = 0;
        while a < ops.len() {
            let sa = metas[owners[a]].sa;
            let mut b = a + 1;
            while b < ops.len() && same_sa(metas[owners[b]].sa, sa) {
                b += 1;
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
            metas[*i].status = op.status;
        }
    }
}

/// Add each SA's successful packets to its counters, once per run of that SA.
fn flush_runs(
    metas: &[Meta<'_>],
    todo: Todo,
    now_ns: u64,
    sink: &EventSink<'_>,
    ok: impl Fn(&Meta<'_>) -> Option<(usize, usize)>,
) {
    let mut run: Option<(&Sa, RunCounts)> = None;
    for m in metas.iter().filter(|m| m.todo == todo || m.sa.is_some()) {
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
            entry.1.bytes += bytes as u64;
            entry.1.wire_bytes += wire as u64;
        }
    }
    if let Some((sa, counts)) = run {
        sa.flush(&counts, now_ns, sink);
    }
}

fn classify_in<'g>(
    f: &Frame<'_>,
    db: &'g SaDb,
    net: &Network,
    guard: &'g crossbeam_epoch::Guard,
    last: &mut Option<(u32, IpAddr, &'g Sa)>,
    now_ns: u64,
) -> Result<Meta<'g>, Verdict> {
    let data = f.data();
    let Some(l3) = parse_frame(data).map_err(Verdict::Drop)? else {
        return Err(Verdict::ToHost);
    };
    if !net.wan.addresses.is_empty() && !net.wan.is_local(&l3.dst) {
        return Err(Verdict::ToHost);
    }
    let ip_at = l3.eth_len;
    let ip_end = ip_at + l3.ip_len;
    let (esp_at, esp_end) = match l3.proto {
        protocol::ESP => {
            if l3.fragment {
                return Err(Verdict::Drop(DropReason::OuterFragment));
            }
            (ip_at + l3.upper, ip_end)
        }
        protocol::UDP => {
            if l3.fragment {
                // Could be a fragmented IKE message: the kernel reassembles it.
                return Err(Verdict::ToHost);
            }
            let u = udp::UdpPacket::new_checked(&data[ip_at + l3.upper..ip_end])
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
            let at = ip_at + l3.upper + udp::HEADER_LEN;
            (at, ip_at + l3.upper + usize::from(u.len()))
        }
        _ => return Err(Verdict::ToHost),
    };
    let e = esp::EspPacket::new_checked(&data[esp_at..esp_end])
        .map_err(|e| Verdict::Drop(wire_err(e)))?;
    let spi = e.spi();
    let sa = match *last {
        Some((s, d, sa)) if s == spi && d == l3.dst => sa,
        _ => {
            let sa = db
                .lookup_inbound(spi, l3.dst, guard)
                .ok_or(Verdict::Drop(DropReason::UnknownSpi))?;
            *last = Some((spi, l3.dst, sa));
            sa
        }
    };
    let drop = |r: DropReason| {
        sa.count_drop(r, 1);
        Verdict::Drop(r)
    };
    if sa.is_dead() || !sa.within_hard_limits(&RunCounts::default(), 0, now_ns) {
        return Err(drop(DropReason::LifetimeExpired));
    }
    let esp_len = esp_end - esp_at;
    if esp_len < esp::HEADER_LEN + sa.iv_len + esp::TRAILER_FIXED_LEN + sa.icv_len {
        return Err(drop(DropReason::BadLength));
    }
    let seq = sa.replay.infer_seq(e.sequence_number(), sa.esn);
    if let Err(r) = sa.replay.check(seq) {
        return Err(drop(replay_reason(r)));
    }
    Ok(Meta {
        verdict: Verdict::Drop(DropReason::Unsupported),
        todo: Todo::Open,
        sa: Some(sa),
        l3: Some(l3),
        esp_off: f.start + esp_at,
        esp_len,
        seq,
        status: OpStatus::Pending,
        mac: ethernet::EthernetAddress([0; 6]),
        bytes: 0,
    })
}

fn replay_reason(r: crate::antireplay::ReplayError) -> DropReason {
    match r {
        crate::antireplay::ReplayError::Replay => DropReason::Replay,
        crate::antireplay::ReplayError::TooOld => DropReason::TooOld,
    }
}

/// After `open`: replay window, trailer, decapsulation. Returns the verdict or a drop reason to
/// count on the SA.
fn finish_in(
    f: &mut Frame<'_>,
    m: &mut Meta<'_>,
    sa: &Sa,
    l3: &L3,
    net: &Network,
) -> Result<Verdict, DropReason> {
    match m.status {
        OpStatus::Ok => {}
        OpStatus::AuthFailed => return Err(DropReason::AuthFailed),
        _ => return Err(DropReason::BadLength),
    }
    // Authenticated: now, and only now, the window moves.
    sa.replay.mark(m.seq).map_err(replay_reason)?;
    let plain_at = m.esp_off + esp::HEADER_LEN + sa.iv_len;
    let plain_end = m.esp_off + m.esp_len - sa.icv_len;
    let t = esp::parse_trailer(&f.buf[plain_at..plain_end]).map_err(wire_err)?;
    if t.next_header == esp::NEXT_HEADER_NO_NEXT {
        return Err(DropReason::Dummy);
    }
    match sa.mode {
        Mode::Tunnel => decap_tunnel(f, m, sa, l3, t, plain_at, net),
        Mode::Transport => decap_transport(f, m, sa, l3, t, plain_at),
    }
}

fn decap_tunnel(
    f: &mut Frame<'_>,
    m: &mut Meta<'_>,
    sa: &Sa,
    outer: &L3,
    t: esp::Trailer,
    at: usize,
    net: &Network,
) -> Result<Verdict, DropReason> {
    let v6 = match t.next_header {
        protocol::IPIP => false,
        protocol::IPV6 => true,
        _ => return Err(DropReason::BadNextHeader),
    };
    let region = &f.buf[at..at + t.payload_len];
    let inner = parse_ip(region, 0, v6)?;
    // Anything after the inner packet is TFC padding (RFC 4303 §2.7).
    let inner_len = inner.ip_len;
    if !sa.selectors.is_empty() {
        let key = inner.flow(&f.buf[at..at + inner_len]);
        if !sa.selectors.iter().any(|s| s.matches(&key)) {
            return Err(DropReason::SelectorMismatch);
        }
    }
    let pkt = &mut f.buf[at..at + inner_len];
    if sa.ecn == EcnMode::Normal {
        let new = ecn::decap(outer.ecn, inner.ecn).ok_or(DropReason::EcnDrop)?;
        if new != inner.ecn {
            set_ecn(pkt, v6, new);
        }
    }
    if !decrement_ttl(pkt, v6) {
        return Err(DropReason::TtlExceeded);
    }
    if inner_len > usize::from(net.lan.mtu) {
        return Err(DropReason::MtuExceeded);
    }
    let mac = net.next_hops.resolve(PortId::Lan, inner.dst)?;
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
    m.bytes = inner_len;
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
    let keep = outer.upper;
    if outer.v6 && outer.keep != keep {
        return Err(DropReason::Unsupported);
    }
    let ip_at = f.start + outer.eth_len;
    let shift = at - (ip_at + keep);
    // Move Ethernet + kept IP header forward so they sit right before the payload.
    f.buf.copy_within(f.start..ip_at + keep, f.start + shift);
    f.start += shift;
    let ip_at = ip_at + shift;
    let total = keep + t.payload_len;
    let pkt = &mut f.buf[ip_at..ip_at + total];
    pkt[outer.nh_field] = t.next_header;
    if outer.v6 {
        let mut p = ipv6::Ipv6Packet::new_unchecked(&mut *pkt);
        p.set_payload_len((total - ipv6::HEADER_LEN) as u16);
    } else {
        let mut p = ipv4::Ipv4Packet::new_unchecked(&mut *pkt);
        p.set_total_len(total as u16);
        p.fill_checksum();
    }
    // RFC 3948 §3.1.2: behind a NAT the peer computed TCP/UDP checksums over addresses that
    // changed on the way; the payload is authenticated, so recompute them.
    if sa.encap.is_some() {
        fix_l4_checksum(pkt, outer.v6, keep, t.next_header);
    }
    let inner = parse_ip(pkt, 0, outer.v6)?;
    if !sa.selectors.is_empty() {
        let key = inner.flow(pkt);
        if !sa.selectors.iter().any(|s| s.matches(&key)) {
            return Err(DropReason::SelectorMismatch);
        }
    }
    f.len = outer.eth_len + total;
    m.bytes = total;
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

fn decrement_ttl(pkt: &mut [u8], v6: bool) -> bool {
    if v6 {
        ipv6::Ipv6Packet::new_unchecked(pkt).decrement_hop_limit()
    } else {
        ipv4::Ipv4Packet::new_unchecked(pkt).decrement_ttl()
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

fn outer_addrs(sa: &Sa) -> (IpAddr, IpAddr) {
    (sa.local, sa.remote)
}

/// Write ESP header, trailer, UDP, outer IP and Ethernet around an inner packet (tunnel mode).
fn build_tunnel(
    f: &mut Frame<'_>,
    m: &mut Meta<'_>,
    sa: &Sa,
    l3: &L3,
    wan: &PortConfig,
    ident: u16,
    forwarded: bool,
) {
    let inner_at = f.start + l3.eth_len;
    let inner_len = l3.ip_len;
    if forwarded {
        // Router semantics: the inner packet crosses this hop. (Checked > 1 at classify.)
        decrement_ttl(&mut f.buf[inner_at..inner_at + inner_len], l3.v6);
    }
    let nh = if l3.v6 {
        protocol::IPV6
    } else {
        protocol::IPIP
    };
    let tail = inner_at + inner_len;
    let pad = esp::pad_len(inner_len, sa.block_align);
    // Cannot fail: sizes were checked at classify.
    let _ = esp::write_trailer(&mut f.buf[tail..tail + pad + 2], pad, nh);
    write_esp_header(f.buf, m.esp_off, sa.spi, m.seq);
    let udp_len = if sa.encap.is_some() {
        udp::HEADER_LEN
    } else {
        0
    };
    let udp_at = m.esp_off - udp_len;
    if let Some(e) = sa.encap {
        let _ = udp::emit_header(
            &mut f.buf[udp_at..m.esp_off],
            e.sport,
            e.dport,
            (udp_len + m.esp_len) as u16,
        );
    }
    let dscp = match sa.dscp {
        DscpMode::Copy => l3.dscp,
        DscpMode::Set(v) => v,
    };
    let ecn_out = match sa.ecn {
        EcnMode::Normal => ecn::encap(l3.ecn),
        EcnMode::Compat => ecn::NOT_ECT,
    };
    let payload_len = (udp_len + m.esp_len) as u16;
    let next = if sa.encap.is_some() {
        protocol::UDP
    } else {
        protocol::ESP
    };
    let (src, dst) = outer_addrs(sa);
    let ip_at = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let at = udp_at - ipv4::HEADER_LEN;
            let df = match sa.df {
                DfMode::Copy => l3.df,
                DfMode::Set => true,
                DfMode::Clear => false,
            };
            let h = ipv4::Ipv4Header {
                src: s,
                dst: d,
                protocol: next,
                ttl: sa.outer_ttl,
                dscp,
                ecn: ecn_out,
                dont_frag: df,
                ident,
                payload_len,
            };
            let _ = ipv4::emit_header(&mut f.buf[at..udp_at], &h);
            at
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let at = udp_at - ipv6::HEADER_LEN;
            let h = ipv6::Ipv6Header {
                src: s,
                dst: d,
                next_header: next,
                hop_limit: sa.outer_ttl,
                traffic_class: dscp << 2 | ecn_out,
                flow_label: 0,
                payload_len,
            };
            let _ = ipv6::emit_header(&mut f.buf[at..udp_at], &h);
            at
        }
        // Configuration guarantees one family for both outer addresses.
        _ => udp_at,
    };
    finish_outer(f, m, ip_at, sa.remote.is_ipv6(), wan);
}

/// Insert UDP/ESP between an IP header and its payload (transport mode).
fn build_transport(f: &mut Frame<'_>, m: &mut Meta<'_>, sa: &Sa, l3: &L3, wan: &PortConfig) {
    let old_ip = f.start + l3.eth_len;
    let keep = l3.keep;
    let payload_at = old_ip + keep;
    let payload_len = l3.ip_len - keep;
    let udp_len = if sa.encap.is_some() {
        udp::HEADER_LEN
    } else {
        0
    };
    let ip_at = m.esp_off - udp_len - keep;
    f.buf.copy_within(old_ip..old_ip + keep, ip_at);
    let nh = f.buf[ip_at + l3.nh_field];
    f.buf[ip_at + l3.nh_field] = if sa.encap.is_some() {
        protocol::UDP
    } else {
        protocol::ESP
    };
    let tail = payload_at + payload_len;
    let pad = esp::pad_len(payload_len, sa.block_align);
    let _ = esp::write_trailer(&mut f.buf[tail..tail + pad + 2], pad, nh);
    write_esp_header(f.buf, m.esp_off, sa.spi, m.seq);
    if let Some(e) = sa.encap {
        let at = m.esp_off - udp::HEADER_LEN;
        let _ = udp::emit_header(
            &mut f.buf[at..m.esp_off],
            e.sport,
            e.dport,
            (udp_len + m.esp_len) as u16,
        );
    }
    let total = keep + udp_len + m.esp_len;
    let pkt = &mut f.buf[ip_at..ip_at + total];
    if l3.v6 {
        ipv6::Ipv6Packet::new_unchecked(pkt).set_payload_len((total - ipv6::HEADER_LEN) as u16);
    } else {
        let mut p = ipv4::Ipv4Packet::new_unchecked(pkt);
        p.set_total_len(total as u16);
        p.fill_checksum();
    }
    finish_outer(f, m, ip_at, l3.v6, wan);
}

fn write_esp_header(buf: &mut [u8], at: usize, spi: u32, seq: u64) {
    buf[at..at + 4].copy_from_slice(&spi.to_be_bytes());
    buf[at + 4..at + 8].copy_from_slice(&(seq as u32).to_be_bytes());
}

/// Ethernet header in front of the outer IP header; set the frame's new extent.
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
    f.len = m.esp_off + m.esp_len - at;
}

/// UDP checksum of an IPv6 ESP-in-UDP packet (mandatory over IPv6, RFC 8200 §8.1); after the
/// crypto because it covers the ciphertext.
fn fill_udp6_checksum(f: &mut Frame<'_>, m: &Meta<'_>, sa: &Sa, _l3: &L3) {
    let (IpAddr::V6(s), IpAddr::V6(d)) = outer_addrs(sa) else {
        return;
    };
    let at = m.esp_off - udp::HEADER_LEN;
    let mut u = udp::UdpPacket::new_unchecked(&mut f.buf[at..m.esp_off + m.esp_len]);
    u.fill_checksum_v6(&s, &d);
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
