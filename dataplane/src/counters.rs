//! Named drop reasons and the per-worker counters.
//!
//! Every packet the data plane does not forward is counted under exactly one [`DropReason`],
//! globally (per worker) and, where the packet could be attributed to an SA, on that SA too. The
//! names are stable: they appear in JSON, in the CLI and in logs.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, $error:literal, $text:literal; )*) => {
        /// Why a frame was not forwarded.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason { $( $(#[$doc])* $variant, )* }

        impl DropReason {
            /// Every reason, in declaration order (the index is `reason as usize`).
            pub const ALL: &'static [DropReason] = &[ $( DropReason::$variant, )* ];
            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name used in JSON, logs and the CLI.
            pub fn name(self) -> &'static str {
                match self { $( DropReason::$variant => $name, )* }
            }

            /// False for frames that are consumed on purpose (keepalives, dummy packets).
            pub fn is_error(self) -> bool {
                match self { $( DropReason::$variant => $error, )* }
            }

            /// What the reason means, in the words an operator would look for.
            pub fn description(self) -> &'static str {
                match self { $( DropReason::$variant => $text, )* }
            }
        }
    };
}

drop_reasons! {
    /// A header claims more bytes than the frame holds.
    Truncated = "truncated", true, "frame shorter than its headers say";
    /// A header field is invalid (IP version, header length, UDP length, ...).
    Malformed = "malformed", true, "malformed header";
    /// The IPv4 header checksum is wrong (RFC 1812 §5.2.2: a router verifies it).
    BadChecksum = "bad_checksum", true, "IPv4 header checksum is wrong";
    /// A source address that cannot be right on this port (one of the gateway's own).
    Martian = "martian", true, "source address is one of the gateway's own (spoofed or looped)";
    /// The frame does not fit the buffer or the configured maximum.
    Oversize = "oversize", true, "frame larger than the maximum frame size";
    /// No inbound SA for this SPI (Cisco: "invalid SPI").
    UnknownSpi = "unknown_spi", true, "no inbound SA with this SPI (invalid SPI: the peer uses an SA we do not have)";
    /// Sequence number already received.
    Replay = "replay", true, "replay check failed: sequence number already received";
    /// Sequence number left of the anti-replay window.
    TooOld = "too_old", true, "replay check failed: sequence number older than the anti-replay window (reordering under load? raise replay_window)";
    /// ICV did not verify.
    AuthFailed = "auth_failed", true, "integrity check (ICV/HMAC) failed: wrong keys, corruption, or a forged packet";
    /// Decrypted padding is not 1, 2, 3, ...
    BadPadding = "bad_padding", true, "decrypted padding is not the RFC 4303 sequence 1, 2, 3, ...";
    /// Ciphertext length does not fit the transform (IV, block size, ICV).
    BadLength = "bad_length", true, "ESP payload length does not fit the transform's IV, block size and ICV";
    /// Next header does not fit the SA's mode.
    BadNextHeader = "bad_next_header", true, "ESP next header does not fit the SA (tunnel mode needs IPv4 or IPv6 inside)";
    /// Decrypted packet outside the SA's selectors (RFC 4301 §5.2).
    SelectorMismatch = "selector_mismatch", true, "decrypted packet does not match the SA's traffic selectors (proxy identities)";
    /// The SA reached its hard lifetime.
    LifetimeExpired = "lifetime_expired", true, "SA reached its hard lifetime (bytes, packets or seconds) and was not rekeyed in time";
    /// The outbound sequence number space is used up.
    SeqExhausted = "seq_exhausted", true, "outbound sequence numbers exhausted; the SA must be rekeyed";
    /// Outer IP fragment of an ESP packet.
    OuterFragment = "outer_fragment", true, "ESP arrived as outer IP fragments (path MTU problem between the peers)";
    /// Outer fragments of one datagram overlapped (or a fragment was repeated).
    FragmentInvalid = "fragment_invalid", true, "outer IP fragments overlap or repeat; the datagram was dropped";
    /// A reassembled datagram would not fit a frame.
    FragmentTooBig = "fragment_too_big", true, "outer IP fragments add up to more than a frame holds (1760 bytes)";
    /// Too many datagrams in reassembly at once.
    FragmentTableFull = "fragment_table_full", true, "too many fragmented ESP datagrams in reassembly at once";
    /// A datagram's fragments did not all arrive in time.
    FragmentTimeout = "fragment_timeout", true, "not all outer IP fragments of an ESP packet arrived within 2 s";
    /// No policy matched this LAN packet (the default action is discard).
    NoPolicy = "no_policy", true, "no security policy matches the packet and the default action is discard";
    /// A policy with action discard matched.
    PolicyDiscard = "policy_discard", true, "a security policy with action discard matched";
    /// The policy names an SA that is not installed.
    NoSa = "no_sa", true, "the matching policy's SA is not installed (no keys with remote peer)";
    /// A transport-mode SA matched a packet that is not ours to protect.
    TransportNotLocal = "transport_not_local", true, "a transport-mode SA matched traffic that this gateway did not originate";
    /// No route to the destination.
    NoRoute = "no_route", true, "no route to the destination";
    /// The next hop's MAC address is unknown.
    NoNeighbor = "no_neighbor", true, "next hop's MAC address is not known";
    /// TTL/hop limit would reach zero.
    TtlExceeded = "ttl_exceeded", true, "TTL or hop limit expired";
    /// The packet would exceed the outgoing MTU and may not be fragmented.
    MtuExceeded = "mtu_exceeded", true, "packet exceeds the path MTU after IPsec overhead and DF is set";
    /// Not enough room in the buffer for the headers or trailer.
    NoBufferSpace = "no_buffer_space", true, "no room in the packet buffer for the IPsec headers and trailer";
    /// RFC 6040: CE on the outer header of a not-ECN-capable inner packet.
    EcnDrop = "ecn_drop", true, "outer header marked congestion (CE) but the inner packet is not ECN-capable (RFC 6040)";
    /// The AF_XDP TX ring of the outgoing port was full.
    TxRingFull = "tx_ring_full", true, "the outgoing port's transmit ring was full (the port or the peer is slower than the traffic)";
    /// A frame for the gateway's own stack reached the data plane, which has no way to it yet.
    NoHostPath = "no_host_path", true, "packet for the gateway itself arrived through the data plane (e.g. decrypted traffic to the gateway's own address); not delivered";
    /// The frame carries something we cannot process here.
    Unsupported = "unsupported", true, "packet type not supported on this path";
    /// A dummy packet (next header 59), discarded as RFC 4303 §2.6 says.
    Dummy = "dummy", false, "dummy packet (next header 59, traffic flow confidentiality) discarded";
    /// A NAT-T keepalive (RFC 3948 §2.3).
    NattKeepalive = "natt_keepalive", false, "NAT-T keepalive received";
}

