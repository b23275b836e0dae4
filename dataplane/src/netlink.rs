//! Next hops from the kernel: its routes and neighbour table, read over rtnetlink.
//!
//! [`KernelNextHops`] is the live gateway's [`NextHops`]: it dumps the main routing table (IPv4
//! and IPv6) and the neighbour table into an immutable [`Snapshot`] behind an [`ArcSwap`], so the
//! per-packet read path takes no lock and bumps no shared reference count. A background thread
//! (`espgw-netlink`) listens to the kernel's route, neighbour and link notifications and rebuilds
//! the snapshot by re-dumping the tables concerned: every 25 ms, the notifications that arrived
//! meanwhile cause one rebuild (rebuilds are at least 20 ms apart), so a changed neighbour MAC
//! is in use some 25 ms later.
//!
//! When a next hop has no usable MAC address, the packet is dropped (`no_neighbor`) and the
//! kernel is *prodded* to resolve it: the worker pushes `(ifindex, address)` on a bounded
//! lock-free queue (at most once per address and second, filtered on the worker's side by a
//! lossy table of atomics and exactly on the thread's side), and the thread sends an
//! `RTM_NEWNEIGH` with `NTF_USE` (`NLM_F_CREATE | NLM_F_REPLACE`). That is the kernel's
//! `neigh_event_send()`, exactly what its own output path does for a packet: it creates the entry
//! if needed and starts ARP / neighbour discovery. Next hops in state STALE are prodded the same
//! way (and still used), because the kernel never sees the gateway's traffic and would otherwise
//! never re-validate them.
//!
//! What the snapshot follows:
//! * the main table's unicast routes, connected ones included, longest prefix first and lowest
//!   metric first among equal prefixes; multipath routes contribute each of their next hops; an
//!   IPv4 route via an IPv6 gateway (`RTA_VIA`) is understood; routes with a source prefix
//!   (IPv6 subtrees) are ignored;
//! * [`NextHops::route`] answers what the kernel would: the best route, which must leave by one
//!   of the gateway's ports (a more specific route out of another interface, or a blackhole,
//!   unreachable or prohibit route, means `no_route`);
//! * [`NextHops::resolve`] takes the longest-prefix route out of the asked port, ignoring the
//!   others;
//! * neighbours on the ports' interfaces whose state gives a usable MAC (REACHABLE, STALE,
//!   DELAY, PROBE, PERMANENT, NOARP); static neighbours from the configuration win over them.

use crate::config::PortId;
use crate::counters::DropReason;
use crate::nexthop::NextHops;
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use espgw_wire::ethernet::EthernetAddress;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteType, RouteVia,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// A gateway port and the kernel interface it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortLink {
    /// The port.
    pub port: PortId,
    /// Its interface's name (`eth0`).
    pub ifname: String,
}

/// An interface as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub ifindex: u32,
    /// MAC address.
    pub mac: EthernetAddress,
    /// IP MTU.
    pub mtu: u32,
    /// Addresses with their prefix lengths (IPv4 and IPv6, link-local ones included).
    pub addresses: Vec<(IpAddr, u8)>,
}

/// What can go wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened or set up.
    #[error("cannot open a netlink socket to the kernel: {0}")]
    Socket(#[source] io::Error),
    /// Subscribing to change notifications failed.
    #[error("cannot subscribe to the kernel's route, neighbour and link changes: {0}")]
    Subscribe(#[source] io::Error),
    /// Sending or receiving failed.
    #[error("netlink I/O failed during {what}: {source}")]
    Io {
        /// The request.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel answered with an error.
    #[error("the kernel refused {what}: {source}")]
    Kernel {
        /// The request.
        what: &'static str,
        /// The kernel's error code.
        #[source]
        source: io::Error,
    },
    /// An answer that could not be understood.
    #[error("unexpected answer from the kernel to {what}: {detail}")]
    Malformed {
        /// The request.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// No interface by that name.
    #[error("network interface {0:?} does not exist")]
    NoSuchInterface(String),
    /// Not a valid interface name.
    #[error("{0:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or spaces)")]
    BadInterfaceName(String),
    /// The interface has no 6-byte MAC address.
    #[error("network interface {0:?} has no Ethernet MAC address")]
    NoMac(String),
    /// The background thread could not be started.
    #[error("cannot start the netlink thread: {0}")]
    Thread(#[source] io::Error),
}

/// Counters of the netlink thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NextHopStats {
    /// Times the snapshot was (re)built, the first build included.
    pub rebuilds: u64,
    /// Resolution prods sent to the kernel.
    pub prods_sent: u64,
    /// Prods the kernel refused or that could not be sent.
    pub prod_errors: u64,
    /// Prods lost because the queue to the thread was full.
    pub prods_dropped: u64,
    /// Rebuilds that failed (the previous snapshot stayed in use).
    pub dump_errors: u64,
    /// Routes in the current snapshot (all interfaces, reject routes included).
    pub routes: u64,
    /// Usable neighbours on the ports' interfaces in the current snapshot.
    pub neighbors: u64,
}

impl NextHopStats {
    /// As JSON, for the stats socket.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

// ------------------------------------------------------------------------------------------------
// The snapshot: pure data and lookups (no I/O).

const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_FAILED: u16 = 0x20;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
/// States in which the kernel's entry holds a MAC address it would send to.
const NUD_USABLE: u16 =
    NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;

/// Does a neighbour in this state (`ndm_state`) have a MAC address we may use?
pub(crate) fn usable_state(state: u16) -> bool {
    state & NUD_USABLE != 0 && state & (NUD_INCOMPLETE | NUD_FAILED) == 0
}

/// Where a route sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Out of an interface, to a gateway or (connected) to the destination itself.
    Out {
        ifindex: u32,
        gateway: Option<IpAddr>,
    },
    /// Blackhole, unreachable, prohibit, throw.
    Reject,
}

/// One route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RouteEntry {
    v6: bool,
    len: u8,
    /// Network address, host bits cleared (IPv4 in the low 32 bits).
    net: u128,
    metric: u32,
    target: Target,
}

fn addr_bits(a: IpAddr) -> (bool, u128) {
    match a {
        IpAddr::V4(a) => (false, u128::from(a.to_bits())),
        IpAddr::V6(a) => (true, a.to_bits()),
    }
}

fn mask(v6: bool, len: u8) -> u128 {
    if v6 {
        match len {
            0 => 0,
            l if l >= 128 => u128::MAX,
            l => u128::MAX << (128 - u32::from(l)),
        }
    } else {
        match len {
            0 => 0,
            l if l >= 32 => u128::from(u32::MAX),
            l => u128::from(u32::MAX << (32 - u32::from(l))),
        }
    }
}

impl RouteEntry {
    fn new(dst: IpAddr, len: u8, metric: u32, target: Target) -> Self {
        let (v6, bits) = addr_bits(dst);
        let len = len.min(if v6 { 128 } else { 32 });
        RouteEntry {
            v6,
            len,
            net: bits & mask(v6, len),
            metric,
            target,
        }
    }
}

/// The routes of one prefix length, sorted by network then metric.
#[derive(Debug, Clone, Default)]
struct LenGroup {
    len: u8,
    mask: u128,
    entries: Vec<(u128, u32, Target)>,
}

/// Longest-prefix match: per family, one sorted group per prefix length present, longest
/// first; a lookup is one binary search per length present.
#[derive(Debug, Clone, Default)]
struct RouteTable {
    v4: Vec<LenGroup>,
    v6: Vec<LenGroup>,
    len: usize,
}

impl RouteTable {
    fn new(routes: &[RouteEntry]) -> Self {
        let mut t = RouteTable {
            len: routes.len(),
            ..Default::default()
        };
        for r in routes {
            let groups = if r.v6 { &mut t.v6 } else { &mut t.v4 };
            let g = match groups.iter_mut().position(|g| g.len == r.len) {
                Some(i) => &mut groups[i],
                None => {
                    groups.push(LenGroup {
                        len: r.len,
                        mask: mask(r.v6, r.len),
                        entries: Vec::new(),
                    });
                    let last = groups.len() - 1;
                    &mut groups[last]
                }
            };
            g.entries.push((r.net, r.metric, r.target));
        }
        for groups in [&mut t.v4, &mut t.v6] {
            groups.sort_by_key(|g| std::cmp::Reverse(g.len));
            for g in groups.iter_mut() {
                // Stable: among equal network and metric the kernel's dump order is kept.
                g.entries.sort_by_key(|e| (e.0, e.1));
            }
        }
        t
    }

    /// Routes containing `dst`: longest prefix first, then lowest metric. Yields
    /// `(prefix length, metric, target)`.
    fn matches(&self, dst: IpAddr) -> impl Iterator<Item = (u8, u32, Target)> + '_ {
        let (v6, bits) = addr_bits(dst);
        let groups = if v6 { &self.v6 } else { &self.v4 };
        groups.iter().flat_map(move |g| {
            let key = bits & g.mask;
            let start = g.entries.partition_point(|e| e.0 < key);
            g.entries
                .get(start..)
                .unwrap_or(&[])
                .iter()
                .take_while(move |e| e.0 == key)
                .map(move |e| (g.len, e.1, e.2))
        })
    }
}

/// A neighbour with a usable MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Neighbor {
    ifindex: u32,
    ip: IpAddr,
    mac: EthernetAddress,
    /// STALE: usable, but the kernel should re-validate it.
    stale: bool,
}

