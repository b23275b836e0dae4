//! Security associations: what is installed, the hot runtime state, counters and lifetimes.
//!
//! An [`Sa`] keeps its cold configuration (addresses, selectors, names) next to hot runtime
//! state: the outbound sequence counter, the inbound anti-replay window and the counters, kept
//! off the cache lines of the read-mostly fields so that workers on different cores do not
//! false-share.
//! Everything a worker changes is atomic: several workers may process the same SA at once.
//!
//! Lifetimes (RFC 4301 §4.4.2.1) are enforced here, in the data plane: crossing a soft limit
//! queues a [`Event`] once (the control process rekeys), crossing a hard limit stops the SA and
//! queues another. Outbound sequence numbers never wrap: the SA stops at the last number.

use crate::antireplay::ReplayWindow;
use crate::counters::{DropReason, DropReasonArray};
use crate::policy::Selector;
use espgw_crypto::{SaCrypto, Transform};
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

/// Handle of an installed SA: a slot in the SA table and the generation of that slot, so that a
/// stale handle never reaches a newer SA that reuses the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SaId(pub u64);

impl SaId {
    pub(crate) fn new(slot: u32, generation: u32) -> Self {
        SaId(u64::from(generation) << 32 | u64::from(slot))
    }
    /// Slot index in the table.
    pub fn slot(self) -> u32 {
        self.0 as u32
    }
    /// Generation of the slot.
    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Direction of an SA, seen from this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// We decrypt.
    In,
    /// We encrypt.
    Out,
}

/// ESP mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A whole IP packet inside, new outer header (gateway to gateway).
    Tunnel,
    /// The packet's own payload inside, its header kept (host to host, e.g. GRE or L2TP).
    Transport,
}

/// UDP encapsulation (RFC 3948) ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct UdpEncap {
    /// Our port (outer source port when sending).
    pub sport: u16,
    /// The peer's port (outer destination port when sending; NAT-T may make it ≠ 4500).
    pub dport: u16,
}

/// How the outer DF bit is set in tunnel mode (RFC 4301 §8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DfMode {
    /// From an IPv4 inner header; set for an IPv6 inner packet (IPv6 is never fragmented in flight).
    Copy,
    /// Always set.
    Set,
    /// Always clear.
    Clear,
}

/// How the outer DSCP is set in tunnel mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DscpMode {
    /// Copy from the inner header.
    Copy,
    /// A fixed value.
    Set(u8),
}

/// ECN handling in tunnel mode (RFC 6040).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EcnMode {
    /// Normal mode: copy ECN outward, combine on decapsulation.
    Normal,
    /// Compatibility mode: outer header Not-ECT.
    Compat,
}

/// Soft and hard limits; `None` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Lifetime {
    /// Soft limit on bytes (inner packet bytes).
    pub soft_bytes: Option<u64>,
    /// Hard limit on bytes.
    pub hard_bytes: Option<u64>,
    /// Soft limit on packets.
    pub soft_packets: Option<u64>,
    /// Hard limit on packets.
    pub hard_packets: Option<u64>,
    /// Soft limit in seconds since installation.
    pub soft_seconds: Option<u64>,
    /// Hard limit in seconds since installation.
    pub hard_seconds: Option<u64>,
}

/// Everything needed to install an SA. Keys are zeroized when this is dropped.
#[derive(Debug)]
pub struct SaParams {
    /// Operator's name for the SA (unique).
    pub name: String,
    /// In or out.
    pub direction: Direction,
    /// Security parameter index.
    pub spi: u32,
    /// Tunnel or transport.
    pub mode: Mode,
    /// Our address (outer source when sending, outer destination when receiving).
    pub local: IpAddr,
    /// The peer's address.
    pub remote: IpAddr,
    /// ESP in UDP, if set.
    pub encap: Option<UdpEncap>,
    /// Algorithms.
    pub transform: Transform,
    /// Key material (encryption key incl. GCM salt, integrity key).
    pub keys: espgw_crypto::SaKeys,
    /// Extended sequence numbers.
    pub esn: bool,
    /// Anti-replay window in packets (inbound; 0 = off).
    pub replay_window: u32,
    /// Outbound: the last sequence number already used (the first packet gets this + 1).
    pub initial_seq: u64,
    /// Limits.
    pub lifetime: Lifetime,
    /// Inbound: allowed inner traffic (empty = any). Outbound: informational.
    pub selectors: Vec<Selector>,
    /// Outer DF.
    pub df: DfMode,
    /// Outer DSCP.
    pub dscp: DscpMode,
    /// ECN.
    pub ecn: EcnMode,
    /// Outer TTL / hop limit in tunnel mode.
    pub outer_ttl: u8,
    /// Alignment of payload + trailer (a power of two, a multiple of the transform's own);
    /// `None`: the cipher's block (16 for AES, GCM included; 8 for 3DES; 4 for NULL).
    pub pad_align: Option<usize>,
}

