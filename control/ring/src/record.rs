//! The records that travel through the rings, and their explicit little-endian encoding.
//!
//! Every encoded record starts with its [`Kind`] (`u16`), followed by its fields in declaration
//! order: integers little-endian, booleans and enumerations as one byte, an address as a family
//! byte (4 or 6) and 4 or 16 bytes, byte strings (keys, names, reasons) as a length byte and the
//! bytes, an optional value as a presence byte (0 or 1) and the value when present. Nothing is
//! transmuted: [`Record::encode`] writes the bytes one field at a time and [`Record::decode`]
//! checks every one of them, naming the field in its error. Every byte is significant (there is
//! no padding and no ignored field), so a corrupted byte either fails to decode or decodes to a
//! different record.
//!
//! Records are designed so that applying one twice has the effect of applying it once: a record
//! is re-read when a consumer dies after applying it but before releasing its slot. See the
//! crate's README for the rules the data plane follows.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Longest SA name, in bytes (UTF-8).
pub const MAX_NAME_LEN: usize = 32;
/// Longest encryption or integrity key, in bytes.
pub const MAX_KEY_LEN: usize = 64;
/// Longest salt, in bytes (AES-GCM uses 4).
pub const MAX_SALT_LEN: usize = 8;
/// Most selectors on one SA.
pub const MAX_SELECTORS: usize = 4;
/// Longest rejection reason, in bytes (UTF-8); [`Record::rejected`] shortens longer texts.
pub const MAX_REASON_LEN: usize = 96;
/// Lowest SPI an SA may have: 0 is reserved and 1…255 are reserved by IANA (RFC 4303 §2.1).
pub const MIN_SPI: u32 = 256;

const ADDR_MAX: usize = 1 + 16;
const SA_REF_LEN: usize = 1 + 4 + 8;
const LIFETIMES_LEN: usize = 6 * 8;
const SELECTOR_MAX: usize = 1 + 2 * (16 + 1) + 1 + 2 * 4;
const ENCAP_MAX: usize = 1 + 4;
const ADD_SA_MAX: usize = 2 // kind
    + 8 + 4 + 1 + 1 + 4 // generation, spi, direction, mode, reqid
    + (1 + MAX_NAME_LEN)
    + 2 * ADDR_MAX
    + ENCAP_MAX
    + 2 // algorithms
    + (1 + MAX_KEY_LEN) + (1 + MAX_SALT_LEN) + (1 + MAX_KEY_LEN)
    + 1 + 1 + 8 + 4 // icv_len, esn, initial_seq, replay_window
    + LIFETIMES_LEN
    + (1 + MAX_SELECTORS * SELECTOR_MAX)
    + 4; // df, dscp, ecn, outer_ttl
const UPDATE_SA_MAX: usize = 2 + SA_REF_LEN + ADDR_MAX + ENCAP_MAX + LIFETIMES_LEN;
const ADD_POLICY_MAX: usize = 2 + 4 + 8 + 1 + 4 + SELECTOR_MAX + 1 + (1 + MAX_NAME_LEN);
const REJECTED_MAX: usize = 2 + 8 + 1 + MAX_REASON_LEN;
const UNKNOWN_SPI_MAX: usize = 2 + 4 + 2 * ADDR_MAX + 2 + 2;
const COUNTERS_LEN: usize = 2 + SA_REF_LEN + 6 * 8;

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// The longest encoding any record can have (an [`Record::AddSa`] with IPv6 addresses, the
/// longest name, keys and salt, and four IPv6 selectors). The slot size is checked against it
/// at compile time.
pub const MAX_ENCODED_LEN: usize = max(
    max(
        max(ADD_SA_MAX, UPDATE_SA_MAX),
        max(ADD_POLICY_MAX, REJECTED_MAX),
    ),
    max(UNKNOWN_SPI_MAX, COUNTERS_LEN),
);

/// Which ring a record travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingDir {
    /// Control process → data plane (commands).
    ToDataPlane,
    /// Data plane → control process (events and replies).
    FromDataPlane,
}

impl RingDir {
    /// `"to-data-plane"` or `"from-data-plane"`.
    pub fn name(self) -> &'static str {
        match self {
            RingDir::ToDataPlane => "to-data-plane",
            RingDir::FromDataPlane => "from-data-plane",
        }
    }
}

impl fmt::Display for RingDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