/// A fixed array of counters, one per [`DropReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCounts(pub [u64; DropReason::COUNT]);

impl Default for DropCounts {
    fn default() -> Self {
        DropCounts([0; DropReason::COUNT])
    }
}

impl Default for DropReasonArray {
    fn default() -> Self {
        DropReasonArray(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl DropCounts {
    /// Count under `reason`.
    #[inline]
    pub fn add(&mut self, reason: DropReason, n: u64) {
        self.0[reason as usize] += n;
    }

    /// The count for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// Sum of the reasons that are errors.
    pub fn errors(&self) -> u64 {
        DropReason::ALL
            .iter()
            .filter(|r| r.is_error())
            .map(|r| self.get(*r))
            .sum()
    }

    /// Non-zero counts as a name → value map, errors and absorbed frames separated.
    pub fn to_json(&self) -> serde_json::Value {
        let mut errors = serde_json::Map::new();
        let mut absorbed = serde_json::Map::new();
        for r in DropReason::ALL {
            let v = self.get(*r);
            if v == 0 {
                continue;
            }
            let target = if r.is_error() {
                &mut errors
            } else {
                &mut absorbed
            };
            target.insert(r.name().to_string(), v.into());
        }
        serde_json::json!({ "errors": errors, "absorbed": absorbed })
    }
}

/// Atomic per-reason counters, for structures shared between workers (SAs).
#[derive(Debug)]
pub struct DropReasonArray(pub [AtomicU64; DropReason::COUNT]);

impl DropReasonArray {
    /// Count `n` drops under `reason`.
    #[inline]
    pub fn add(&self, reason: DropReason, n: u64) {
        self.0[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// A plain copy.
    pub fn snapshot(&self) -> DropCounts {
        DropCounts(std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed)))
    }
}

/// What one worker (or the replay run) counted, beyond the per-SA counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortCounters {
    /// Frames received on the port.
    pub rx_frames: u64,
    /// Bytes received on the port.
    pub rx_bytes: u64,
    /// Frames sent out of the port.
    pub tx_frames: u64,
    /// Bytes sent out of the port.
    pub tx_bytes: u64,
}

/// Per-worker statistics.
#[derive(Debug, Clone, Default)]
pub struct WorkerCounters {
    /// WAN port.
    pub wan: PortCounters,
    /// LAN port.
    pub lan: PortCounters,
    /// Frames handed to the host stack (both directions).
    pub to_host: PortCounters,
    /// Frames received from the host stack (locally originated).
    pub from_host: PortCounters,
    /// Bursts processed.
    pub bursts: u64,
    /// Frames processed in those bursts (so the mean burst fill is `frames / bursts`).
    pub burst_frames: u64,
    /// ICMP errors sent (fragmentation needed / packet too big).
    pub icmp_sent: u64,
    /// Packets fragmented before encryption (each counted once; its fragments are counted as
    /// they are processed).
    pub prefragmented: u64,
    /// Drops per reason.
    pub drops: DropCounts,
}

impl WorkerCounters {
    /// Add another worker's counts (for totals).
    pub fn merge(&mut self, o: &WorkerCounters) {
        for (a, b) in [
            (&mut self.wan, &o.wan),
            (&mut self.lan, &o.lan),
            (&mut self.to_host, &o.to_host),
            (&mut self.from_host, &o.from_host),
        ] {
            a.rx_frames += b.rx_frames;
            a.rx_bytes += b.rx_bytes;
            a.tx_frames += b.tx_frames;
            a.tx_bytes += b.tx_bytes;
        }
        self.bursts += o.bursts;
        self.burst_frames += o.burst_frames;
        self.icmp_sent += o.icmp_sent;
        self.prefragmented += o.prefragmented;
        for r in DropReason::ALL {
            self.drops.add(*r, o.drops.get(*r));
        }
    }

    /// JSON for the CLI and replay output.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "wan": self.wan,
            "lan": self.lan,
            "to_host": self.to_host,
            "from_host": self.from_host,
            "bursts": self.bursts,
            "icmp_sent": self.icmp_sent,
            "prefragmented": self.prefragmented,
            "mean_burst_fill": if self.bursts == 0 { 0.0 } else { self.burst_frames as f64 / self.bursts as f64 },
            "drops": self.drops.to_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len());
        assert_eq!(
            DropReason::ALL[DropReason::Replay as usize],
            DropReason::Replay
        );
    }

    #[test]
    fn json_separates_errors_from_absorbed() {
        let mut d = DropCounts::default();
        d.add(DropReason::Replay, 3);
        d.add(DropReason::NattKeepalive, 2);
        let j = d.to_json();
        assert_eq!(j["errors"]["replay"], 3);
        assert_eq!(j["absorbed"]["natt_keepalive"], 2);
        assert_eq!(d.errors(), 3);
    }
}