/// The default padding alignment of a transform: whole cipher blocks. For AES-GCM that is more
/// than RFC 4106's minimum of 4 bytes, but ring's AES-GCM handles a partial last block on a slow
/// path (68 bytes cost 40 % more than 80 here), so up to 12 bytes of padding buy ~25 ns per
/// small packet.
pub fn default_pad_align(t: Transform) -> usize {
    match t {
        Transform::Aead { .. } => 16,
        Transform::CipherAuth { .. } => t.block_align(),
    }
}

/// Which limit an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// Bytes.
    Bytes,
    /// Packets.
    Packets,
    /// Seconds.
    Seconds,
    /// Outbound sequence numbers.
    SequenceNumber,
}

/// What happened to an SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EventKind {
    /// A soft limit was crossed: time to rekey.
    SoftExpired {
        /// Which limit.
        limit: Limit,
    },
    /// A hard limit was crossed: the SA no longer carries traffic.
    HardExpired {
        /// Which limit.
        limit: Limit,
    },
    /// Outbound: 1/16 of the sequence number space is left (sent before the soft expiry that
    /// goes with it).
    SeqNearExhaustion,
    /// Inbound: the first authenticated packet arrived (the peer uses the SA).
    FirstPacket,
    /// No packet for `seconds` (once per idle period; for DPD and idle teardown).
    Idle {
        /// The idle threshold that was crossed.
        seconds: u64,
    },
    /// Inbound, UDP-encapsulated: an authenticated packet came from another address or port
    /// than the SA's peer (a NAT rebinding); reported once per new mapping.
    NatMappingChanged {
        /// The new outer source address.
        src: IpAddr,
        /// The new outer source port.
        sport: u16,
    },
}

/// An SA event for the control process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Event {
    /// When (data-plane clock, nanoseconds).
    pub at_ns: u64,
    /// Which SA.
    pub sa: SaId,
    /// Its SPI.
    pub spi: u32,
    /// Its direction.
    pub direction: Direction,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// ESP for an SPI no inbound SA has (RFC 4301 §6.1.2: the control process may tell the peer,
/// e.g. with an IKEv1 INVALID-SPI notification). Rate-limited by the SA database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UnknownSpi {
    /// When (data-plane clock, nanoseconds).
    pub at_ns: u64,
    /// The SPI.
    pub spi: u32,
    /// Outer source address.
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// UDP source port (0: plain ESP).
    pub sport: u16,
    /// UDP destination port (0: plain ESP).
    pub dport: u16,
}

/// Counters of one SA, in Cisco `show crypto ipsec sa` terms.
#[derive(Debug, Default)]
pub struct SaCounters {
    /// Packets encapsulated (out) or decapsulated (in).
    pub packets: AtomicU64,
    /// Inner bytes (out: before encryption; in: after decryption).
    pub bytes: AtomicU64,
    /// ESP bytes (SPI through ICV, without outer IP/UDP headers).
    pub esp_bytes: AtomicU64,
    /// Packets encrypted / decrypted (not counted for NULL encryption).
    pub ciphered: AtomicU64,
    /// Packets whose ICV was computed / verified.
    pub icv: AtomicU64,
    /// Time of the last packet (data-plane clock, ns).
    pub last_used_ns: AtomicU64,
    /// Drops attributed to this SA.
    pub drops: DropReasonArray,
}

/// A snapshot of [`SaCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SaCountersSnapshot {
    /// See [`SaCounters::packets`].
    pub packets: u64,
    /// See [`SaCounters::bytes`].
    pub bytes: u64,
    /// See [`SaCounters::esp_bytes`].
    pub esp_bytes: u64,
    /// See [`SaCounters::ciphered`].
    pub ciphered: u64,
    /// See [`SaCounters::icv`].
    pub icv: u64,
}