macro_rules! kinds {
    ($( $(#[$doc:meta])* $v:ident = $n:literal, $name:literal, $dir:ident; )+) => {
        /// The kind of a record: the first two bytes (little-endian) of its encoding.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Kind { $( $(#[$doc])* $v = $n, )+ }

        impl Kind {
            /// Every kind, in wire order.
            pub const ALL: &'static [Kind] = &[$(Kind::$v,)+];

            /// The kind with this wire value.
            pub fn from_wire(v: u16) -> Option<Kind> {
                match v { $( $n => Some(Kind::$v), )+ _ => None }
            }

            /// The wire value.
            pub fn to_wire(self) -> u16 {
                self as u16
            }

            /// The snake_case name used in messages.
            pub fn name(self) -> &'static str {
                match self { $( Kind::$v => $name, )+ }
            }

            /// The ring this kind travels on.
            pub fn ring(self) -> RingDir {
                match self { $( Kind::$v => RingDir::$dir, )+ }
            }
        }
    };
}

kinds! {
    /// [`Record::AddSa`].
    AddSa = 0x0001, "add_sa", ToDataPlane;
    /// [`Record::UpdateSa`].
    UpdateSa = 0x0002, "update_sa", ToDataPlane;
    /// [`Record::DeleteSa`].
    DeleteSa = 0x0003, "delete_sa", ToDataPlane;
    /// [`Record::AddPolicy`].
    AddPolicy = 0x0004, "add_policy", ToDataPlane;
    /// [`Record::DeletePolicy`].
    DeletePolicy = 0x0005, "delete_policy", ToDataPlane;
    /// [`Record::Flush`].
    Flush = 0x0006, "flush", ToDataPlane;
    /// [`Record::QueryCounters`].
    QueryCounters = 0x0007, "query_counters", ToDataPlane;
    /// [`Record::Resync`].
    Resync = 0x0008, "resync", ToDataPlane;
    /// [`Record::SoftExpired`].
    SoftExpired = 0x0081, "soft_expired", FromDataPlane;
    /// [`Record::HardExpired`].
    HardExpired = 0x0082, "hard_expired", FromDataPlane;
    /// [`Record::SeqNearExhaustion`].
    SeqNearExhaustion = 0x0083, "seq_near_exhaustion", FromDataPlane;
    /// [`Record::UnknownSpi`].
    UnknownSpi = 0x0084, "unknown_spi", FromDataPlane;
    /// [`Record::NatMappingChanged`].
    NatMappingChanged = 0x0085, "nat_mapping_changed", FromDataPlane;
    /// [`Record::FirstPacket`].
    FirstPacket = 0x0086, "first_packet", FromDataPlane;
    /// [`Record::Idle`].
    Idle = 0x0087, "idle", FromDataPlane;
    /// [`Record::CountersReply`].
    CountersReply = 0x0088, "counters_reply", FromDataPlane;
    /// [`Record::Rejected`].
    Rejected = 0x0089, "rejected", FromDataPlane;
    /// [`Record::Applied`].
    Applied = 0x008A, "applied", FromDataPlane;
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A one-byte enumeration on the wire.
trait WireEnum: Sized + Copy {
    /// What the byte is, with its valid values, for error messages.
    const WHAT: &'static str;
    fn from_wire(v: u8) -> Option<Self>;
    fn to_wire(self) -> u8;
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $( $(#[$vm:meta])* $v:ident = $n:literal, $s:literal; )+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $( $(#[$vm])* $v = $n, )+ }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// The canonical spelling (strongSwan's and the data plane's configuration).
            pub fn name(self) -> &'static str {
                match self { $( $name::$v => $s, )+ }
            }
        }

        impl WireEnum for $name {
            const WHAT: &'static str = $what;
            fn from_wire(v: u8) -> Option<Self> {
                match v { $( $n => Some($name::$v), )+ _ => None }
            }
            fn to_wire(self) -> u8 {
                self as u8
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

wire_enum! {
    /// Direction of an SA (or a policy), seen from this gateway.
    Direction, "direction (1 = in, 2 = out)" {
        /// We decrypt.
        In = 1, "in";
        /// We encrypt.
        Out = 2, "out";
    }
}

wire_enum! {
    /// ESP mode.
    Mode, "mode (1 = tunnel, 2 = transport)" {
        /// A whole IP packet inside a new outer header.
        Tunnel = 1, "tunnel";
        /// The packet's payload inside, its own header kept.
        Transport = 2, "transport";
    }
}

wire_enum! {
    /// Encryption algorithm; the AES-GCM names carry the ICV length in bytes (strongSwan's
    /// spelling).
    EncAlg, "encryption algorithm (1…10)" {
        /// AES-128-GCM, 16-byte ICV (RFC 4106).
        Aes128Gcm16 = 1, "aes128gcm16";
        /// AES-128-GCM, 12-byte ICV.
        Aes128Gcm12 = 2, "aes128gcm12";
        /// AES-128-GCM, 8-byte ICV.
        Aes128Gcm8 = 3, "aes128gcm8";
        /// AES-256-GCM, 16-byte ICV.
        Aes256Gcm16 = 4, "aes256gcm16";
        /// AES-256-GCM, 12-byte ICV.
        Aes256Gcm12 = 5, "aes256gcm12";
        /// AES-256-GCM, 8-byte ICV.
        Aes256Gcm8 = 6, "aes256gcm8";
        /// AES-128-CBC (RFC 3602).
        Aes128Cbc = 7, "aes128-cbc";
        /// AES-256-CBC (RFC 3602).
        Aes256Cbc = 8, "aes256-cbc";
        /// Three-key 3DES-CBC (RFC 2451).
        TripleDesCbc = 9, "3des-cbc";
        /// No encryption (RFC 2410); needs an integrity algorithm.
        Null = 10, "null";
    }
}

impl EncAlg {
    /// AES-GCM (combined mode: no separate integrity algorithm).
    pub fn is_aead(self) -> bool {
        matches!(
            self,
            EncAlg::Aes128Gcm16
                | EncAlg::Aes128Gcm12
                | EncAlg::Aes128Gcm8
                | EncAlg::Aes256Gcm16
                | EncAlg::Aes256Gcm12
                | EncAlg::Aes256Gcm8
        )
    }

    /// Length of the encryption key in bytes, without the salt.
    pub fn key_len(self) -> usize {
        match self {
            EncAlg::Aes128Gcm16 | EncAlg::Aes128Gcm12 | EncAlg::Aes128Gcm8 | EncAlg::Aes128Cbc => {
                16
            }
            EncAlg::Aes256Gcm16 | EncAlg::Aes256Gcm12 | EncAlg::Aes256Gcm8 | EncAlg::Aes256Cbc => {
                32
            }
            EncAlg::TripleDesCbc => 24,
            EncAlg::Null => 0,
        }
    }

    /// Length of the salt in bytes (4 for AES-GCM, RFC 4106 §8.1; 0 otherwise).
    pub fn salt_len(self) -> usize {
        if self.is_aead() { 4 } else { 0 }
    }

    /// The ICV length of an AEAD algorithm, `None` for the others.
    pub fn aead_icv_len(self) -> Option<usize> {
        match self {
            EncAlg::Aes128Gcm16 | EncAlg::Aes256Gcm16 => Some(16),
            EncAlg::Aes128Gcm12 | EncAlg::Aes256Gcm12 => Some(12),
            EncAlg::Aes128Gcm8 | EncAlg::Aes256Gcm8 => Some(8),
            _ => None,
        }
    }
}

wire_enum! {
    /// Integrity algorithm (all HMAC, truncated); `None` with AES-GCM.
    IntegAlg, "integrity algorithm (0…5)" {
        /// None (AES-GCM only).
        None = 0, "none";
        /// HMAC-MD5-96 (RFC 2403).
        HmacMd5_96 = 1, "hmac-md5-96";
        /// HMAC-SHA1-96 (RFC 2404).
        HmacSha1_96 = 2, "hmac-sha1-96";
        /// HMAC-SHA2-256-128 (RFC 4868).
        HmacSha2_256_128 = 3, "hmac-sha2-256-128";
        /// HMAC-SHA2-384-192 (RFC 4868).
        HmacSha2_384_192 = 4, "hmac-sha2-384-192";
        /// HMAC-SHA2-512-256 (RFC 4868).
        HmacSha2_512_256 = 5, "hmac-sha2-512-256";
    }
}

impl IntegAlg {
    /// Key length in bytes (the hash's output length).
    pub fn key_len(self) -> usize {
        match self {
            IntegAlg::None => 0,
            IntegAlg::HmacMd5_96 => 16,
            IntegAlg::HmacSha1_96 => 20,
            IntegAlg::HmacSha2_256_128 => 32,
            IntegAlg::HmacSha2_384_192 => 48,
            IntegAlg::HmacSha2_512_256 => 64,
        }
    }

    /// Length of the truncated ICV in bytes.
    pub fn icv_len(self) -> usize {
        match self {
            IntegAlg::None => 0,
            IntegAlg::HmacMd5_96 | IntegAlg::HmacSha1_96 => 12,
            IntegAlg::HmacSha2_256_128 => 16,
            IntegAlg::HmacSha2_384_192 => 24,
            IntegAlg::HmacSha2_512_256 => 32,
        }
    }
}

wire_enum! {
    /// How the outer DF bit is set in tunnel mode (RFC 4301 §8.1).
    DfMode, "DF mode (0 = copy, 1 = set, 2 = clear)" {
        /// From the inner IPv4 header (set for IPv6 inside).
        Copy = 0, "copy";
        /// Always set.
        Set = 1, "set";
        /// Always clear.
        Clear = 2, "clear";
    }
}

wire_enum! {
    /// ECN in tunnel mode (RFC 6040).
    EcnMode, "ECN mode (0 = normal, 1 = compat)" {
        /// Normal mode: copy outward, combine on decapsulation.
        Normal = 0, "normal";
        /// Compatibility mode: outer header Not-ECT.
        Compat = 1, "compat";
    }
}

wire_enum! {
    /// Which limit an expiry event is about.
    Limit, "limit (1 = bytes, 2 = packets, 3 = seconds, 4 = sequence number)" {
        /// Bytes.
        Bytes = 1, "bytes";
        /// Packets.
        Packets = 2, "packets";
        /// Seconds since installation.
        Seconds = 3, "seconds";
        /// Outbound sequence numbers.
        SequenceNumber = 4, "sequence_number";
    }
}

/// How the outer DSCP is set in tunnel mode. On the wire: one byte, 0…63 = set, 255 = copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DscpMode {
    /// Copy from the inner header.
    Copy,
    /// This value (0…63).
    Set(u8),
}

/// Key material (an encryption key, a salt or an integrity key), at most [`MAX_KEY_LEN`]
/// bytes, held inline (no heap) and wiped when dropped. `Debug` prints only the length.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key {
    bytes: [u8; MAX_KEY_LEN],
    len: u8,
}

impl Key {
    /// No key (length 0).
    pub const fn empty() -> Key {
        Key {
            bytes: [0; MAX_KEY_LEN],
            len: 0,
        }
    }

    /// A copy of `bytes`; `None` if longer than [`MAX_KEY_LEN`].
    pub fn new(bytes: &[u8]) -> Option<Key> {
        if bytes.len() > MAX_KEY_LEN {
            return None;
        }
        let mut k = Key::empty();
        k.bytes[..bytes.len()].copy_from_slice(bytes);
        k.len = bytes.len() as u8;
        Some(k)
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True for a zero-length key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Key {
    fn default() -> Self {
        Key::empty()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<{} bytes>)", self.len)
    }
}

/// UDP encapsulation (RFC 3948).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpEncap {
    /// Our port (outer source port when sending; normally 4500).
    pub local_port: u16,
    /// The peer's port (outer destination port when sending; NAT may make it ≠ 4500).
    pub remote_port: u16,
}

/// Soft and hard limits; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lifetimes {
    /// Soft limit in seconds since installation.
    pub soft_seconds: u64,
    /// Hard limit in seconds since installation.
    pub hard_seconds: u64,
    /// Soft limit on bytes.
    pub soft_bytes: u64,
    /// Hard limit on bytes.
    pub hard_bytes: u64,
    /// Soft limit on packets.
    pub soft_packets: u64,
    /// Hard limit on packets.
    pub hard_packets: u64,
}

/// An address prefix. Host bits are carried as given (the data plane clears them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// Address.
    pub addr: IpAddr,
    /// Prefix length (≤ 32 for IPv4, ≤ 128 for IPv6).
    pub len: u8,
}

/// An inclusive port range; `0..=65535` is any port. ICMP type/code go here as well (type in
/// the source range, code in the destination range), as in strongSwan and Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (≥ `first`).
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };
}