/// What the kernel knows about a next hop's MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mac {
    /// Static or fresh.
    Known(EthernetAddress),
    /// Usable, but should be re-validated.
    Stale(EthernetAddress),
    /// Not known.
    Missing,
}

/// Everything a lookup needs, immutable once built.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The ports and their interfaces' indices (ports whose interface is missing are absent).
    ports: Vec<(PortId, u32)>,
    routes: RouteTable,
    /// Sorted by (ifindex, ip).
    neighbors: Vec<Neighbor>,
    /// Sorted by ip.
    statics: Vec<(IpAddr, EthernetAddress)>,
}

impl Snapshot {
    fn new(
        ports: Vec<(PortId, u32)>,
        routes: &[RouteEntry],
        neighbors: &[Neighbor],
        statics: &[(IpAddr, EthernetAddress)],
    ) -> Self {
        let mut n: Vec<Neighbor> = neighbors
            .iter()
            .filter(|n| ports.iter().any(|(_, i)| *i == n.ifindex))
            .copied()
            .collect();
        n.sort_by_key(|n| (n.ifindex, n.ip));
        n.dedup_by_key(|n| (n.ifindex, n.ip));
        let mut s = statics.to_vec();
        s.sort_by_key(|x| x.0);
        s.dedup_by_key(|x| x.0);
        Snapshot {
            ports,
            routes: RouteTable::new(routes),
            neighbors: n,
            statics: s,
        }
    }

    fn port_of(&self, ifindex: u32) -> Option<PortId> {
        self.ports
            .iter()
            .find(|(_, i)| *i == ifindex)
            .map(|(p, _)| *p)
    }

    fn is_port(&self, port: PortId, ifindex: u32) -> bool {
        self.ports.iter().any(|&(p, i)| p == port && i == ifindex)
    }

    /// The longest-prefix route to `dst` out of `port`: (interface, next-hop address).
    fn next_hop_via(&self, port: PortId, dst: IpAddr) -> Result<(u32, IpAddr), DropReason> {
        for (_, _, t) in self.routes.matches(dst) {
            if let Target::Out { ifindex, gateway } = t
                && self.is_port(port, ifindex)
            {
                return Ok((ifindex, gateway.unwrap_or(dst)));
            }
        }
        Err(DropReason::NoRoute)
    }

    /// The kernel's best route to `dst`, if it leaves by a port: (port, interface, next hop).
    fn next_hop(&self, dst: IpAddr) -> Result<(PortId, u32, IpAddr), DropReason> {
        let mut best = None;
        for (len, metric, t) in self.routes.matches(dst) {
            match best {
                None => best = Some((len, metric)),
                Some(b) if b != (len, metric) => break,
                Some(_) => {}
            }
            // Among equally good routes (multipath), the first one out of a port.
            if let Target::Out { ifindex, gateway } = t
                && let Some(port) = self.port_of(ifindex)
            {
                return Ok((port, ifindex, gateway.unwrap_or(dst)));
            }
        }
        Err(DropReason::NoRoute)
    }

    fn mac(&self, ifindex: u32, hop: IpAddr) -> Mac {
        if !self.statics.is_empty()
            && let Ok(i) = self.statics.binary_search_by(|x| x.0.cmp(&hop))
            && let Some((_, mac)) = self.statics.get(i)
        {
            return Mac::Known(*mac);
        }
        match self
            .neighbors
            .binary_search_by(|n| (n.ifindex, n.ip).cmp(&(ifindex, hop)))
            .ok()
            .and_then(|i| self.neighbors.get(i))
        {
            Some(n) if n.stale => Mac::Stale(n.mac),
            Some(n) => Mac::Known(n.mac),
            None => Mac::Missing,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Converting the kernel's messages.

fn family_of(a: IpAddr) -> AddressFamily {
    match a {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The gateway of a route or of one of its multipath next hops.
fn gateway_of(attrs: &[RouteAttribute]) -> Option<IpAddr> {
    attrs.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => route_addr(g),
        RouteAttribute::Via(RouteVia::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Via(RouteVia::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

/// Is this a main-table route we follow (not a cached clone)?
fn is_main_table(m: &RouteMessage) -> bool {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    table == RT_TABLE_MAIN && !m.header.flags.contains(RouteFlags::Cloned)
}

/// The entries one route message of the main table contributes (none for routes we ignore).
fn route_entries(m: &RouteMessage, out: &mut Vec<RouteEntry>) {
    if !is_main_table(m) || m.header.source_prefix_length != 0 {
        return;
    }
    let v6 = match m.header.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return,
    };
    let len = m.header.destination_prefix_length;
    let dst = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => route_addr(d),
            _ => None,
        })
        .unwrap_or(if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        });
    if dst.is_ipv6() != v6 {
        return;
    }
    let metric = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    match m.header.kind {
        RouteType::Unicast => {}
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit | RouteType::Throw => {
            out.push(RouteEntry::new(dst, len, metric, Target::Reject));
            return;
        }
        _ => return,
    }
    let oif = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let gateway = gateway_of(&m.attributes);
    if let Some(ifindex) = oif {
        out.push(RouteEntry::new(
            dst,
            len,
            metric,
            Target::Out { ifindex, gateway },
        ));
    }
    for a in &m.attributes {
        if let RouteAttribute::MultiPath(hops) = a {
            for h in hops {
                out.push(RouteEntry::new(
                    dst,
                    len,
                    metric,
                    Target::Out {
                        ifindex: h.interface_index,
                        gateway: gateway_of(&h.attributes),
                    },
                ));
            }
        }
    }
}

/// What a neighbour message says: (ifindex, address) and, if usable, (MAC, stale).
type NeighborKey = (u32, IpAddr);

fn neighbor_of(m: &NeighbourMessage) -> Option<(NeighborKey, Option<(EthernetAddress, bool)>)> {
    let ip = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let state = u16::from(m.header.state);
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
        _ => None,
    });
    let usable = match mac {
        Some(mac) if usable_state(state) && !m.header.flags.contains(NeighbourFlags::Proxy) => {
            Some((EthernetAddress(mac), state & NUD_STALE != 0))
        }
        _ => None,
    };
    Some(((m.header.ifindex, ip), usable))
}

// ------------------------------------------------------------------------------------------------
// The netlink socket.

const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
/// Large enough for any datagram the kernel sends (dump skbs are at most 32 KiB).
const RECV_BUF: usize = 64 * 1024;

/// One netlink message of a datagram, not yet parsed.
struct RawMsg<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    /// The whole message, header included.
    bytes: &'a [u8],
    payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram into messages; `Err` describes broken framing (the rest is then lost).
fn split_messages(mut buf: &[u8]) -> Vec<Result<RawMsg<'_>, String>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (Some(len), Some(kind), Some(flags), Some(seq)) = (
            u32_at(buf, 0),
            u16_at(buf, 4),
            u16_at(buf, 6),
            u32_at(buf, 8),
        ) else {
            out.push(Err(format!(
                "{} stray bytes after the last message",
                buf.len()
            )));
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            out.push(Err(format!(
                "message length {len} with {} bytes left",
                buf.len()
            )));
            break;
        }
        let (bytes, payload) = match (buf.get(..len), buf.get(NLMSG_HDRLEN..len)) {
            (Some(b), Some(p)) => (b, p),
            _ => break,
        };
        out.push(Ok(RawMsg {
            kind,
            flags,
            seq,
            bytes,
            payload,
        }));
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    out
}