/// Counts one worker gathered for one SA over a run of packets; added to the SA in one go.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunCounts {
    /// Packets.
    pub packets: u64,
    /// Inner bytes.
    pub bytes: u64,
    /// ESP bytes.
    pub esp_bytes: u64,
}

const STATE_SOFT: u8 = 1;
const STATE_HARD: u8 = 2;
/// Inbound: an authenticated packet has been counted (FirstPacket was sent).
const STATE_USED: u8 = 4;
/// An Idle event was sent and no packet has been counted since.
const STATE_IDLE: u8 = 8;

/// The parts of an SA an update may change in place: where its packets go and come from (a NAT
/// rebinding moves the peer's address or port). Family and "UDP-encapsulated or not" are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// The peer's outer address.
    pub remote: IpAddr,
    /// UDP encapsulation ports.
    pub encap: Option<UdpEncap>,
}

/// Lifetime limits workers read while an update may change them (`u64::MAX`: no limit).
#[derive(Debug)]
struct Limits([AtomicU64; 6]);

impl Limits {
    const NONE: u64 = u64::MAX;
    const SOFT_BYTES: usize = 0;
    const HARD_BYTES: usize = 1;
    const SOFT_PACKETS: usize = 2;
    const HARD_PACKETS: usize = 3;
    const SOFT_SECONDS: usize = 4;
    const HARD_SECONDS: usize = 5;

    fn new(l: Lifetime) -> Self {
        let x = Limits(std::array::from_fn(|_| AtomicU64::new(Self::NONE)));
        x.set(l);
        x
    }

    fn set(&self, l: Lifetime) {
        for (i, v) in [
            l.soft_bytes,
            l.hard_bytes,
            l.soft_packets,
            l.hard_packets,
            l.soft_seconds,
            l.hard_seconds,
        ]
        .into_iter()
        .enumerate()
        {
            // A limit of u64::MAX can never be reached: the same as none.
            self.0[i].store(v.unwrap_or(Self::NONE), Ordering::Relaxed);
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<u64> {
        let v = self.0[i].load(Ordering::Relaxed);
        (v != Self::NONE).then_some(v)
    }

    fn lifetime(&self) -> Lifetime {
        Lifetime {
            soft_bytes: self.get(Self::SOFT_BYTES),
            hard_bytes: self.get(Self::HARD_BYTES),
            soft_packets: self.get(Self::SOFT_PACKETS),
            hard_packets: self.get(Self::HARD_PACKETS),
            soft_seconds: self.get(Self::SOFT_SECONDS),
            hard_seconds: self.get(Self::HARD_SECONDS),
        }
    }
}

/// Why an SA update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    /// The new peer address is of the other family.
    #[error("new remote {0} is of another address family")]
    Family(IpAddr),
    /// UDP encapsulation would be switched on or off.
    #[error("UDP encapsulation cannot be switched on or off in place; rekey instead")]
    Encapsulation,
    /// A soft limit above its hard limit.
    #[error("a soft lifetime is above its hard lifetime")]
    SoftAboveHard,
}

/// The last outbound sequence number a 32-bit or ESN SA may use.
fn seq_limit(esn: bool) -> u64 {
    if esn { u64::MAX } else { u64::from(u32::MAX) }
}

/// An installed SA.
///
/// `repr(C)` with the fields in this order so that what the workers read per packet sits in few
/// cache lines, whatever the compiler would choose: the first 64 bytes hold everything
/// [`crate::sadb::SaDb::lookup_inbound`] checks (SPI, direction, local address, shared SPI) and
/// the state and crypto pointer; the next 64 the replay window's header and the lengths. The
/// outbound sequence number and the counters, which the workers write, come last, with
/// [`APART`] bytes on both sides: no other field, and nothing the allocator puts after the SA,
/// can share a cache line with them.
///
/// The struct is deliberately not aligned to a cache line (its alignment is at most 16, the
/// allocator's own): an over-aligned type takes glibc's `posix_memalign` path, which split and
/// consolidated chunks on nearly every SA install (5-10% of the SA ring's install rate).
/// The padding gives the same isolation without it. The layout is checked by a test.
#[repr(C)]
pub struct Sa {
    // Bytes 0-63.
    /// SPI.
    pub spi: u32,
    /// In or out.
    pub direction: Direction,
    /// Another inbound SA has the same SPI: lookups must also match the destination address.
    pub(crate) shared_spi: AtomicBool,
    state: AtomicU8,
    /// ESN.
    pub esn: bool,
    /// Our address.
    pub local: IpAddr,
    /// ESP in UDP (fixed for the SA's life; the ports are in [`Sa::peer`]).
    pub udp_encap: bool,
    /// Tunnel or transport.
    pub mode: Mode,
    /// Keys and algorithms; zeroized on drop.
    pub crypto: Box<dyn SaCrypto>,
    /// Handle.
    pub id: SaId,
    // Bytes 64-127.
    /// Inbound: anti-replay window (and highest number seen, for ESN).
    pub replay: ReplayWindow,
    /// IV length (cached from the transform).
    pub iv_len: usize,
    /// ICV length.
    pub icv_len: usize,
    /// Alignment of payload + trailer for packets we send.
    pub pad_align: usize,
    // The rest: read once per run of packets, or by the control side.
    /// Limits ([`Sa::lifetime`]; an update may change them).
    limits: Limits,
    /// Peer's address and UDP ports ([`Sa::peer`]; an update may change them).
    peer: arc_swap::ArcSwap<Peer>,
    /// Inbound, UDP-encapsulated: a hash of the last NAT mapping reported (0: none).
    nat_reported: AtomicU64,
    /// When installed (data-plane clock, ns).
    pub installed_ns: u64,
    /// Selectors.
    pub selectors: Vec<Selector>,
    /// Hash of `name` in the SA database's name table (set at install, before the SA is
    /// published).
    pub(crate) name_hash: u64,
    /// Operator's name.
    pub name: String,
    /// Algorithms.
    pub transform: Transform,
    /// DF.
    pub df: DfMode,
    /// DSCP.
    pub dscp: DscpMode,
    /// ECN.
    pub ecn: EcnMode,
    /// Outer TTL.
    pub outer_ttl: u8,
    /// Keeps the fields above off the lines of `seq` and `counters`.
    _apart_before: [u8; APART],
    /// Outbound: the last sequence number handed out.
    seq: AtomicU64,
    /// Counters.
    pub counters: SaCounters,
    /// Keeps whatever follows the SA in memory off the lines of `counters`.
    _apart_after: [u8; APART],
}

/// Padding that keeps a field off every cache line a field at least this far away uses, for a
/// struct aligned to 8 or more: a 64-byte line that holds a byte of the field reaches at most
/// 56 bytes beyond it on either side.
pub const APART: usize = 56;
const _: () = assert!(APART >= 64 - 8 && align_of::<Sa>() >= 8);

impl fmt::Debug for Sa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No key material: `crypto` prints only its algorithm.
        f.debug_struct("Sa")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("direction", &self.direction)
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("mode", &self.mode)
            .field("local", &self.local)
            .field("peer", &**self.peer.load())
            .field("transform", &self.transform.name())
            .finish_non_exhaustive()
    }
}