/// A traffic selector (RFC 4301 §4.4.1). Source and destination are of one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Source prefix.
    pub src: IpPrefix,
    /// Destination prefix.
    pub dst: IpPrefix,
    /// IP protocol, 0 = any.
    pub protocol: u8,
    /// Source ports.
    pub src_ports: PortRange,
    /// Destination ports.
    pub dst_ports: PortRange,
}

/// Names one installed SA: its direction and SPI, and the generation it was installed with.
///
/// The generation is assigned by the control process, unique per SA it installs and increasing
/// (see the README): a record that names a generation the data plane no longer has (an old
/// delete that arrives after a re-install) cannot touch a newer SA with the same SPI, and two
/// outbound SAs to different peers may share an SPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SaRef {
    /// In or out.
    pub direction: Direction,
    /// Security parameter index (≥ [`MIN_SPI`]).
    pub spi: u32,
    /// Generation the SA was installed (or last re-pushed) with.
    pub generation: u64,
}

/// Everything that describes an SA: what strongSwan, Libreswan, VPP and DPDK pass to their
/// data planes. Keys are wiped when this is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaSpec {
    /// Generation (see [`SaRef`]).
    pub generation: u64,
    /// Security parameter index (≥ [`MIN_SPI`]).
    pub spi: u32,
    /// In or out.
    pub direction: Direction,
    /// Tunnel or transport.
    pub mode: Mode,
    /// Request id / policy id tying the SA to its policies (strongSwan's and Linux's reqid).
    pub reqid: u32,
    /// Name (unique among installed SAs; policies refer to outbound SAs by it), 1…32 bytes.
    pub name: String,
    /// Our outer address.
    pub local: IpAddr,
    /// The peer's outer address (same family as `local`).
    pub remote: IpAddr,
    /// ESP in UDP, if set.
    pub encap: Option<UdpEncap>,
    /// Encryption algorithm.
    pub enc_alg: EncAlg,
    /// Integrity algorithm (`None` exactly for AES-GCM).
    pub integ_alg: IntegAlg,
    /// Encryption key (`enc_alg.key_len()` bytes).
    pub enc_key: Key,
    /// Salt (`enc_alg.salt_len()` bytes).
    pub salt: Key,
    /// Integrity key (`integ_alg.key_len()` bytes).
    pub integ_key: Key,
    /// ICV length in bytes (must be the algorithms' own).
    pub icv_len: u8,
    /// Extended sequence numbers (RFC 4303 §2.2.1).
    pub esn: bool,
    /// Outbound: the last sequence number already used (the first packet gets this + 1);
    /// inbound: the highest number already received (0 for a new SA).
    pub initial_seq: u64,
    /// Anti-replay window in packets (inbound; 0 = off).
    pub replay_window: u32,
    /// Soft and hard limits.
    pub lifetime: Lifetimes,
    /// Inner traffic allowed through the SA (empty = any), at most [`MAX_SELECTORS`].
    pub selectors: Vec<Selector>,
    /// Outer DF.
    pub df: DfMode,
    /// Outer DSCP.
    pub dscp: DscpMode,
    /// ECN.
    pub ecn: EcnMode,
    /// Outer TTL / hop limit (1…255).
    pub outer_ttl: u8,
}

impl SaSpec {
    /// The reference that names this SA in later records.
    pub fn sa_ref(&self) -> SaRef {
        SaRef {
            direction: self.direction,
            spi: self.spi,
            generation: self.generation,
        }
    }
}