/// Parses a message's payload with netlink-packet-route; a message it cannot parse (or that
/// makes it panic) is `Err`.
fn parse_inner(raw: &RawMsg<'_>) -> Result<RouteNetlinkMessage, String> {
    let bytes = raw.bytes;
    let parsed =
        std::panic::catch_unwind(|| NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes));
    match parsed {
        Ok(Ok(m)) => match m.payload {
            NetlinkPayload::InnerMessage(i) => Ok(i),
            _ => Err(format!(
                "message type {} is not an rtnetlink message",
                raw.kind
            )),
        },
        Ok(Err(e)) => Err(format!("message type {}: {e}", raw.kind)),
        Err(_) => Err(format!("message type {}: the parser panicked", raw.kind)),
    }
}

/// The error code of an NLMSG_ERROR or NLMSG_DONE payload.
fn error_code(raw: &RawMsg<'_>) -> Option<i32> {
    u32_at(raw.payload, 0).map(|c| c as i32)
}

fn os_error(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code.saturating_neg())
}

/// A request socket: one request at a time, answers matched by sequence number.
struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    /// The kernel flagged the dump as inconsistent (NLM_F_DUMP_INTR): the tables changed while
    /// it was being dumped.
    interrupted: bool,
}

impl Rtnl {
    fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        sock.bind_auto().map_err(NetlinkError::Socket)?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    fn recv(&mut self, what: &'static str) -> Result<usize, NetlinkError> {
        loop {
            let mut b: &mut [u8] = &mut self.buf[..];
            match self.sock.recv_from(&mut b, libc::MSG_TRUNC) {
                Ok((n, _)) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(NetlinkError::Io { what, source }),
            }
        }
    }

    /// Sends `msg` and reads the answer up to its end (NLMSG_DONE for a dump, the ACK
    /// otherwise: non-dump requests must ask for one), handing each rtnetlink message of the
    /// answer to `each`. Messages the parser does not understand are skipped (logged).
    fn request(
        &mut self,
        what: &'static str,
        flags: u16,
        msg: RouteNetlinkMessage,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<Outcome, NetlinkError> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        loop {
            match self.sock.send_to(&out, &SocketAddr::new(0, 0), 0) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(NetlinkError::Io { what, source }),
            }
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut outcome = Outcome { interrupted: false };
        loop {
            let n = self.recv(what)?;
            if n > self.buf.len() {
                return Err(NetlinkError::Malformed {
                    what,
                    detail: format!("a datagram of {n} bytes did not fit the receive buffer"),
                });
            }
            let mut finished = false;
            for raw in split_messages(self.buf.get(..n).unwrap_or(&[])) {
                let raw = raw.map_err(|detail| NetlinkError::Malformed { what, detail })?;
                if raw.seq != seq {
                    continue; // the rest of an earlier, abandoned answer
                }
                if raw.flags & NLM_F_DUMP_INTR != 0 {
                    outcome.interrupted = true;
                }
                match raw.kind {
                    NLMSG_NOOP => {}
                    NLMSG_DONE => {
                        match error_code(&raw) {
                            Some(c) if c < 0 => {
                                return Err(NetlinkError::Kernel {
                                    what,
                                    source: os_error(c),
                                });
                            }
                            _ => {}
                        }
                        finished = true;
                    }
                    NLMSG_ERROR => match error_code(&raw) {
                        Some(0) => finished |= !dump,
                        Some(c) => {
                            return Err(NetlinkError::Kernel {
                                what,
                                source: os_error(c),
                            });
                        }
                        None => {
                            return Err(NetlinkError::Malformed {
                                what,
                                detail: "truncated error message".into(),
                            });
                        }
                    },
                    NLMSG_OVERRUN => {
                        return Err(NetlinkError::Malformed {
                            what,
                            detail: "the kernel reported an overrun".into(),
                        });
                    }
                    _ => match parse_inner(&raw) {
                        Ok(m) => each(m),
                        Err(e) => tracing::debug!("netlink: skipping a message of {what}: {e}"),
                    },
                }
            }
            if finished {
                return Ok(outcome);
            }
        }
    }