impl Sa {
    /// Build the runtime SA from its parameters (the keys are consumed into the crypto context
    /// and the parameter copy is zeroized when `p` drops).
    pub fn new(id: SaId, p: SaParams, crypto: Box<dyn SaCrypto>, now_ns: u64) -> Self {
        let t = p.transform;
        Sa {
            id,
            name: p.name,
            direction: p.direction,
            spi: p.spi,
            mode: p.mode,
            local: p.local,
            peer: arc_swap::ArcSwap::from_pointee(Peer {
                remote: p.remote,
                encap: p.encap,
            }),
            udp_encap: p.encap.is_some(),
            transform: t,
            esn: p.esn,
            limits: Limits::new(p.lifetime),
            selectors: p.selectors,
            name_hash: 0,
            df: p.df,
            dscp: p.dscp,
            ecn: p.ecn,
            outer_ttl: p.outer_ttl,
            installed_ns: now_ns,
            crypto,
            iv_len: t.iv_len(),
            icv_len: t.icv_len(),
            pad_align: p.pad_align.unwrap_or_else(|| default_pad_align(t)),
            shared_spi: AtomicBool::new(false),
            state: AtomicU8::new(0),
            nat_reported: AtomicU64::new(0),
            _apart_before: [0; APART],
            seq: AtomicU64::new(p.initial_seq),
            replay: ReplayWindow::new(if p.direction == Direction::In {
                p.replay_window
            } else {
                0
            }),
            counters: SaCounters::default(),
            _apart_after: [0; APART],
        }
    }