/// New outer address, encapsulation and lifetimes of an installed SA (after a NAT change or a
/// re-negotiation of limits). Absolute values, not deltas, so applying it twice is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaUpdate {
    /// The SA.
    pub sa: SaRef,
    /// The peer's outer address from now on (same family as before).
    pub remote: IpAddr,
    /// Encapsulation from now on.
    pub encap: Option<UdpEncap>,
    /// Limits from now on (counted from the SA's installation, as before).
    pub lifetime: Lifetimes,
}

/// What a policy does with matching traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PolicyAction {
    /// Protect with the named outbound SA.
    Protect {
        /// The SA's name ([`SaSpec::name`]).
        sa_name: String,
    },
    /// Forward in the clear.
    Bypass,
    /// Drop.
    Discard,
}

/// A security policy (an SPD entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// Identity of the policy (replaces a policy with the same id).
    pub policy_id: u32,
    /// Generation (see [`SaRef`]).
    pub generation: u64,
    /// Outbound (the SPD proper) or inbound (checked after decryption / for bypass).
    pub direction: Direction,
    /// Lower values are matched first.
    pub priority: u32,
    /// Traffic.
    pub selector: Selector,
    /// Action.
    pub action: PolicyAction,
}

/// The counters of one SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SaCounters {
    /// The SA.
    pub sa: SaRef,
    /// Packets protected or accepted.
    pub packets: u64,
    /// Inner bytes.
    pub bytes: u64,
    /// Packets dropped on this SA for any reason.
    pub drops: u64,
    /// Of those, replay or too old.
    pub replay_drops: u64,
    /// Of those, ICV failures.
    pub auth_failures: u64,
    /// Outbound: the last sequence number used; inbound: the highest one accepted. A
    /// restarted control process re-pushes the SA with this as `initial_seq`.
    pub last_seq: u64,
}

impl Default for SaRef {
    fn default() -> Self {
        SaRef {
            direction: Direction::In,
            spi: MIN_SPI,
            generation: 0,
        }
    }
}

/// One record.
///
/// Control process → data plane: `AddSa` … `Resync`; data plane → control process: the rest.
/// The data plane answers every record it consumes with exactly one [`Record::Applied`] or
/// [`Record::Rejected`] carrying the record's sequence number, after any replies it caused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Install an SA. Idempotent: the same SA (same generation, same content) again changes
    /// nothing; during a resync, an SA the data plane already has (same direction, SPI,
    /// addresses and keys) is adopted with the new generation and keeps its sequence numbers,
    /// replay window and counters.
    AddSa(Box<SaSpec>),
    /// Change an installed SA's peer address, encapsulation or lifetimes.
    UpdateSa(SaUpdate),
    /// Delete an SA (only if its generation matches: a stale delete never removes a newer SA).
    /// Deleting an SA that is not there is applied (it is already gone).
    DeleteSa(SaRef),
    /// Add or replace a policy.
    AddPolicy(Box<PolicySpec>),
    /// Delete a policy (if its generation matches).
    DeletePolicy {
        /// The policy's id.
        policy_id: u32,
        /// Its generation.
        generation: u64,
    },
    /// Remove every SA and policy whose generation is below `older_than` (`u64::MAX`:
    /// everything). Ends a resync: what the new control process did not re-push goes.
    Flush {
        /// Exclusive bound.
        older_than: u64,
    },
    /// Ask for [`Record::CountersReply`]s: of one SA, or of every SA (`None`).
    QueryCounters {
        /// The SA, or all.
        sa: Option<SaRef>,
    },
    /// A full re-push begins; every record after it carries a generation ≥ this one, and a
    /// [`Record::Flush`] with `older_than = generation` ends it.
    Resync {
        /// The resync's generation.
        generation: u64,
    },
    /// An SA crossed a soft limit: time to rekey.
    SoftExpired {
        /// The SA.
        sa: SaRef,
        /// Which limit.
        limit: Limit,
    },
    /// An SA crossed a hard limit: it no longer carries traffic.
    HardExpired {
        /// The SA.
        sa: SaRef,
        /// Which limit.
        limit: Limit,
    },
    /// An outbound SA's sequence numbers are close to running out.
    SeqNearExhaustion {
        /// The SA.
        sa: SaRef,
    },
    /// ESP arrived for an SPI we do not have (rate-limited by the data plane), so IKE can
    /// send INVALID-SPI.
    UnknownSpi {
        /// The SPI in the packet.
        spi: u32,
        /// Outer source address.
        src: IpAddr,
        /// Outer destination address.
        dst: IpAddr,
        /// UDP source port for ESP-in-UDP, 0 for plain ESP.
        src_port: u16,
        /// UDP destination port for ESP-in-UDP, 0 for plain ESP.
        dst_port: u16,
    },
    /// ESP-in-UDP for a known inbound SA arrived from a new source address or port.
    NatMappingChanged {
        /// The SA.
        sa: SaRef,
        /// New outer source address.
        src: IpAddr,
        /// New UDP source port.
        src_port: u16,
    },
    /// The first packet was accepted on an inbound SA (the peer has switched to it).
    FirstPacket {
        /// The SA.
        sa: SaRef,
    },
    /// No packet on an SA for this long (DPD, idle teardown).
    Idle {
        /// The SA.
        sa: SaRef,
        /// Seconds since the last packet.
        seconds: u32,
    },
    /// Counters of one SA, in answer to [`Record::QueryCounters`].
    CountersReply(SaCounters),
    /// A record was not applied.
    Rejected {
        /// Sequence number of the rejected record.
        seq: u64,
        /// Why, at most [`MAX_REASON_LEN`] bytes.
        reason: String,
    },
    /// A record was applied.
    Applied {
        /// Its sequence number.
        seq: u64,
    },
}