    /// The interface called `ifname`: (index, MAC if it has a 6-byte one, MTU), `None` if there
    /// is no such interface.
    fn get_link(
        &mut self,
        ifname: &str,
    ) -> Result<Option<(u32, Option<EthernetAddress>, u32)>, NetlinkError> {
        check_ifname(ifname)?;
        let mut req = LinkMessage::default();
        req.attributes
            .push(LinkAttribute::IfName(ifname.to_string()));
        let mut found = None;
        let r = self.request(
            "the interface query",
            NLM_F_REQUEST | NLM_F_ACK,
            RouteNetlinkMessage::GetLink(req),
            |m| {
                if let RouteNetlinkMessage::NewLink(l) = m {
                    let mut mac = None;
                    let mut mtu = 0;
                    for a in &l.attributes {
                        match a {
                            LinkAttribute::Address(b) => {
                                mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(EthernetAddress)
                            }
                            LinkAttribute::Mtu(m) => mtu = *m,
                            _ => {}
                        }
                    }
                    found = Some((l.header.index, mac, mtu));
                }
            },
        );
        match r {
            Ok(_) => Ok(found),
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The main table's routes, both families.
    fn dump_routes(&mut self) -> Result<(Vec<RouteEntry>, Outcome), NetlinkError> {
        let mut out = Vec::new();
        let mut interrupted = false;
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            let o = self.request(
                "the route dump",
                NLM_F_REQUEST | NLM_F_DUMP,
                RouteNetlinkMessage::GetRoute(req),
                |m| {
                    if let RouteNetlinkMessage::NewRoute(r) = m {
                        route_entries(&r, &mut out);
                    }
                },
            )?;
            interrupted |= o.interrupted;
        }
        Ok((out, Outcome { interrupted }))
    }

    /// Neighbours (ARP and NDP) with a usable MAC.
    fn dump_neighbors(&mut self) -> Result<(Vec<Neighbor>, Outcome), NetlinkError> {
        let mut out = Vec::new();
        let o = self.request(
            "the neighbour dump",
            NLM_F_REQUEST | NLM_F_DUMP,
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            |m| {
                if let RouteNetlinkMessage::NewNeighbour(n) = m
                    && let Some(((ifindex, ip), Some((mac, stale)))) = neighbor_of(&n)
                {
                    out.push(Neighbor {
                        ifindex,
                        ip,
                        mac,
                        stale,
                    });
                }
            },
        )?;
        Ok((out, o))
    }

    /// Does the kernel already hold a usable, fresh (not STALE) entry for `ip` on `ifindex`, one
    /// added since the snapshot was taken? A single-entry RTM_GETNEIGH; any error reads as "no".
    fn has_usable_neighbor(&mut self, ifindex: u32, ip: IpAddr) -> bool {
        let mut m = NeighbourMessage::default();
        m.header.family = family_of(ip);
        m.header.ifindex = ifindex;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        let mut usable = false;
        let r = self.request(
            "a neighbour lookup",
            // The ACK ends the exchange after the entry (a lone reply has no NLMSG_DONE).
            NLM_F_REQUEST | NLM_F_ACK,
            RouteNetlinkMessage::GetNeighbour(m),
            |r| {
                // A STALE entry still wants the prod (the kernel re-validates it).
                if let RouteNetlinkMessage::NewNeighbour(n) = r
                    && let Some((_, Some((_, false)))) = neighbor_of(&n)
                {
                    usable = true;
                }
            },
        );
        r.is_ok() && usable
    }

    /// Asks the kernel to resolve `ip` on `ifindex`: RTM_NEWNEIGH with NTF_USE, which runs
    /// `neigh_event_send()` on the (created if need be) entry. NTF_USE also clears
    /// NUD_PERMANENT on an existing entry, so the caller first checks that there is no usable
    /// entry (a static one an operator just added must not be downgraded).
    fn prod(&mut self, ifindex: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut m = NeighbourMessage::default();
        m.header.family = family_of(ip);
        m.header.ifindex = ifindex;
        m.header.state = NeighbourState::None;
        m.header.flags = NeighbourFlags::Use;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        self.request(
            "a neighbour resolution request (RTM_NEWNEIGH with NTF_USE)",
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            RouteNetlinkMessage::NewNeighbour(m),
            |_| {},
        )
        .map(|_| ())
    }
}

fn check_ifname(name: &str) -> Result<(), NetlinkError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(NetlinkError::BadInterfaceName(name.to_string()))
    }
}

/// Reads an interface's index, MAC address, MTU and addresses.
pub fn link_info(ifname: &str) -> Result<LinkInfo, NetlinkError> {
    let mut rtnl = Rtnl::open()?;
    let (ifindex, mac, mtu) = rtnl
        .get_link(ifname)?
        .ok_or_else(|| NetlinkError::NoSuchInterface(ifname.to_string()))?;
    let mac = mac.ok_or_else(|| NetlinkError::NoMac(ifname.to_string()))?;
    let mut addresses = Vec::new();
    rtnl.request(
        "the address dump",
        NLM_F_REQUEST | NLM_F_DUMP,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |m| {
            if let RouteNetlinkMessage::NewAddress(a) = m
                && a.header.index == ifindex
            {
                // IFA_LOCAL is our address (IFA_ADDRESS is the peer's on point-to-point links).
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = local.or(addr) {
                    addresses.push((ip, a.header.prefix_len));
                }
            }
        },
    )?;
    Ok(LinkInfo {
        ifindex,
        mac,
        mtu,
        addresses,
    })
}

// ------------------------------------------------------------------------------------------------
// The shared state and the thread.

/// How long the thread sleeps between looks at the notifications (it also checks the stop flag
/// then; a prod or `stop` wakes it at once).
const TICK: Duration = Duration::from_millis(25);
/// Rebuilds are at least this far apart, however many notifications arrive.
const MIN_REBUILD_INTERVAL: Duration = Duration::from_millis(20);
/// After a failed rebuild.
const RETRY: Duration = Duration::from_secs(1);
/// At most one prod per next hop per this many milliseconds.
const PROD_INTERVAL_MS: u64 = 1000;
const PROD_QUEUE: usize = 256;
const FILTER_SLOTS: usize = 1024;
const TIME_BITS: u32 = 40;

/// A lossy rate limiter the workers consult before queueing a prod: one atomic per slot holding
/// a tag of the address and the time of its last prod. A collision can at worst let an extra
/// prod through (the thread filters exactly) or hold one back for a second.
struct ProdFilter {
    slots: Box<[AtomicU64]>,
}