    /// Start loading what the inbound path will read of this SA for a packet with these low
    /// sequence-number bits: the fields checked before decryption, the replay word, the key
    /// material, the selectors and the counters. A hint only (see
    /// [`espgw_crypto::prefetch_lines`]); with many SAs it lets a burst's cache misses overlap.
    #[inline]
    pub fn prefetch_inbound(&self, seq_low: u32) {
        let line = |p: *const u8| espgw_crypto::prefetch_lines(p, 1);
        // The first 128 bytes: the lookup fields, the state, the crypto pointer, the replay
        // window's header and the lengths (two or three lines: an Sa is not line aligned).
        espgw_crypto::prefetch_lines(std::ptr::from_ref(self).cast(), 128);
        line(std::ptr::from_ref(&self.limits).cast());
        line(std::ptr::from_ref(&self.crypto).cast());
        line(std::ptr::from_ref(&self.selectors).cast());
        line(std::ptr::from_ref(&self.counters).cast());
        self.replay.prefetch(seq_low);
        self.crypto.prefetch();
        line(self.selectors.as_ptr().cast());
    }

    /// Has the SA reached a hard limit?
    #[inline]
    pub fn is_dead(&self) -> bool {
        self.state.load(Ordering::Relaxed) & STATE_HARD != 0
    }

    /// Does the SA have any hard limit (so that packets must be checked against it)?
    #[inline]
    pub fn has_hard_limits(&self) -> bool {
        self.limits.get(Limits::HARD_BYTES).is_some()
            || self.limits.get(Limits::HARD_PACKETS).is_some()
            || self.limits.get(Limits::HARD_SECONDS).is_some()
    }

    /// The peer's address and UDP ports now. Cheap (no reference count is touched); hold it
    /// only briefly, like any `arc_swap` guard.
    #[inline]
    pub fn peer(&self) -> arc_swap::Guard<std::sync::Arc<Peer>> {
        self.peer.load()
    }

    /// The limits now.
    pub fn lifetime(&self) -> Lifetime {
        self.limits.lifetime()
    }

    /// Change the peer's address/ports and the limits in place (a NAT rebinding, new lifetimes),
    /// keeping keys, sequence numbers, the replay window and the counters. Limits still count
    /// from the installation; a limit already crossed is signalled now. An SA that reached a
    /// hard limit stays stopped.
    pub fn update(
        &self,
        peer: Peer,
        lifetime: Lifetime,
        now_ns: u64,
        events: &EventSink<'_>,
    ) -> Result<(), UpdateError> {
        if peer.remote.is_ipv4() != self.local.is_ipv4() {
            return Err(UpdateError::Family(peer.remote));
        }
        if peer.encap.is_some() != self.udp_encap {
            return Err(UpdateError::Encapsulation);
        }
        let l = &lifetime;
        for (soft, hard) in [
            (l.soft_bytes, l.hard_bytes),
            (l.soft_packets, l.hard_packets),
            (l.soft_seconds, l.hard_seconds),
        ] {
            if let (Some(s), Some(h)) = (soft, hard)
                && s > h
            {
                return Err(UpdateError::SoftAboveHard);
            }
        }
        self.peer.store(std::sync::Arc::new(peer));
        self.limits.set(lifetime);
        // The mapping the control process now knows is not news any more.
        self.nat_reported.store(0, Ordering::Relaxed);
        let c = &self.counters;
        self.check_volume(
            c.packets.load(Ordering::Relaxed),
            c.bytes.load(Ordering::Relaxed),
            now_ns,
            events,
        );
        self.check_age(now_ns, events);
        Ok(())
    }

    /// Has the soft limit been signalled?
    pub fn is_soft_expired(&self) -> bool {
        self.state.load(Ordering::Relaxed) & STATE_SOFT != 0
    }