impl Record {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            Record::AddSa(_) => Kind::AddSa,
            Record::UpdateSa(_) => Kind::UpdateSa,
            Record::DeleteSa(_) => Kind::DeleteSa,
            Record::AddPolicy(_) => Kind::AddPolicy,
            Record::DeletePolicy { .. } => Kind::DeletePolicy,
            Record::Flush { .. } => Kind::Flush,
            Record::QueryCounters { .. } => Kind::QueryCounters,
            Record::Resync { .. } => Kind::Resync,
            Record::SoftExpired { .. } => Kind::SoftExpired,
            Record::HardExpired { .. } => Kind::HardExpired,
            Record::SeqNearExhaustion { .. } => Kind::SeqNearExhaustion,
            Record::UnknownSpi { .. } => Kind::UnknownSpi,
            Record::NatMappingChanged { .. } => Kind::NatMappingChanged,
            Record::FirstPacket { .. } => Kind::FirstPacket,
            Record::Idle { .. } => Kind::Idle,
            Record::CountersReply(_) => Kind::CountersReply,
            Record::Rejected { .. } => Kind::Rejected,
            Record::Applied { .. } => Kind::Applied,
        }
    }

    /// A [`Record::Rejected`] for record `seq`; `reason` is shortened to [`MAX_REASON_LEN`]
    /// bytes (at a character boundary, with `…`).
    pub fn rejected(seq: u64, reason: impl fmt::Display) -> Record {
        let mut reason = reason.to_string();
        if reason.len() > MAX_REASON_LEN {
            let mut cut = MAX_REASON_LEN - '…'.len_utf8();
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push('…');
        }
        Record::Rejected { seq, reason }
    }

    /// Writes the record into `buf`; returns the number of bytes written. The record is
    /// validated first (the same checks as [`Record::decode`]), so a record that encodes also
    /// decodes. On error `buf` may hold part of the record (the ring wipes it).
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        validate(self).map_err(EncodeError::Invalid)?;
        let mut w = Writer { buf, pos: 0 };
        w.u16("kind", self.kind().to_wire())?;
        match self {
            Record::AddSa(s) => {
                w.u64("generation", s.generation)?;
                w.u32("spi", s.spi)?;
                w.enum_("direction", s.direction)?;
                w.enum_("mode", s.mode)?;
                w.u32("reqid", s.reqid)?;
                w.bytes("name", s.name.as_bytes())?;
                w.addr("local", s.local)?;
                w.addr("remote", s.remote)?;
                w.encap("encap", s.encap)?;
                w.enum_("enc_alg", s.enc_alg)?;
                w.enum_("integ_alg", s.integ_alg)?;
                w.bytes("enc_key", s.enc_key.as_bytes())?;
                w.bytes("salt", s.salt.as_bytes())?;
                w.bytes("integ_key", s.integ_key.as_bytes())?;
                w.u8("icv_len", s.icv_len)?;
                w.u8("esn", u8::from(s.esn))?;
                w.u64("initial_seq", s.initial_seq)?;
                w.u32("replay_window", s.replay_window)?;
                w.lifetimes(&s.lifetime)?;
                w.u8("selectors", s.selectors.len() as u8)?;
                for sel in &s.selectors {
                    w.selector(sel)?;
                }
                w.enum_("df", s.df)?;
                w.u8("dscp", dscp_to_wire(s.dscp))?;
                w.enum_("ecn", s.ecn)?;
                w.u8("outer_ttl", s.outer_ttl)?;
            }
            Record::UpdateSa(u) => {
                w.sa_ref(&u.sa)?;
                w.addr("remote", u.remote)?;
                w.encap("encap", u.encap)?;
                w.lifetimes(&u.lifetime)?;
            }
            Record::DeleteSa(sa) => w.sa_ref(sa)?,
            Record::AddPolicy(p) => {
                w.u32("policy_id", p.policy_id)?;
                w.u64("generation", p.generation)?;
                w.enum_("direction", p.direction)?;
                w.u32("priority", p.priority)?;
                w.selector(&p.selector)?;
                match &p.action {
                    PolicyAction::Protect { sa_name } => {
                        w.u8("action", ACTION_PROTECT)?;
                        w.bytes("sa_name", sa_name.as_bytes())?;
                    }
                    PolicyAction::Bypass => w.u8("action", ACTION_BYPASS)?,
                    PolicyAction::Discard => w.u8("action", ACTION_DISCARD)?,
                }
            }
            Record::DeletePolicy {
                policy_id,
                generation,
            } => {
                w.u32("policy_id", *policy_id)?;
                w.u64("generation", *generation)?;
            }
            Record::Flush { older_than } => w.u64("older_than", *older_than)?,
            Record::QueryCounters { sa } => match sa {
                None => w.u8("sa", 0)?,
                Some(sa) => {
                    w.u8("sa", 1)?;
                    w.sa_ref(sa)?;
                }
            },
            Record::Resync { generation } => w.u64("generation", *generation)?,
            Record::SoftExpired { sa, limit } | Record::HardExpired { sa, limit } => {
                w.sa_ref(sa)?;
                w.enum_("limit", *limit)?;
            }
            Record::SeqNearExhaustion { sa } | Record::FirstPacket { sa } => w.sa_ref(sa)?,
            Record::UnknownSpi {
                spi,
                src,
                dst,
                src_port,
                dst_port,
            } => {
                w.u32("spi", *spi)?;
                w.addr("src", *src)?;
                w.addr("dst", *dst)?;
                w.u16("src_port", *src_port)?;
                w.u16("dst_port", *dst_port)?;
            }
            Record::NatMappingChanged { sa, src, src_port } => {
                w.sa_ref(sa)?;
                w.addr("src", *src)?;
                w.u16("src_port", *src_port)?;
            }
            Record::Idle { sa, seconds } => {
                w.sa_ref(sa)?;
                w.u32("seconds", *seconds)?;
            }
            Record::CountersReply(c) => {
                w.sa_ref(&c.sa)?;
                w.u64("packets", c.packets)?;
                w.u64("bytes", c.bytes)?;
                w.u64("drops", c.drops)?;
                w.u64("replay_drops", c.replay_drops)?;
                w.u64("auth_failures", c.auth_failures)?;
                w.u64("last_seq", c.last_seq)?;
            }
            Record::Rejected { seq, reason } => {
                w.u64("seq", *seq)?;
                w.bytes("reason", reason.as_bytes())?;
            }
            Record::Applied { seq } => w.u64("seq", *seq)?,
        }
        Ok(w.pos)
    }

    /// Reads a record from exactly `buf` (trailing bytes are an error). Never panics.
    pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let kind_raw = r.u16("kind")?;
        let kind = Kind::from_wire(kind_raw).ok_or(DecodeError::UnknownKind(kind_raw))?;
        let rec = match kind {
            Kind::AddSa => {
                let generation = r.u64("generation")?;
                let spi = r.u32("spi")?;
                let direction = r.enum_("direction")?;
                let mode = r.enum_("mode")?;
                let reqid = r.u32("reqid")?;
                let name = r.string("name", MAX_NAME_LEN)?;
                let local = r.addr("local")?;
                let remote = r.addr("remote")?;
                let encap = r.encap("encap")?;
                let enc_alg = r.enum_("enc_alg")?;
                let integ_alg = r.enum_("integ_alg")?;
                let enc_key = r.key("enc_key", MAX_KEY_LEN)?;
                let salt = r.key("salt", MAX_SALT_LEN)?;
                let integ_key = r.key("integ_key", MAX_KEY_LEN)?;
                let icv_len = r.u8("icv_len")?;
                let esn = r.bool("esn")?;
                let initial_seq = r.u64("initial_seq")?;
                let replay_window = r.u32("replay_window")?;
                let lifetime = r.lifetimes()?;
                let n = usize::from(r.u8("selectors")?);
                if n > MAX_SELECTORS {
                    return Err(DecodeError::TooLong {
                        field: "selectors",
                        len: n,
                        max: MAX_SELECTORS,
                    });
                }
                let mut selectors = Vec::with_capacity(n);
                for _ in 0..n {
                    selectors.push(r.selector()?);
                }
                let df = r.enum_("df")?;
                let dscp = dscp_from_wire(r.u8("dscp")?)?;
                let ecn = r.enum_("ecn")?;
                let outer_ttl = r.u8("outer_ttl")?;
                Record::AddSa(Box::new(SaSpec {
                    generation,
                    spi,
                    direction,
                    mode,
                    reqid,
                    name,
                    local,
                    remote,
                    encap,
                    enc_alg,
                    integ_alg,
                    enc_key,
                    salt,
                    integ_key,
                    icv_len,
                    esn,
                    initial_seq,
                    replay_window,
                    lifetime,
                    selectors,
                    df,
                    dscp,
                    ecn,
                    outer_ttl,
                }))
            }
            Kind::UpdateSa => Record::UpdateSa(SaUpdate {
                sa: r.sa_ref()?,
                remote: r.addr("remote")?,
                encap: r.encap("encap")?,
                lifetime: r.lifetimes()?,
            }),
            Kind::DeleteSa => Record::DeleteSa(r.sa_ref()?),
            Kind::AddPolicy => {
                let policy_id = r.u32("policy_id")?;
                let generation = r.u64("generation")?;
                let direction = r.enum_("direction")?;
                let priority = r.u32("priority")?;
                let selector = r.selector()?;
                let action = match r.u8("action")? {
                    ACTION_PROTECT => PolicyAction::Protect {
                        sa_name: r.string("sa_name", MAX_NAME_LEN)?,
                    },
                    ACTION_BYPASS => PolicyAction::Bypass,
                    ACTION_DISCARD => PolicyAction::Discard,
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "action",
                            value: u64::from(v),
                            what: "policy action (1 = protect, 2 = bypass, 3 = discard)",
                        });
                    }
                };
                Record::AddPolicy(Box::new(PolicySpec {
                    policy_id,
                    generation,
                    direction,
                    priority,
                    selector,
                    action,
                }))
            }
            Kind::DeletePolicy => Record::DeletePolicy {
                policy_id: r.u32("policy_id")?,
                generation: r.u64("generation")?,
            },
            Kind::Flush => Record::Flush {
                older_than: r.u64("older_than")?,
            },
            Kind::QueryCounters => Record::QueryCounters {
                sa: if r.bool("sa")? {
                    Some(r.sa_ref()?)
                } else {
                    None
                },
            },
            Kind::Resync => Record::Resync {
                generation: r.u64("generation")?,
            },
            Kind::SoftExpired => Record::SoftExpired {
                sa: r.sa_ref()?,
                limit: r.enum_("limit")?,
            },
            Kind::HardExpired => Record::HardExpired {
                sa: r.sa_ref()?,
                limit: r.enum_("limit")?,
            },
            Kind::SeqNearExhaustion => Record::SeqNearExhaustion { sa: r.sa_ref()? },
            Kind::UnknownSpi => Record::UnknownSpi {
                spi: r.u32("spi")?,
                src: r.addr("src")?,
                dst: r.addr("dst")?,
                src_port: r.u16("src_port")?,
                dst_port: r.u16("dst_port")?,
            },
            Kind::NatMappingChanged => Record::NatMappingChanged {
                sa: r.sa_ref()?,
                src: r.addr("src")?,
                src_port: r.u16("src_port")?,
            },
            Kind::FirstPacket => Record::FirstPacket { sa: r.sa_ref()? },
            Kind::Idle => Record::Idle {
                sa: r.sa_ref()?,
                seconds: r.u32("seconds")?,
            },
            Kind::CountersReply => Record::CountersReply(SaCounters {
                sa: r.sa_ref()?,
                packets: r.u64("packets")?,
                bytes: r.u64("bytes")?,
                drops: r.u64("drops")?,
                replay_drops: r.u64("replay_drops")?,
                auth_failures: r.u64("auth_failures")?,
                last_seq: r.u64("last_seq")?,
            }),
            Kind::Rejected => Record::Rejected {
                seq: r.u64("seq")?,
                reason: r.string("reason", MAX_REASON_LEN)?,
            },
            Kind::Applied => Record::Applied { seq: r.u64("seq")? },
        };
        if r.pos != buf.len() {
            return Err(DecodeError::TrailingBytes {
                extra: buf.len() - r.pos,
            });
        }
        validate(&rec).map_err(DecodeError::Invalid)?;
        Ok(rec)
    }
}