impl ProdFilter {
    fn new() -> Self {
        ProdFilter {
            slots: (0..FILTER_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn hash(ifindex: u32, ip: IpAddr) -> u64 {
        let (_, bits) = addr_bits(ip);
        let x = (bits as u64) ^ ((bits >> 64) as u64).rotate_left(17) ^ (u64::from(ifindex) << 40);
        let x = (x ^ (x >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }

    /// May a prod for this next hop go out at `now_ms`? Records it if so.
    fn admit(&self, ifindex: u32, ip: IpAddr, now_ms: u64) -> bool {
        let h = Self::hash(ifindex, ip);
        let slot = match self.slots.get((h as usize) % FILTER_SLOTS) {
            Some(s) => s,
            None => return false,
        };
        let tag = (h >> 40) & 0xff_ffff;
        let tmask = (1u64 << TIME_BITS) - 1;
        let now = now_ms & tmask;
        let old = slot.load(Ordering::Relaxed);
        if old != 0
            && old >> TIME_BITS == tag
            && now.wrapping_sub(old & tmask) & tmask < PROD_INTERVAL_MS
        {
            return false;
        }
        slot.compare_exchange(
            old,
            (tag << TIME_BITS) | now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_ok()
    }
}

#[derive(Debug, Default)]
struct Counters {
    rebuilds: AtomicU64,
    prods_sent: AtomicU64,
    prod_errors: AtomicU64,
    prods_dropped: AtomicU64,
    dump_errors: AtomicU64,
}

struct Shared {
    snapshot: ArcSwap<Snapshot>,
    prods: ArrayQueue<(u32, IpAddr)>,
    filter: ProdFilter,
    /// Milliseconds since start (plus one), advanced by the thread every tick: the workers'
    /// clock for rate limiting, so the per-packet path reads no clock.
    clock_ms: AtomicU64,
    stop: AtomicBool,
    counters: Counters,
}

/// Next hops from the kernel's routes and neighbours, kept current by a background thread.
pub struct KernelNextHops {
    shared: Arc<Shared>,
    thread: Thread,
    handle: Mutex<Option<JoinHandle<()>>>,
    ports: Vec<PortLink>,
}

impl fmt::Debug for KernelNextHops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelNextHops")
            .field("ports", &self.ports)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl KernelNextHops {
    /// Dumps the main table's routes (IPv4 and IPv6) and the neighbours, subscribes to route,
    /// neighbour and link changes, and starts the thread (`espgw-netlink`) that keeps the
    /// snapshot current. Static neighbours win over the kernel's. Fails if a port's interface
    /// does not exist. The thread stops on [`KernelNextHops::stop`] or when the last `Arc` is
    /// dropped.
    pub fn start(
        ports: &[PortLink],
        static_neighbors: &[(IpAddr, EthernetAddress)],
    ) -> Result<Arc<KernelNextHops>, NetlinkError> {
        for p in ports {
            check_ifname(&p.ifname)?;
        }
        // Subscribe first, so that nothing that changes during the first dump is missed.
        let mut events = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        events.bind_auto().map_err(NetlinkError::Socket)?;
        for g in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
        ] {
            events.add_membership(g).map_err(NetlinkError::Subscribe)?;
        }
        if let Err(e) = events.set_rx_buf_sz::<libc::c_int>(4 << 20) {
            tracing::debug!("netlink: cannot enlarge the notification buffer: {e}");
        }
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            prods: ArrayQueue::new(PROD_QUEUE),
            filter: ProdFilter::new(),
            clock_ms: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let mut worker = Worker {
            shared: Arc::clone(&shared),
            ports: ports.to_vec(),
            statics: static_neighbors.to_vec(),
            rtnl: Rtnl::open()?,
            events,
            events_buf: vec![0; RECV_BUF],
            port_index: Vec::new(),
            routes: Vec::new(),
            neighbors: HashMap::new(),
            last_prod: HashMap::new(),
            started: Instant::now(),
            warn: Throttle::default(),
        };
        worker.rebuild(Dirty::ALL)?;
        if let Some(missing) = ports
            .iter()
            .find(|p| !worker.port_index.iter().any(|(n, _, _)| *n == p.ifname))
        {
            return Err(NetlinkError::NoSuchInterface(missing.ifname.clone()));
        }
        let handle = std::thread::Builder::new()
            .name("espgw-netlink".into())
            .spawn(move || worker.run())
            .map_err(NetlinkError::Thread)?;
        Ok(Arc::new(KernelNextHops {
            shared,
            thread: handle.thread().clone(),
            handle: Mutex::new(Some(handle)),
            ports: ports.to_vec(),
        }))
    }

    /// Stops the thread and waits for it (at most about one tick). The snapshot stays as it
    /// was: lookups keep working, but no longer follow the kernel. Idempotent.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.thread.unpark();
        let handle = match self.handle.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(h) = handle
            && h.thread().id() != std::thread::current().id()
            && h.join().is_err()
        {
            tracing::error!("netlink: the next-hop thread panicked");
        }
    }

    /// Is the thread still running?
    pub fn is_running(&self) -> bool {
        match self.handle.lock() {
            Ok(g) => g.as_ref().is_some_and(|h| !h.is_finished()),
            Err(_) => false,
        }
    }

    /// The thread's counters and the current snapshot's size.
    pub fn stats(&self) -> NextHopStats {
        let c = &self.shared.counters;
        let snap = self.shared.snapshot.load();
        NextHopStats {
            rebuilds: c.rebuilds.load(Ordering::Relaxed),
            prods_sent: c.prods_sent.load(Ordering::Relaxed),
            prod_errors: c.prod_errors.load(Ordering::Relaxed),
            prods_dropped: c.prods_dropped.load(Ordering::Relaxed),
            dump_errors: c.dump_errors.load(Ordering::Relaxed),
            routes: snap.routes.len as u64,
            neighbors: snap.neighbors.len() as u64,
        }
    }

    /// The current snapshot (for diagnostics).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Queues a prod for the thread, rate-limited.
    #[cold]
    fn prod(&self, ifindex: u32, ip: IpAddr) {
        let now = self.shared.clock_ms.load(Ordering::Relaxed);
        if !self.shared.filter.admit(ifindex, ip, now) {
            return;
        }
        if self.shared.prods.push((ifindex, ip)).is_err() {
            self.shared
                .counters
                .prods_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        self.thread.unpark();
    }

    #[inline]
    fn mac_for(
        &self,
        snap: &Snapshot,
        ifindex: u32,
        hop: IpAddr,
    ) -> Result<EthernetAddress, DropReason> {
        match snap.mac(ifindex, hop) {
            Mac::Known(m) => Ok(m),
            Mac::Stale(m) => {
                self.prod(ifindex, hop);
                Ok(m)
            }
            Mac::Missing => {
                self.prod(ifindex, hop);
                Err(DropReason::NoNeighbor)
            }
        }
    }
}

impl Drop for KernelNextHops {
    fn drop(&mut self) {
        self.stop();
    }
}

impl NextHops for KernelNextHops {
    fn resolve(&self, port: PortId, dst: IpAddr) -> Result<EthernetAddress, DropReason> {
        let snap = self.shared.snapshot.load();
        let (ifindex, hop) = snap.next_hop_via(port, dst)?;
        self.mac_for(&snap, ifindex, hop)
    }

    fn route(&self, dst: IpAddr) -> Result<(PortId, EthernetAddress), DropReason> {
        let snap = self.shared.snapshot.load();
        let (port, ifindex, hop) = snap.next_hop(dst)?;
        Ok((port, self.mac_for(&snap, ifindex, hop)?))
    }
}

/// So that each worker's pipeline can own a handle on the one instance.
impl NextHops for Arc<KernelNextHops> {
    fn resolve(&self, port: PortId, dst: IpAddr) -> Result<EthernetAddress, DropReason> {
        (**self).resolve(port, dst)
    }

    fn route(&self, dst: IpAddr) -> Result<(PortId, EthernetAddress), DropReason> {
        (**self).route(dst)
    }
}

/// Which tables must be dumped again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Dirty(u8);

impl Dirty {
    const LINKS: Dirty = Dirty(1);
    const ROUTES: Dirty = Dirty(2);
    const NEIGHBORS: Dirty = Dirty(4);
    const ALL: Dirty = Dirty(7);
    fn any(self) -> bool {
        self.0 != 0
    }
    fn has(self, o: Dirty) -> bool {
        self.0 & o.0 != 0
    }
    fn add(&mut self, o: Dirty) {
        self.0 |= o.0;
    }
}

/// Lets a repeated warning out at most every 10 s.
#[derive(Debug, Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        match self.0 {
            Some(t) if now.duration_since(t) < Duration::from_secs(10) => false,
            _ => {
                self.0 = Some(now);
                true
            }
        }
    }
}

/// The thread's state.
struct Worker {
    shared: Arc<Shared>,
    ports: Vec<PortLink>,
    statics: Vec<(IpAddr, EthernetAddress)>,
    rtnl: Rtnl,
    events: Socket,
    events_buf: Vec<u8>,
    /// The ports' interfaces that exist: (name, port, ifindex).
    port_index: Vec<(String, PortId, u32)>,
    /// The last dumps.
    routes: Vec<RouteEntry>,
    neighbors: HashMap<NeighborKey, (EthernetAddress, bool)>,
    /// Exact rate limit of prods.
    last_prod: HashMap<NeighborKey, Instant>,
    started: Instant,
    warn: Throttle,
}

impl Worker {
    /// Every tick: read the notifications, send the prods, rebuild if a notification made the
    /// snapshot stale. Notifications arriving while the thread sleeps are handled together
    /// (one rebuild), and rebuilds are at least `MIN_REBUILD_INTERVAL` apart.
    fn run(mut self) {
        let mut dirty = Dirty::default();
        let mut last_rebuild = Instant::now();
        let mut retry_at: Option<Instant> = None;
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let ms =
                u64::try_from(now.duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
            self.shared
                .clock_ms
                .store(ms.saturating_add(1), Ordering::Relaxed);
            self.drain_events(&mut dirty);
            self.drain_prods(now);
            let mut wait = TICK;
            if dirty.any() {
                let due = (last_rebuild + MIN_REBUILD_INTERVAL).max(retry_at.unwrap_or(now));
                if now >= due {
                    last_rebuild = now;
                    match self.rebuild(dirty) {
                        Ok(()) => {
                            dirty = Dirty::default();
                            retry_at = None;
                        }
                        Err(e) => {
                            self.shared
                                .counters
                                .dump_errors
                                .fetch_add(1, Ordering::Relaxed);
                            if self.warn.ready() {
                                tracing::warn!(
                                    "netlink: cannot refresh routes and neighbours (keeping the previous ones, retrying every second): {e}"
                                );
                            }
                            retry_at = Some(now + RETRY);
                        }
                    }
                } else {
                    wait = due.saturating_duration_since(now).min(TICK);
                }
            }
            if self.shared.prods.is_empty() {
                std::thread::park_timeout(wait);
            }
        }
        tracing::debug!("netlink: next-hop thread stopped");
    }

    /// Reads every pending notification and notes which tables they make stale.
    fn drain_events(&mut self, dirty: &mut Dirty) {
        loop {
            let mut b: &mut [u8] = &mut self.events_buf[..];
            let n = match self
                .events
                .recv_from(&mut b, libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            {
                Ok((n, _)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Notifications were lost: only a full dump can tell what changed.
                    tracing::debug!("netlink: notifications lost (ENOBUFS), dumping everything");
                    dirty.add(Dirty::ALL);
                    continue;
                }
                Err(e) => {
                    if self.warn.ready() {
                        tracing::warn!("netlink: reading kernel notifications failed: {e}");
                    }
                    dirty.add(Dirty::ALL);
                    return;
                }
            };
            if n > self.events_buf.len() {
                dirty.add(Dirty::ALL);
                continue;
            }
            let buf = self.events_buf.get(..n).unwrap_or(&[]);
            for raw in split_messages(buf) {
                let Ok(raw) = raw else {
                    dirty.add(Dirty::ALL);
                    break;
                };
                match raw.kind {
                    NLMSG_NOOP | NLMSG_DONE | NLMSG_ERROR => continue,
                    NLMSG_OVERRUN => {
                        dirty.add(Dirty::ALL);
                        continue;
                    }
                    _ => {}
                }
                match parse_inner(&raw) {
                    Ok(m) => dirty.add(relevance(
                        &m,
                        &self.port_index,
                        &self.ports,
                        &self.neighbors,
                    )),
                    Err(e) => {
                        tracing::debug!("netlink: unparsed notification ({e}); dumping everything");
                        dirty.add(Dirty::ALL);
                    }
                }
            }
        }
    }

    fn drain_prods(&mut self, now: Instant) {
        while let Some((ifindex, ip)) = self.shared.prods.pop() {
            let key = (ifindex, ip);
            if let Some(t) = self.last_prod.get(&key)
                && now.duration_since(*t) < Duration::from_millis(PROD_INTERVAL_MS)
            {
                continue;
            }
            if self.last_prod.len() >= 4096 {
                self.last_prod.retain(|_, t| {
                    now.duration_since(*t) < Duration::from_millis(PROD_INTERVAL_MS)
                });
            }
            self.last_prod.insert(key, now);
            if self.rtnl.has_usable_neighbor(ifindex, ip) {
                // Resolved since the snapshot (its notification is on its way): nothing to do.
                continue;
            }
            match self.rtnl.prod(ifindex, ip) {
                Ok(()) => {
                    self.shared
                        .counters
                        .prods_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.shared
                        .counters
                        .prod_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if self.warn.ready() {
                        tracing::warn!(
                            "netlink: cannot ask the kernel to resolve {ip} on interface {ifindex}: {e}"
                        );
                    }
                }
            }
        }
    }

    /// Dumps what `dirty` says and publishes a new snapshot. An inconsistent dump (the kernel
    /// flags it when the table changed meanwhile) is retried up to three times.
    fn rebuild(&mut self, dirty: Dirty) -> Result<(), NetlinkError> {
        let all = dirty.has(Dirty::LINKS);
        if all {
            let mut idx = Vec::new();
            for p in &self.ports {
                if let Some((ifindex, _, _)) = self.rtnl.get_link(&p.ifname)? {
                    idx.push((p.ifname.clone(), p.port, ifindex));
                }
            }
            if idx.len() != self.port_index.len()
                || idx.iter().zip(&self.port_index).any(|(a, b)| a != b)
            {
                tracing::info!("netlink: port interfaces now {idx:?}");
            }
            self.port_index = idx;
        }
        if all || dirty.has(Dirty::ROUTES) {
            for attempt in 0..3 {
                let (routes, o) = self.rtnl.dump_routes()?;
                self.routes = routes;
                if !o.interrupted {
                    break;
                }
                tracing::debug!("netlink: route dump interrupted (attempt {attempt})");
            }
        }
        if all || dirty.has(Dirty::NEIGHBORS) {
            for attempt in 0..3 {
                let (n, o) = self.rtnl.dump_neighbors()?;
                self.neighbors = n
                    .into_iter()
                    .map(|n| ((n.ifindex, n.ip), (n.mac, n.stale)))
                    .collect();
                if !o.interrupted {
                    break;
                }
                tracing::debug!("netlink: neighbour dump interrupted (attempt {attempt})");
            }
        }
        let neighbors: Vec<Neighbor> = self
            .neighbors
            .iter()
            .map(|(&(ifindex, ip), &(mac, stale))| Neighbor {
                ifindex,
                ip,
                mac,
                stale,
            })
            .collect();
        let ports = self.port_index.iter().map(|(_, p, i)| (*p, *i)).collect();
        let snap = Snapshot::new(ports, &self.routes, &neighbors, &self.statics);
        self.shared.snapshot.store(Arc::new(snap));
        self.shared
            .counters
            .rebuilds
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Which tables a notification makes stale.
fn relevance(
    m: &RouteNetlinkMessage,
    port_index: &[(String, PortId, u32)],
    ports: &[PortLink],
    neighbors: &HashMap<NeighborKey, (EthernetAddress, bool)>,
) -> Dirty {
    match m {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
            let ours = port_index.iter().any(|(_, _, i)| *i == l.header.index)
                || l.attributes.iter().any(|a| {
                    matches!(a, LinkAttribute::IfName(n) if ports.iter().any(|p| p.ifname == *n))
                });
            if ours { Dirty::ALL } else { Dirty::default() }
        }
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            if is_main_table(r) {
                Dirty::ROUTES
            } else {
                Dirty::default()
            }
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            if !port_index.iter().any(|(_, _, i)| *i == n.header.ifindex) {
                return Dirty::default();
            }
            let Some((key, usable)) = neighbor_of(n) else {
                return Dirty::NEIGHBORS;
            };
            let usable = if matches!(m, RouteNetlinkMessage::DelNeighbour(_)) {
                None
            } else {
                usable
            };
            // Only what changes a lookup's answer: the MAC, usability, staleness.
            if neighbors.get(&key).copied() == usable {
                Dirty::default()
            } else {
                Dirty::NEIGHBORS
            }
        }
        _ => Dirty::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteNextHop;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    const M1: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const M2: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
    const M3: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 3]);
    const WAN: u32 = 10;
    const LAN: u32 = 20;
    const OTHER: u32 = 30;

    fn out(dst: &str, len: u8, metric: u32, ifindex: u32, gw: Option<&str>) -> RouteEntry {
        RouteEntry::new(
            ip(dst),
            len,
            metric,
            Target::Out {
                ifindex,
                gateway: gw.map(ip),
            },
        )
    }

    fn neigh(ifindex: u32, a: &str, mac: EthernetAddress, stale: bool) -> Neighbor {
        Neighbor {
            ifindex,
            ip: ip(a),
            mac,
            stale,
        }
    }

    fn snap(routes: &[RouteEntry], neighbors: &[Neighbor]) -> Snapshot {
        Snapshot::new(
            vec![(PortId::Wan, WAN), (PortId::Lan, LAN)],
            routes,
            neighbors,
            &[],
        )
    }

    #[test]
    fn neighbour_state_filter() {
        for s in [
            NUD_REACHABLE,
            NUD_STALE,
            NUD_DELAY,
            NUD_PROBE,
            NUD_PERMANENT,
            NUD_NOARP,
        ] {
            assert!(usable_state(s), "{s:#x}");
        }
        for s in [0, NUD_INCOMPLETE, NUD_FAILED, 0x100, NUD_FAILED | NUD_STALE] {
            assert!(!usable_state(s), "{s:#x}");
        }
    }

    #[test]
    fn longest_prefix_wins_then_metric() {
        let s = snap(
            &[
                out("0.0.0.0", 0, 0, WAN, Some("203.0.113.254")),
                out("203.0.113.0", 24, 0, WAN, None),
                out("198.51.100.0", 24, 200, WAN, Some("203.0.113.1")),
                out("198.51.100.0", 24, 100, WAN, Some("203.0.113.2")),
                out("198.51.100.128", 25, 300, LAN, Some("10.0.0.9")),
                out("10.0.0.0", 8, 0, LAN, None),
            ],
            &[],
        );
        assert_eq!(
            s.next_hop_via(PortId::Wan, ip("203.0.113.7")),
            Ok((WAN, ip("203.0.113.7")))
        );
        assert_eq!(
            s.next_hop_via(PortId::Wan, ip("192.0.2.1")),
            Ok((WAN, ip("203.0.113.254")))
        );
        // Equal prefixes: the lower metric.
        assert_eq!(
            s.next_hop_via(PortId::Wan, ip("198.51.100.7")),
            Ok((WAN, ip("203.0.113.2")))
        );
        // The /25 is out of the LAN: for the WAN port the /24 applies; route() takes the /25.
        assert_eq!(
            s.next_hop_via(PortId::Wan, ip("198.51.100.200")),
            Ok((WAN, ip("203.0.113.2")))
        );
        assert_eq!(
            s.next_hop(ip("198.51.100.200")),
            Ok((PortId::Lan, LAN, ip("10.0.0.9")))
        );
        assert_eq!(
            s.next_hop_via(PortId::Lan, ip("10.200.0.1")),
            Ok((LAN, ip("10.200.0.1")))
        );
        // No LAN route to it.
        assert_eq!(
            s.next_hop_via(PortId::Lan, ip("192.0.2.1")),
            Err(DropReason::NoRoute)
        );
        assert_eq!(
            s.next_hop_via(PortId::Host, ip("192.0.2.1")),
            Err(DropReason::NoRoute)
        );
        // No IPv6 routes at all.
        assert_eq!(s.next_hop(ip("2001:db8::1")), Err(DropReason::NoRoute));
    }

    #[test]
    fn ipv6_and_default_routes() {
        let s = snap(
            &[
                out("::", 0, 1024, WAN, Some("fe80::1")),
                out("2001:db8:1::", 64, 256, WAN, None),
                out("2001:db8:2::", 48, 1024, LAN, Some("2001:db8:1::fe")),
                out("fe80::", 64, 256, WAN, None),
            ],
            &[
                neigh(WAN, "fe80::1", M1, false),
                neigh(WAN, "2001:db8:1::5", M2, false),
            ],
        );
        assert_eq!(
            s.next_hop(ip("2001:db8:99::1")),
            Ok((PortId::Wan, WAN, ip("fe80::1")))
        );
        assert_eq!(s.mac(WAN, ip("fe80::1")), Mac::Known(M1));
        assert_eq!(
            s.next_hop_via(PortId::Wan, ip("2001:db8:1::5")),
            Ok((WAN, ip("2001:db8:1::5")))
        );
        assert_eq!(
            s.next_hop(ip("2001:db8:2:3::4")),
            Ok((PortId::Lan, LAN, ip("2001:db8:1::fe")))
        );
        // An IPv4 destination never matches ::/0.
        assert_eq!(s.next_hop(ip("192.0.2.1")), Err(DropReason::NoRoute));
    }

    #[test]
    fn foreign_and_reject_routes_shadow_route_but_not_resolve() {
        let s = snap(
            &[
                out("0.0.0.0", 0, 0, WAN, Some("203.0.113.254")),
                out("192.0.2.0", 24, 0, OTHER, None),
                RouteEntry::new(ip("198.51.100.0"), 24, 0, Target::Reject),
            ],
            &[],
        );
        assert_eq!(s.next_hop(ip("192.0.2.1")), Err(DropReason::NoRoute));
        assert_eq!(s.next_hop(ip("198.51.100.1")), Err(DropReason::NoRoute));
        assert_eq!(
            s.next_hop(ip("203.0.113.9")),
            Ok((PortId::Wan, WAN, ip("203.0.113.254")))
        );
        assert_eq!(
            s.next_hop_via(PortId::Wan, ip("192.0.2.1")),
            Ok((WAN, ip("203.0.113.254")))
        );
    }

    #[test]
    fn multipath_prefers_a_port_among_equals() {
        let s = snap(
            &[
                out("192.0.2.0", 24, 5, OTHER, Some("10.9.9.9")),
                out("192.0.2.0", 24, 5, WAN, Some("203.0.113.9")),
            ],
            &[],
        );
        assert_eq!(
            s.next_hop(ip("192.0.2.1")),
            Ok((PortId::Wan, WAN, ip("203.0.113.9")))
        );
    }

    #[test]
    fn neighbours_statics_and_staleness() {
        let mut s = snap(
            &[],
            &[
                neigh(WAN, "203.0.113.1", M1, false),
                neigh(WAN, "203.0.113.2", M2, true),
                neigh(OTHER, "203.0.113.3", M3, false),
            ],
        );
        assert_eq!(s.mac(WAN, ip("203.0.113.1")), Mac::Known(M1));
        assert_eq!(s.mac(WAN, ip("203.0.113.2")), Mac::Stale(M2));
        // Only neighbours on the ports' interfaces are kept, and per interface.
        assert_eq!(s.mac(OTHER, ip("203.0.113.3")), Mac::Missing);
        assert_eq!(s.mac(LAN, ip("203.0.113.1")), Mac::Missing);
        assert_eq!(s.neighbors.len(), 2);
        s = Snapshot::new(
            s.ports.clone(),
            &[],
            &s.neighbors.clone(),
            &[(ip("203.0.113.1"), M3), (ip("192.0.2.1"), M2)],
        );
        assert_eq!(s.mac(WAN, ip("203.0.113.1")), Mac::Known(M3));
        assert_eq!(s.mac(LAN, ip("192.0.2.1")), Mac::Known(M2));
    }

    #[test]
    fn masks() {
        assert_eq!(mask(false, 0), 0);
        assert_eq!(mask(false, 24), 0xffff_ff00);
        assert_eq!(mask(false, 32), 0xffff_ffff);
        assert_eq!(mask(false, 99), 0xffff_ffff);
        assert_eq!(mask(true, 0), 0);
        assert_eq!(mask(true, 1), 1u128 << 127);
        assert_eq!(mask(true, 128), u128::MAX);
        let r = RouteEntry::new(ip("192.0.2.77"), 24, 0, Target::Reject);
        assert_eq!(r.net, 0xc000_0200);
    }

    fn route_msg(family: AddressFamily, len: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family;
        m.header.destination_prefix_length = len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        m.attributes = attrs;
        m
    }

    #[test]
    fn route_messages_to_entries() {
        let mut v = Vec::new();
        // Default route: no RTA_DST.
        route_entries(
            &route_msg(
                AddressFamily::Inet,
                0,
                vec![
                    RouteAttribute::Gateway(RouteAddress::Inet("203.0.113.254".parse().unwrap())),
                    RouteAttribute::Oif(WAN),
                    RouteAttribute::Priority(7),
                ],
            ),
            &mut v,
        );
        assert_eq!(v, vec![out("0.0.0.0", 0, 7, WAN, Some("203.0.113.254"))]);
        // IPv4 via an IPv6 gateway.
        v.clear();
        route_entries(
            &route_msg(
                AddressFamily::Inet,
                24,
                vec![
                    RouteAttribute::Destination(RouteAddress::Inet("192.0.2.0".parse().unwrap())),
                    RouteAttribute::Via(RouteVia::Inet6("fe80::1".parse().unwrap())),
                    RouteAttribute::Oif(WAN),
                ],
            ),
            &mut v,
        );
        assert_eq!(v, vec![out("192.0.2.0", 24, 0, WAN, Some("fe80::1"))]);
        // Multipath.
        v.clear();
        let mut h1 = RouteNextHop::default();
        h1.interface_index = WAN;
        h1.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet6(
            "2001:db8::1".parse().unwrap(),
        ))];
        let mut h2 = RouteNextHop::default();
        h2.interface_index = LAN;
        route_entries(
            &route_msg(
                AddressFamily::Inet6,
                32,
                vec![
                    RouteAttribute::Destination(RouteAddress::Inet6("2001:db8::".parse().unwrap())),
                    RouteAttribute::MultiPath(vec![h1, h2]),
                ],
            ),
            &mut v,
        );
        assert_eq!(
            v,
            vec![
                out("2001:db8::", 32, 0, WAN, Some("2001:db8::1")),
                out("2001:db8::", 32, 0, LAN, None)
            ]
        );
        // Other tables (also via RTA_TABLE), cloned routes, local routes, source-specific routes.
        v.clear();
        let mut m = route_msg(AddressFamily::Inet, 32, vec![RouteAttribute::Oif(WAN)]);
        m.header.table = 255;
        route_entries(&m, &mut v);
        let mut m = route_msg(
            AddressFamily::Inet,
            32,
            vec![RouteAttribute::Oif(WAN), RouteAttribute::Table(1000)],
        );
        m.header.table = 252;
        route_entries(&m, &mut v);
        let mut m = route_msg(AddressFamily::Inet6, 128, vec![RouteAttribute::Oif(WAN)]);
        m.header.flags = RouteFlags::Cloned;
        route_entries(&m, &mut v);
        let mut m = route_msg(AddressFamily::Inet, 32, vec![RouteAttribute::Oif(WAN)]);
        m.header.kind = RouteType::Local;
        route_entries(&m, &mut v);
        let mut m = route_msg(AddressFamily::Inet6, 64, vec![RouteAttribute::Oif(WAN)]);
        m.header.source_prefix_length = 48;
        route_entries(&m, &mut v);
        assert!(v.is_empty(), "{v:?}");
        // Blackhole.
        let mut m = route_msg(
            AddressFamily::Inet,
            16,
            vec![RouteAttribute::Destination(RouteAddress::Inet(
                "10.1.0.0".parse().unwrap(),
            ))],
        );
        m.header.kind = RouteType::BlackHole;
        route_entries(&m, &mut v);
        assert_eq!(
            v,
            vec![RouteEntry::new(ip("10.1.0.0"), 16, 0, Target::Reject)]
        );
    }