    /// The last outbound sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Reserve up to `n` consecutive outbound sequence numbers. Returns the first one and how
    /// many were granted (fewer than `n`, possibly 0, when the space runs out: the SA then stops,
    /// it never wraps).
    #[inline]
    pub fn reserve_seq(&self, n: u64, now_ns: u64, events: &EventSink<'_>) -> (u64, u64) {
        let limit = seq_limit(self.esn);
        let r = self
            .seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                if cur >= limit {
                    None
                } else {
                    Some(cur.saturating_add(n).min(limit))
                }
            });
        match r {
            Ok(prev) => {
                let granted = (prev.saturating_add(n)).min(limit) - prev;
                let last = prev + granted;
                // Soft warning with 1/16 of the space left; hard stop at the end.
                if last >= limit - limit / 16 {
                    self.signal(false, Limit::SequenceNumber, now_ns, events);
                }
                if last == limit {
                    self.signal(true, Limit::SequenceNumber, now_ns, events);
                }
                (prev + 1, granted)
            }
            Err(_) => {
                self.signal(true, Limit::SequenceNumber, now_ns, events);
                (0, 0)
            }
        }
    }

    /// May the SA carry `bytes` more bytes and one more packet, given `pending` bytes/packets a
    /// worker has processed but not yet added? Checks the hard limits and the age.
    #[inline]
    pub fn within_hard_limits(&self, pending: &RunCounts, bytes: u64, now_ns: u64) -> bool {
        if let Some(h) = self.limits.get(Limits::HARD_BYTES) {
            let used = self.counters.bytes.load(Ordering::Relaxed) + pending.bytes;
            if used + bytes > h {
                return false;
            }
        }
        if let Some(h) = self.limits.get(Limits::HARD_PACKETS) {
            let used = self.counters.packets.load(Ordering::Relaxed) + pending.packets;
            if used + 1 > h {
                return false;
            }
        }
        if let Some(h) = self.limits.get(Limits::HARD_SECONDS)
            && now_ns.saturating_sub(self.installed_ns) >= h.saturating_mul(1_000_000_000)
        {
            return false;
        }
        true
    }

    /// Add a worker's run to the counters and raise soft/hard events for limits now crossed.
    pub fn flush(&self, run: &RunCounts, now_ns: u64, events: &EventSink<'_>) {
        if run.packets == 0 {
            return;
        }
        let c = &self.counters;
        let packets = c.packets.fetch_add(run.packets, Ordering::Relaxed) + run.packets;
        let bytes = c.bytes.fetch_add(run.bytes, Ordering::Relaxed) + run.bytes;
        c.esp_bytes.fetch_add(run.esp_bytes, Ordering::Relaxed);
        if !matches!(
            self.transform,
            Transform::CipherAuth {
                cipher: espgw_crypto::CipherAlg::Null,
                ..
            }
        ) {
            c.ciphered.fetch_add(run.packets, Ordering::Relaxed);
        }
        c.icv.fetch_add(run.packets, Ordering::Relaxed);
        c.last_used_ns.fetch_max(now_ns, Ordering::Relaxed);
        let state = self.state.load(Ordering::Relaxed);
        if state & STATE_IDLE != 0 {
            self.state.fetch_and(!STATE_IDLE, Ordering::Relaxed);
        }
        if state & STATE_USED == 0
            && self.direction == Direction::In
            && self.state.fetch_or(STATE_USED, Ordering::Relaxed) & STATE_USED == 0
        {
            events.push(self.event(EventKind::FirstPacket, now_ns));
        }
        self.check_volume(packets, bytes, now_ns, events);
    }

    /// Report (once per idle period) an SA that has carried no packet for `idle_ns`, counted
    /// from its last packet or, if it never had one, its installation. Called by the sweep.
    pub fn check_idle(&self, now_ns: u64, idle_ns: u64, events: &EventSink<'_>) {
        if idle_ns == 0 || self.is_dead() || self.state.load(Ordering::Relaxed) & STATE_IDLE != 0 {
            return;
        }
        let last = self
            .counters
            .last_used_ns
            .load(Ordering::Relaxed)
            .max(self.installed_ns);
        if now_ns.saturating_sub(last) >= idle_ns
            && self.state.fetch_or(STATE_IDLE, Ordering::Relaxed) & STATE_IDLE == 0
        {
            let seconds = idle_ns / 1_000_000_000;
            events.push(self.event(EventKind::Idle { seconds }, now_ns));
        }
    }

    /// An authenticated UDP-encapsulated packet came from `src:sport`: report a mapping that
    /// differs from the peer's (once per new mapping, until an update makes it the peer's).
    #[inline]
    pub fn note_source(&self, src: IpAddr, sport: u16, now_ns: u64, events: &EventSink<'_>) {
        let peer = self.peer();
        let Some(e) = peer.encap else { return };
        if peer.remote == src && e.dport == sport {
            return;
        }
        let h = mapping_hash(src, sport);
        if self.nat_reported.swap(h, Ordering::Relaxed) != h {
            events.push(self.event(EventKind::NatMappingChanged { src, sport }, now_ns));
        }
    }

    fn check_volume(&self, packets: u64, bytes: u64, now_ns: u64, events: &EventSink<'_>) {
        let l = self.limits.lifetime();
        for (soft, hard, used, limit) in [
            (l.soft_bytes, l.hard_bytes, bytes, Limit::Bytes),
            (l.soft_packets, l.hard_packets, packets, Limit::Packets),
        ] {
            if soft.is_some_and(|s| used >= s) {
                self.signal(false, limit, now_ns, events);
            }
            if hard.is_some_and(|h| used >= h) {
                self.signal(true, limit, now_ns, events);
            }
        }
    }

    /// Check the age limits (called by the periodic sweep, so idle SAs expire too).
    pub fn check_age(&self, now_ns: u64, events: &EventSink<'_>) {
        let age = now_ns.saturating_sub(self.installed_ns);
        let l = self.limits.lifetime();
        if l.soft_seconds
            .is_some_and(|s| age >= s.saturating_mul(1_000_000_000))
        {
            self.signal(false, Limit::Seconds, now_ns, events);
        }
        if l.hard_seconds
            .is_some_and(|h| age >= h.saturating_mul(1_000_000_000))
        {
            self.signal(true, Limit::Seconds, now_ns, events);
        }
    }

    /// Record a soft or hard expiry once; a hard expiry implies the soft one.
    fn signal(&self, hard: bool, limit: Limit, now_ns: u64, events: &EventSink<'_>) {
        let bit = if hard {
            STATE_HARD | STATE_SOFT
        } else {
            STATE_SOFT
        };
        let prev = self.state.fetch_or(bit, Ordering::AcqRel);
        let newly = bit & !prev;
        if newly & STATE_SOFT != 0 {
            if limit == Limit::SequenceNumber {
                events.push(self.event(EventKind::SeqNearExhaustion, now_ns));
            }
            // Also when it went straight to hard: a rekey is always asked for.
            events.push(self.event(EventKind::SoftExpired { limit }, now_ns));
        }
        if hard && newly & STATE_HARD != 0 {
            events.push(self.event(EventKind::HardExpired { limit }, now_ns));
            tracing::warn!(
                sa = %self.name, spi = format_args!("{:#010x}", self.spi), ?limit,
                "SA reached its hard lifetime and stops carrying traffic"
            );
        }
    }

    fn event(&self, kind: EventKind, at_ns: u64) -> Event {
        Event {
            at_ns,
            sa: self.id,
            spi: self.spi,
            direction: self.direction,
            kind,
        }
    }

    /// Count a drop attributed to this SA.
    #[inline]
    pub fn count_drop(&self, reason: DropReason, n: u64) {
        self.counters.drops.add(reason, n);
    }

    /// A counters snapshot.
    pub fn snapshot(&self) -> SaCountersSnapshot {
        let c = &self.counters;
        SaCountersSnapshot {
            packets: c.packets.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            esp_bytes: c.esp_bytes.load(Ordering::Relaxed),
            ciphered: c.ciphered.load(Ordering::Relaxed),
            icv: c.icv.load(Ordering::Relaxed),
        }
    }

    /// JSON in the spirit of `show crypto ipsec sa` (no key material).
    pub fn to_json(&self, now_ns: u64) -> serde_json::Value {
        let s = self.snapshot();
        let drops = self.counters.drops.snapshot();
        let age_s = now_ns.saturating_sub(self.installed_ns) / 1_000_000_000;
        let remaining = |limit: Option<u64>, used: u64| limit.map(|l| l.saturating_sub(used));
        let l = self.lifetime();
        let peer = self.peer();
        let counters = match self.direction {
            Direction::Out => serde_json::json!({
                "pkts_encaps": s.packets, "pkts_encrypt": s.ciphered, "pkts_digest": s.icv,
                "bytes_encaps": s.bytes, "bytes_esp": s.esp_bytes,
                "send_errors": drops.errors(),
            }),
            Direction::In => serde_json::json!({
                "pkts_decaps": s.packets, "pkts_decrypt": s.ciphered, "pkts_verify": s.icv,
                "bytes_decaps": s.bytes, "bytes_esp": s.esp_bytes,
                "recv_errors": drops.errors(),
            }),
        };
        let mut v = serde_json::json!({
            "name": self.name,
            "direction": self.direction,
            "spi": format!("{:#010x}", self.spi),
            "mode": self.mode,
            "local": self.local.to_string(),
            "remote": peer.remote.to_string(),
            "encap": peer.encap,
            "transform": self.transform.name(),
            "esn": self.esn,
            "counters": counters,
            "drops": drops.to_json(),
            "state": if self.is_dead() { "expired" } else if self.is_soft_expired() { "soft_expired" } else { "active" },
            "age_seconds": age_s,
            "remaining": {
                "bytes": remaining(l.hard_bytes, s.bytes),
                "packets": remaining(l.hard_packets, s.packets),
                "seconds": remaining(l.hard_seconds, age_s),
            },
        });
        if let Some(w) = self.transform.weakness() {
            v["weak"] = w.into();
        }
        match self.direction {
            Direction::Out => v["last_seq"] = self.last_seq().into(),
            Direction::In => {
                v["replay_window"] = self.replay.size().into();
                v["highest_seq"] = self.replay.top().into();
            }
        }
        v
    }
}