const ACTION_PROTECT: u8 = 1;
const ACTION_BYPASS: u8 = 2;
const ACTION_DISCARD: u8 = 3;
const DSCP_COPY: u8 = 0xFF;

fn dscp_to_wire(d: DscpMode) -> u8 {
    match d {
        DscpMode::Copy => DSCP_COPY,
        DscpMode::Set(v) => v,
    }
}

fn dscp_from_wire(v: u8) -> Result<DscpMode, DecodeError> {
    match v {
        DSCP_COPY => Ok(DscpMode::Copy),
        0..=63 => Ok(DscpMode::Set(v)),
        _ => Err(DecodeError::BadValue {
            field: "dscp",
            value: u64::from(v),
            what: "DSCP (0…63, 255 = copy)",
        }),
    }
}

/// A field whose value makes the record meaningless, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// The field, as named in the record's struct.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.field, self.problem)
    }
}

fn problem(field: &'static str, problem: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field,
        problem: problem.into(),
    }
}

/// Why a record could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The buffer ends before the record does.
    #[error("the {have}-byte buffer is too small for the record (`{field}` does not fit)")]
    BufferTooSmall {
        /// The first field that did not fit.
        field: &'static str,
        /// The buffer's length.
        have: usize,
    },
    /// A field's value is not allowed.
    #[error("{0}")]
    Invalid(FieldProblem),
}

/// Why bytes are not a valid record. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The kind is not one this program knows.
    #[error("unknown record kind {0:#06x}")]
    UnknownKind(u16),
    /// The bytes end inside a field.
    #[error("record ends inside `{field}`")]
    Truncated {
        /// The field.
        field: &'static str,
    },
    /// A one-byte enumeration (or flag) with a value outside its range.
    #[error("`{field}`: {value} is not a valid {what}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What was expected.
        what: &'static str,
    },
    /// A length (of a string, key or list) above its maximum.
    #[error("`{field}` is {len} long, at most {max} allowed")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The length found.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A string that is not UTF-8.
    #[error("`{field}` is not valid UTF-8")]
    NotUtf8 {
        /// The field.
        field: &'static str,
    },
    /// The record is well-formed but a value is not allowed (see [`Record::encode`]).
    #[error("{0}")]
    Invalid(FieldProblem),
    /// Bytes after the last field.
    #[error("{extra} unexpected bytes after the end of the record")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