    fn neigh_msg(state: NeighbourState, mac: Option<Vec<u8>>) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = WAN;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                "203.0.113.1".parse().unwrap(),
            )));
        if let Some(mac) = mac {
            m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac));
        }
        m
    }

    #[test]
    fn neighbour_messages() {
        let key = (WAN, ip("203.0.113.1"));
        let mac = Some(M1.0.to_vec());
        assert_eq!(
            neighbor_of(&neigh_msg(NeighbourState::Reachable, mac.clone())),
            Some((key, Some((M1, false))))
        );
        assert_eq!(
            neighbor_of(&neigh_msg(NeighbourState::Stale, mac.clone())),
            Some((key, Some((M1, true))))
        );
        assert_eq!(
            neighbor_of(&neigh_msg(NeighbourState::Incomplete, None)),
            Some((key, None))
        );
        assert_eq!(
            neighbor_of(&neigh_msg(NeighbourState::Failed, mac.clone())),
            Some((key, None))
        );
        // Not a 6-byte MAC.
        assert_eq!(
            neighbor_of(&neigh_msg(NeighbourState::Permanent, Some(vec![1, 2, 3]))),
            Some((key, None))
        );
        // Relevance: the same answer again is not worth a dump.
        let idx = vec![("wan0".to_string(), PortId::Wan, WAN)];
        let mut known = HashMap::new();
        let m =
            RouteNetlinkMessage::NewNeighbour(neigh_msg(NeighbourState::Reachable, mac.clone()));
        assert_eq!(relevance(&m, &idx, &[], &known), Dirty::NEIGHBORS);
        known.insert(key, (M1, false));
        assert_eq!(relevance(&m, &idx, &[], &known), Dirty::default());
        let m = RouteNetlinkMessage::DelNeighbour(neigh_msg(NeighbourState::Reachable, mac));
        assert_eq!(relevance(&m, &idx, &[], &known), Dirty::NEIGHBORS);
        let m = RouteNetlinkMessage::NewNeighbour(neigh_msg(NeighbourState::Incomplete, None));
        assert_eq!(relevance(&m, &[], &[], &known), Dirty::default());
    }

    #[test]
    fn prod_filter_rate_limits() {
        let f = ProdFilter::new();
        let a = ip("203.0.113.1");
        assert!(f.admit(WAN, a, 1));
        assert!(!f.admit(WAN, a, 2));
        assert!(!f.admit(WAN, a, 1000));
        assert!(f.admit(WAN, a, 1001));
        // Another address or interface is independent (barring a collision, not here).
        assert!(f.admit(LAN, a, 1002));
        assert!(f.admit(WAN, ip("203.0.113.2"), 1002));
    }

    #[test]
    fn message_splitting_survives_garbage() {
        // A valid NLMSG_DONE followed by a truncated header.
        let mut b = Vec::new();
        b.extend_from_slice(&20u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&7u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&0i32.to_ne_bytes());
        b.extend_from_slice(&[1, 2, 3]);
        let v = split_messages(&b);
        assert_eq!(v.len(), 2);
        assert!(matches!(&v[0], Ok(m) if m.kind == NLMSG_DONE && m.seq == 7));
        assert!(v[1].is_err());
        // Length fields that lie, random bytes: never a panic.
        let mut x: u64 = 0x1234_5678;
        for n in 0..2000usize {
            let mut buf = Vec::new();
            for _ in 0..(n % 97) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            if n % 3 == 0 && buf.len() >= 16 {
                let l = buf.len() as u32;
                buf[0..4].copy_from_slice(&l.to_ne_bytes());
                buf[4..6].copy_from_slice(&(16 + (n % 80) as u16).to_ne_bytes());
            }
            for m in split_messages(&buf).into_iter().flatten() {
                let _ = parse_inner(&m);
                let _ = error_code(&m);
            }
        }
    }

    #[test]
    fn interface_names() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a23456789012345").is_ok());
        for bad in ["", "a234567890123456", "a/b", "a b", "a:1", ".."] {
            assert!(
                matches!(check_ifname(bad), Err(NetlinkError::BadInterfaceName(_))),
                "{bad:?}"
            );
        }
    }
}