/// Where SA events go: a bounded lock-free queue the control side drains. When it is full the
/// event is counted as lost rather than blocking a worker.
#[derive(Debug, Clone, Copy)]
pub struct EventSink<'a> {
    pub(crate) queue: &'a crossbeam_queue::ArrayQueue<Event>,
    pub(crate) lost: &'a AtomicU64,
}

impl EventSink<'_> {
    /// Queue an event.
    pub fn push(&self, e: Event) {
        if self.queue.push(e).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A nonzero tag for a NAT mapping (address and port).
fn mapping_hash(src: IpAddr, sport: u16) -> u64 {
    let bits: u128 = match src {
        IpAddr::V4(a) => u128::from(u32::from(a)) | 1 << 127,
        IpAddr::V6(a) => u128::from(a),
    };
    let mut h = u64::from(sport) ^ 0x9E37_79B9_7F4A_7C15;
    for w in [bits as u64, (bits >> 64) as u64] {
        h = (h ^ w).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(31);
    }
    h | 1
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    /// The field order of `Sa` is chosen for the cache (see its documentation): keep it.
    #[test]
    fn what_a_lookup_reads_is_in_the_first_64_bytes() {
        // Not over-aligned: SAs come from the allocator's fast path.
        assert!(align_of::<Sa>() <= 16);
        let ends = [
            ("spi", offset_of!(Sa, spi) + size_of::<u32>()),
            (
                "direction",
                offset_of!(Sa, direction) + size_of::<Direction>(),
            ),
            ("shared_spi", offset_of!(Sa, shared_spi) + 1),
            ("local", offset_of!(Sa, local) + size_of::<IpAddr>()),
            ("state", offset_of!(Sa, state) + 1),
            ("esn", offset_of!(Sa, esn) + 1),
            (
                "crypto",
                offset_of!(Sa, crypto) + size_of::<Box<dyn SaCrypto>>(),
            ),
        ];
        for (field, end) in ends {
            assert!(end <= 64, "Sa::{field} ends at byte {end}, past byte 64");
        }
        // The replay window and the lengths the inbound checks read: within the first two lines.
        let end = offset_of!(Sa, pad_align) + size_of::<usize>();
        assert!(end <= 128, "Sa::pad_align ends at byte {end}");
    }

    /// What the workers write (the outbound sequence number and the counters) shares no cache
    /// line with any other field, nor with what follows the SA in memory.
    #[test]
    fn written_fields_are_apart() {
        // `seq` and `counters` are the last fields, between the two paddings (in `repr(C)`
        // order, so every other field ends before the first padding).
        assert_eq!(
            offset_of!(Sa, seq),
            offset_of!(Sa, _apart_before) + APART,
            "nothing between the first padding and seq"
        );
        assert_eq!(
            offset_of!(Sa, counters),
            offset_of!(Sa, seq) + size_of::<AtomicU64>()
        );
        let after = offset_of!(Sa, _apart_after);
        assert_eq!(after, offset_of!(Sa, counters) + size_of::<SaCounters>());
        // Nothing after the second padding but the struct's tail rounding (a field added at
        // the end would show here).
        assert!(size_of::<Sa>() >= after + APART);
        assert!(size_of::<Sa>() < after + APART + align_of::<Sa>());
    }
}