impl DecodeError {
    /// The field at fault, if the error is about one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            DecodeError::UnknownKind(_) => Some("kind"),
            DecodeError::Truncated { field }
            | DecodeError::BadValue { field, .. }
            | DecodeError::TooLong { field, .. }
            | DecodeError::NotUtf8 { field } => Some(field),
            DecodeError::Invalid(p) => Some(p.field),
            DecodeError::TrailingBytes { .. } => None,
        }
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, field: &'static str, bytes: &[u8]) -> Result<(), EncodeError> {
        let end = self.pos + bytes.len();
        let Some(dst) = self.buf.get_mut(self.pos..end) else {
            return Err(EncodeError::BufferTooSmall {
                field,
                have: self.buf.len(),
            });
        };
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
    fn u8(&mut self, field: &'static str, v: u8) -> Result<(), EncodeError> {
        self.put(field, &[v])
    }
    fn u16(&mut self, field: &'static str, v: u16) -> Result<(), EncodeError> {
        self.put(field, &v.to_le_bytes())
    }
    fn u32(&mut self, field: &'static str, v: u32) -> Result<(), EncodeError> {
        self.put(field, &v.to_le_bytes())
    }
    fn u64(&mut self, field: &'static str, v: u64) -> Result<(), EncodeError> {
        self.put(field, &v.to_le_bytes())
    }
    fn enum_<E: WireEnum>(&mut self, field: &'static str, v: E) -> Result<(), EncodeError> {
        self.u8(field, v.to_wire())
    }
    /// Length byte and bytes; the length was checked by `validate`.
    fn bytes(&mut self, field: &'static str, b: &[u8]) -> Result<(), EncodeError> {
        self.u8(field, b.len() as u8)?;
        self.put(field, b)
    }
    fn addr(&mut self, field: &'static str, a: IpAddr) -> Result<(), EncodeError> {
        match a {
            IpAddr::V4(a) => {
                self.u8(field, 4)?;
                self.put(field, &a.octets())
            }
            IpAddr::V6(a) => {
                self.u8(field, 6)?;
                self.put(field, &a.octets())
            }
        }
    }
    fn encap(&mut self, field: &'static str, e: Option<UdpEncap>) -> Result<(), EncodeError> {
        match e {
            None => self.u8(field, 0),
            Some(e) => {
                self.u8(field, 1)?;
                self.u16("encap.local_port", e.local_port)?;
                self.u16("encap.remote_port", e.remote_port)
            }
        }
    }
    fn sa_ref(&mut self, sa: &SaRef) -> Result<(), EncodeError> {
        self.enum_("sa.direction", sa.direction)?;
        self.u32("sa.spi", sa.spi)?;
        self.u64("sa.generation", sa.generation)
    }
    fn lifetimes(&mut self, l: &Lifetimes) -> Result<(), EncodeError> {
        self.u64("lifetime.soft_seconds", l.soft_seconds)?;
        self.u64("lifetime.hard_seconds", l.hard_seconds)?;
        self.u64("lifetime.soft_bytes", l.soft_bytes)?;
        self.u64("lifetime.hard_bytes", l.hard_bytes)?;
        self.u64("lifetime.soft_packets", l.soft_packets)?;
        self.u64("lifetime.hard_packets", l.hard_packets)
    }
    /// Family byte once, then both prefixes (validated to be of that family).
    fn selector(&mut self, s: &Selector) -> Result<(), EncodeError> {
        match (s.src.addr, s.dst.addr) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                self.u8("selector.family", 4)?;
                self.put("selector.src", &src.octets())?;
                self.u8("selector.src_len", s.src.len)?;
                self.put("selector.dst", &dst.octets())?;
                self.u8("selector.dst_len", s.dst.len)?;
            }
            (src, dst) => {
                self.u8("selector.family", 6)?;
                self.put("selector.src", &v6(src).octets())?;
                self.u8("selector.src_len", s.src.len)?;
                self.put("selector.dst", &v6(dst).octets())?;
                self.u8("selector.dst_len", s.dst.len)?;
            }
        }
        self.u8("selector.protocol", s.protocol)?;
        self.u16("selector.src_ports", s.src_ports.first)?;
        self.u16("selector.src_ports", s.src_ports.last)?;
        self.u16("selector.dst_ports", s.dst_ports.first)?;
        self.u16("selector.dst_ports", s.dst_ports.last)
    }
}

/// Only reached for IPv6 selectors (mixed families are rejected by `validate`).
fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos + n;
        let b = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated { field })?;
        self.pos = end;
        Ok(b)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadValue {
                field,
                value: u64::from(v),
                what: "flag (0 or 1)",
            }),
        }
    }
    fn enum_<E: WireEnum>(&mut self, field: &'static str) -> Result<E, DecodeError> {
        let v = self.u8(field)?;
        E::from_wire(v).ok_or(DecodeError::BadValue {
            field,
            value: u64::from(v),
            what: E::WHAT,
        })
    }
    fn len_prefixed(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.u8(field)?);
        if n > max {
            return Err(DecodeError::TooLong { field, len: n, max });
        }
        self.take(field, n)
    }
    fn string(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let b = self.len_prefixed(field, max)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8 { field })
    }
    fn key(&mut self, field: &'static str, max: usize) -> Result<Key, DecodeError> {
        let b = self.len_prefixed(field, max)?;
        Key::new(b).ok_or(DecodeError::TooLong {
            field,
            len: b.len(),
            max,
        })
    }
    fn family(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            4 => Ok(false),
            6 => Ok(true),
            v => Err(DecodeError::BadValue {
                field,
                value: u64::from(v),
                what: "address family (4 or 6)",
            }),
        }
    }
    fn addr_of(&mut self, field: &'static str, is_v6: bool) -> Result<IpAddr, DecodeError> {
        Ok(if is_v6 {
            IpAddr::V6(Ipv6Addr::from(self.array::<16>(field)?))
        } else {
            IpAddr::V4(Ipv4Addr::from(self.array::<4>(field)?))
        })
    }
    fn addr(&mut self, field: &'static str) -> Result<IpAddr, DecodeError> {
        let is_v6 = self.family(field)?;
        self.addr_of(field, is_v6)
    }
    fn encap(&mut self, field: &'static str) -> Result<Option<UdpEncap>, DecodeError> {
        Ok(if self.bool(field)? {
            Some(UdpEncap {
                local_port: self.u16("encap.local_port")?,
                remote_port: self.u16("encap.remote_port")?,
            })
        } else {
            None
        })
    }
    fn sa_ref(&mut self) -> Result<SaRef, DecodeError> {
        Ok(SaRef {
            direction: self.enum_("sa.direction")?,
            spi: self.u32("sa.spi")?,
            generation: self.u64("sa.generation")?,
        })
    }
    fn lifetimes(&mut self) -> Result<Lifetimes, DecodeError> {
        Ok(Lifetimes {
            soft_seconds: self.u64("lifetime.soft_seconds")?,
            hard_seconds: self.u64("lifetime.hard_seconds")?,
            soft_bytes: self.u64("lifetime.soft_bytes")?,
            hard_bytes: self.u64("lifetime.hard_bytes")?,
            soft_packets: self.u64("lifetime.soft_packets")?,
            hard_packets: self.u64("lifetime.hard_packets")?,
        })
    }
    fn selector(&mut self) -> Result<Selector, DecodeError> {
        let is_v6 = self.family("selector.family")?;
        let src = self.addr_of("selector.src", is_v6)?;
        let src_len = self.u8("selector.src_len")?;
        let dst = self.addr_of("selector.dst", is_v6)?;
        let dst_len = self.u8("selector.dst_len")?;
        let protocol = self.u8("selector.protocol")?;
        let src_ports = PortRange {
            first: self.u16("selector.src_ports")?,
            last: self.u16("selector.src_ports")?,
        };
        let dst_ports = PortRange {
            first: self.u16("selector.dst_ports")?,
            last: self.u16("selector.dst_ports")?,
        };
        Ok(Selector {
            src: IpPrefix {
                addr: src,
                len: src_len,
            },
            dst: IpPrefix {
                addr: dst,
                len: dst_len,
            },
            protocol,
            src_ports,
            dst_ports,
        })
    }
}

fn family_name(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn check_name(field: &'static str, name: &str) -> Result<(), FieldProblem> {
    if name.is_empty() {
        return Err(problem(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(problem(
            field,
            format!(
                "is {} bytes long, at most {MAX_NAME_LEN} allowed",
                name.len()
            ),
        ));
    }
    Ok(())
}

fn check_spi(field: &'static str, spi: u32) -> Result<(), FieldProblem> {
    if spi < MIN_SPI {
        return Err(problem(
            field,
            format!("SPI {spi} is reserved (0…255, RFC 4303 §2.1)"),
        ));
    }
    Ok(())
}

fn check_selector(s: &Selector) -> Result<(), FieldProblem> {
    if s.src.addr.is_ipv4() != s.dst.addr.is_ipv4() {
        return Err(problem(
            "selector.dst",
            format!(
                "{} destination with an {} source",
                family_name(s.dst.addr),
                family_name(s.src.addr)
            ),
        ));
    }
    let width = if s.src.addr.is_ipv4() { 32 } else { 128 };
    if s.src.len > width {
        return Err(problem(
            "selector.src_len",
            format!("prefix length {} exceeds {width}", s.src.len),
        ));
    }
    if s.dst.len > width {
        return Err(problem(
            "selector.dst_len",
            format!("prefix length {} exceeds {width}", s.dst.len),
        ));
    }
    for (field, r) in [
        ("selector.src_ports", s.src_ports),
        ("selector.dst_ports", s.dst_ports),
    ] {
        if r.first > r.last {
            return Err(problem(
                field,
                format!("empty range {}…{}", r.first, r.last),
            ));
        }
    }
    Ok(())
}

fn check_len(field: &'static str, got: usize, want: usize, what: &str) -> Result<(), FieldProblem> {
    if got != want {
        return Err(problem(field, format!("{got} bytes, {what} needs {want}")));
    }
    Ok(())
}

fn check_sa(s: &SaSpec) -> Result<(), FieldProblem> {
    check_spi("spi", s.spi)?;
    check_name("name", &s.name)?;
    if s.local.is_ipv4() != s.remote.is_ipv4() {
        return Err(problem(
            "remote",
            format!(
                "{} address with an {} local address",
                family_name(s.remote),
                family_name(s.local)
            ),
        ));
    }
    let alg = s.enc_alg;
    check_len("enc_key", s.enc_key.len(), alg.key_len(), alg.name())?;
    check_len("salt", s.salt.len(), alg.salt_len(), alg.name())?;
    if alg.is_aead() {
        if s.integ_alg != IntegAlg::None {
            return Err(problem(
                "integ_alg",
                format!(
                    "{alg} is combined mode and takes integ_alg none, not {}",
                    s.integ_alg
                ),
            ));
        }
    } else if s.integ_alg == IntegAlg::None {
        return Err(problem(
            "integ_alg",
            format!("{alg} needs an integrity algorithm"),
        ));
    }
    check_len(
        "integ_key",
        s.integ_key.len(),
        s.integ_alg.key_len(),
        s.integ_alg.name(),
    )?;
    let icv = alg.aead_icv_len().unwrap_or(s.integ_alg.icv_len());
    if usize::from(s.icv_len) != icv {
        return Err(problem(
            "icv_len",
            format!(
                "{} bytes, {}/{} produces {icv}",
                s.icv_len, alg, s.integ_alg
            ),
        ));
    }
    if s.selectors.len() > MAX_SELECTORS {
        return Err(problem(
            "selectors",
            format!(
                "{} selectors, at most {MAX_SELECTORS} allowed",
                s.selectors.len()
            ),
        ));
    }
    for sel in &s.selectors {
        check_selector(sel)?;
    }
    if let DscpMode::Set(v) = s.dscp
        && v > 63
    {
        return Err(problem("dscp", format!("{v} is not a DSCP (0…63)")));
    }
    if s.outer_ttl == 0 {
        return Err(problem("outer_ttl", "must be 1…255"));
    }
    Ok(())
}

fn check_sa_ref(sa: &SaRef) -> Result<(), FieldProblem> {
    check_spi("sa.spi", sa.spi)
}

/// The checks [`Record::encode`] and [`Record::decode`] share: values that are representable
/// but meaningless (reserved SPI, key length that does not fit the algorithm, mixed address
/// families, …).
fn validate(rec: &Record) -> Result<(), FieldProblem> {
    match rec {
        Record::AddSa(s) => check_sa(s),
        Record::UpdateSa(u) => check_sa_ref(&u.sa),
        Record::DeleteSa(sa)
        | Record::SoftExpired { sa, .. }
        | Record::HardExpired { sa, .. }
        | Record::SeqNearExhaustion { sa }
        | Record::NatMappingChanged { sa, .. }
        | Record::FirstPacket { sa }
        | Record::Idle { sa, .. }
        | Record::CountersReply(SaCounters { sa, .. })
        | Record::QueryCounters { sa: Some(sa) } => check_sa_ref(sa),
        Record::AddPolicy(p) => {
            check_selector(&p.selector)?;
            if let PolicyAction::Protect { sa_name } = &p.action {
                check_name("sa_name", sa_name)?;
            }
            Ok(())
        }
        Record::Rejected { reason, .. } => {
            if reason.len() > MAX_REASON_LEN {
                return Err(problem(
                    "reason",
                    format!(
                        "is {} bytes long, at most {MAX_REASON_LEN} allowed (use Record::rejected)",
                        reason.len()
                    ),
                ));
            }
            Ok(())
        }
        Record::DeletePolicy { .. }
        | Record::Flush { .. }
        | Record::QueryCounters { sa: None }
        | Record::Resync { .. }
        | Record::UnknownSpi { .. }
        | Record::Applied { .. } => Ok(()),
    }
}
