//! Traffic selectors and the outbound security policy database (RFC 4301 §4.4.1).
//!
//! A [`Selector`] matches a packet on source/destination prefix, protocol and ports. The SPD is
//! an ordered list of selectors with an action; the first match wins. SAs carry selectors too:
//! after decryption an inbound packet must match one of its SA's selectors (RFC 4301 §5.2).

use crate::sa::SaId;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

/// An address prefix stored as a 128-bit number, for a cheap per-packet test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    v6: bool,
    len: u8,
    addr: u128,
    /// Network mask, kept so that the per-packet test is one AND and one compare.
    mask: u128,
}

impl Prefix {
    /// `addr/len`; host bits are cleared. `len` is clamped to the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Self {
        let (v6, bits, width) = match addr {
            IpAddr::V4(a) => (false, u128::from(a.to_bits()), 32u8),
            IpAddr::V6(a) => (true, a.to_bits(), 128u8),
        };
        let len = len.min(width);
        let mask = Self::mask_for(v6, len);
        Prefix {
            v6,
            len,
            addr: bits & mask,
            mask,
        }
    }

    /// Any address of the family (`0.0.0.0/0` or `::/0`).
    pub fn any(v6: bool) -> Self {
        Prefix {
            v6,
            len: 0,
            addr: 0,
            mask: 0,
        }
    }

    /// The host prefix of `addr`.
    pub fn host(addr: IpAddr) -> Self {
        Prefix::new(addr, 128)
    }

    fn mask_for(v6: bool, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            let ones = (!0u128) << (128 - u32::from(len));
            if v6 { ones } else { (ones >> 96) & 0xFFFF_FFFF }
        }
    }

    fn mask(&self) -> u128 {
        self.mask
    }

    /// Prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// True for an IPv6 prefix.
    pub fn is_v6(&self) -> bool {
        self.v6
    }

    /// Does the prefix contain the address?
    #[inline]
    pub fn contains(&self, a: &FlowAddr) -> bool {
        self.v6 == a.v6 && (a.bits & self.mask()) == self.addr
    }

    /// Do the two prefixes share any address?
    pub fn overlaps(&self, o: &Prefix) -> bool {
        if self.v6 != o.v6 {
            return false;
        }
        let shorter = if self.len <= o.len { self } else { o };
        (self.addr & shorter.mask()) == (o.addr & shorter.mask())
    }

    /// Does `self` contain every address of `o`?
    pub fn covers(&self, o: &Prefix) -> bool {
        self.v6 == o.v6 && self.len <= o.len && (o.addr & self.mask()) == self.addr
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(std::net::Ipv6Addr::from_bits(self.addr))
        } else {
            IpAddr::V4(std::net::Ipv4Addr::from_bits(self.addr as u32))
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

impl From<ipnet::IpNet> for Prefix {
    fn from(n: ipnet::IpNet) -> Self {
        Prefix::new(n.addr(), n.prefix_len())
    }
}

/// An address in the form selectors compare against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowAddr {
    /// IPv6?
    pub v6: bool,
    /// The address as a number (IPv4 in the low 32 bits).
    pub bits: u128,
}

impl From<IpAddr> for FlowAddr {
    fn from(a: IpAddr) -> Self {
        match a {
            IpAddr::V4(a) => FlowAddr {
                v6: false,
                bits: u128::from(a.to_bits()),
            },
            IpAddr::V6(a) => FlowAddr {
                v6: true,
                bits: a.to_bits(),
            },
        }
    }
}

impl FlowAddr {
    /// Back to an `IpAddr`.
    pub fn ip(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(std::net::Ipv6Addr::from_bits(self.bits))
        } else {
            IpAddr::V4(std::net::Ipv4Addr::from_bits(self.bits as u32))
        }
    }
}

/// What a selector looks at in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Source address.
    pub src: FlowAddr,
    /// Destination address.
    pub dst: FlowAddr,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub protocol: u8,
    /// Source and destination ports, if the protocol has them and this is a first fragment.
    pub ports: Option<(u16, u16)>,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Lowest port.
    pub lo: u16,
    /// Highest port.
    pub hi: u16,
}

impl PortRange {
    /// Every port (also matches packets that have no ports, RFC 4301 "ANY").
    pub const ANY: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };

    /// Is this the ANY range?
    pub fn is_any(&self) -> bool {
        *self == Self::ANY
    }

    fn overlaps(&self, o: &PortRange) -> bool {
        self.lo <= o.hi && o.lo <= self.hi
    }

    fn covers(&self, o: &PortRange) -> bool {
        self.lo <= o.lo && o.hi <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("any")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A traffic selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Source prefix.
    pub src: Prefix,
    /// Destination prefix.
    pub dst: Prefix,
    /// Protocol, or `None` for any.
    pub protocol: Option<u8>,
    /// Source ports.
    pub src_ports: PortRange,
    /// Destination ports.
    pub dst_ports: PortRange,
}

impl Selector {
    /// Does the packet match?
    #[inline]
    pub fn matches(&self, k: &FlowKey) -> bool {
        if !self.src.contains(&k.src) || !self.dst.contains(&k.dst) {
            return false;
        }
        if let Some(p) = self.protocol
            && p != k.protocol
        {
            return false;
        }
        if self.src_ports.is_any() && self.dst_ports.is_any() {
            return true;
        }
        match k.ports {
            Some((s, d)) => {
                self.src_ports.lo <= s
                    && s <= self.src_ports.hi
                    && self.dst_ports.lo <= d
                    && d <= self.dst_ports.hi
            }
            None => false,
        }
    }

    /// Could some packet match both selectors?
    pub fn overlaps(&self, o: &Selector) -> bool {
        self.src.overlaps(&o.src)
            && self.dst.overlaps(&o.dst)
            && (self.protocol.is_none() || o.protocol.is_none() || self.protocol == o.protocol)
            && self.src_ports.overlaps(&o.src_ports)
            && self.dst_ports.overlaps(&o.dst_ports)
    }

    /// Does every packet matching `o` also match `self`?
    pub fn covers(&self, o: &Selector) -> bool {
        self.src.covers(&o.src)
            && self.dst.covers(&o.dst)
            && (self.protocol.is_none() || self.protocol == o.protocol)
            && self.src_ports.covers(&o.src_ports)
            && self.dst_ports.covers(&o.dst_ports)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)?;
        match self.protocol {
            None => write!(f, " proto any")?,
            Some(p) => write!(f, " proto {p}")?,
        }
        if !self.src_ports.is_any() || !self.dst_ports.is_any() {
            write!(f, " ports {} -> {}", self.src_ports, self.dst_ports)?;
        }
        Ok(())
    }
}

/// What to do with a packet that matches a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Encrypt with this SA.
    Protect(SaId),
    /// Forward in the clear.
    Bypass,
    /// Drop.
    Discard,
}

/// One SPD entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What it matches.
    pub selector: Selector,
    /// What it does.
    pub action: Action,
}

/// The outbound SPD: ordered, first match wins; no match means `default_action`.
///
/// Up to [`Spd::INDEX_FROM`] policies a lookup tries them in order. From there on it uses a
/// tuple-space index built with the SPD: the policies are grouped by the prefix lengths of their
/// selectors (and the address families), each group hashes its policies by their masked source
/// and destination, and a lookup probes each group once with the packet's addresses masked the
/// group's way, checks protocol and ports on the policies found, and keeps the lowest index. So
/// a hub with one host-to-host policy per spoke costs one probe per packet whatever the number
/// of spokes, with the same answers as the ordered walk (a test compares the two).
#[derive(Debug, Clone)]
pub struct Spd {
    /// Policies in priority order.
    policies: Vec<Policy>,
    /// Action for packets no policy matches (Bypass or Discard).
    pub default_action: Action,
    index: Option<TupleIndex>,
}

impl PartialEq for Spd {
    fn eq(&self, o: &Self) -> bool {
        // The index is a function of the policies.
        self.policies == o.policies && self.default_action == o.default_action
    }
}

impl Eq for Spd {}

impl Default for Spd {
    fn default() -> Self {
        Spd::new(Vec::new(), Action::Discard)
    }
}

/// Selectors with the same address families and prefix lengths, hashed by their masked
/// addresses.
#[derive(Debug, Clone)]
struct Tuple {
    src_v6: bool,
    dst_v6: bool,
    src_mask: u128,
    dst_mask: u128,
    /// The lowest policy index in the group: once a match below it is known, the group (and
    /// every later one, the groups being sorted by it) cannot give a lower one.
    first: usize,
    /// Policy indices in ascending order, by (source, destination) network address.
    by_addr: HashMap<(u128, u128), Vec<u32>, foldhash::fast::RandomState>,
}

#[derive(Debug, Clone)]
struct TupleIndex {
    tuples: Vec<Tuple>,
}

impl TupleIndex {
    fn build(policies: &[Policy]) -> Self {
        let mut tuples: Vec<Tuple> = Vec::new();
        let mut which: HashMap<(bool, u8, bool, u8), usize> = HashMap::new();
        for (i, p) in (0u32..).zip(policies) {
            let (src, dst) = (&p.selector.src, &p.selector.dst);
            let key = (src.v6, src.len, dst.v6, dst.len);
            let t = *which.entry(key).or_insert_with(|| {
                tuples.push(Tuple {
                    src_v6: src.v6,
                    dst_v6: dst.v6,
                    src_mask: src.mask,
                    dst_mask: dst.mask,
                    first: i as usize,
                    by_addr: HashMap::default(),
                });
                tuples.len() - 1
            });
            if let Some(t) = tuples.get_mut(t) {
                t.by_addr.entry((src.addr, dst.addr)).or_default().push(i);
            }
        }
        tuples.sort_by_key(|t| t.first);
        TupleIndex { tuples }
    }

    #[inline]
    fn lookup(&self, policies: &[Policy], k: &FlowKey) -> Option<usize> {
        let mut best: Option<usize> = None;
        for t in &self.tuples {
            if best.is_some_and(|b| b < t.first) {
                break;
            }
            if t.src_v6 != k.src.v6 || t.dst_v6 != k.dst.v6 {
                continue;
            }
            let Some(list) = t
                .by_addr
                .get(&(k.src.bits & t.src_mask, k.dst.bits & t.dst_mask))
            else {
                continue;
            };
            for &i in list {
                let i = i as usize;
                if best.is_some_and(|b| b < i) {
                    break;
                }
                if policies.get(i).is_some_and(|p| p.selector.matches(k)) {
                    best = Some(i);
                    break;
                }
            }
        }
        best
    }
}

impl Spd {
    /// SPDs with at least this many policies are looked up through the index; below, the
    /// ordered walk is as fast.
    pub const INDEX_FROM: usize = 16;

    /// An SPD of these policies, in priority order.
    pub fn new(policies: Vec<Policy>, default_action: Action) -> Self {
        let index = (policies.len() >= Self::INDEX_FROM).then(|| TupleIndex::build(&policies));
        Spd {
            policies,
            default_action,
            index,
        }
    }

    /// The policies, in priority order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The first matching policy's action and its index, or the default action with `None`.
    #[inline]
    pub fn lookup(&self, k: &FlowKey) -> (Action, Option<usize>) {
        let found = match &self.index {
            Some(ix) => ix.lookup(&self.policies, k),
            None => self.lookup_in_order(k),
        };
        match found.and_then(|i| self.policies.get(i).map(|p| (p.action, i))) {
            Some((action, i)) => (action, Some(i)),
            None => (self.default_action, None),
        }
    }

    /// The first matching policy's index by trying every policy in order (what [`Spd::lookup`]
    /// does below [`Spd::INDEX_FROM`] policies; public as the baseline of the benchmark).
    #[inline]
    pub fn lookup_in_order(&self, k: &FlowKey) -> Option<usize> {
        self.policies.iter().position(|p| p.selector.matches(k))
    }

    /// Pairs of policies that overlap with different actions (the later one is partly shadowed),
    /// and policies wholly hidden by an earlier one: `(earlier, later, later_is_unreachable)`.
    pub fn overlaps(&self) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        for (j, later) in self.policies.iter().enumerate() {
            for (i, earlier) in self.policies[..j].iter().enumerate() {
                if earlier.selector.covers(&later.selector) {
                    out.push((i, j, true));
                    break;
                }
                if earlier.selector.overlaps(&later.selector) && earlier.action != later.action {
                    out.push((i, j, false));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Addresses from a small universe (so that random selectors and packets often meet):
    /// IPv4 10.a.b.c and IPv6 2001:db8::a:b:c with a, b, c in 0..4.
    fn addr() -> impl Strategy<Value = IpAddr> {
        (any::<bool>(), 0u8..4, 0u8..4, 0u8..4).prop_map(|(v6, a, b, c)| {
            if v6 {
                IpAddr::V6(std::net::Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    u16::from(a),
                    u16::from(b),
                    u16::from(c),
                ))
            } else {
                IpAddr::V4(std::net::Ipv4Addr::new(10, a, b, c))
            }
        })
    }

    fn prefix() -> impl Strategy<Value = Prefix> {
        // Lengths that cut the universe at every level, for both families.
        (
            addr(),
            prop::sample::select(vec![0u8, 8, 16, 24, 30, 32, 112, 120, 126, 128]),
        )
            .prop_map(|(a, len)| match a {
                IpAddr::V4(_) => Prefix::new(a, len.min(32)),
                IpAddr::V6(_) => Prefix::new(a, if len <= 32 { len + 96 } else { len }),
            })
    }

    fn ports() -> impl Strategy<Value = PortRange> {
        prop_oneof![
            3 => Just(PortRange::ANY),
            1 => (1u16..4).prop_map(|p| PortRange { lo: p, hi: p }),
            1 => (1u16..3).prop_map(|p| PortRange { lo: p, hi: p + 1 }),
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            prefix(),
            prefix(),
            prop::option::of(prop::sample::select(vec![1u8, 6, 17])),
            ports(),
            ports(),
            0u8..3,
        )
            .prop_map(|(src, dst, protocol, src_ports, dst_ports, act)| Policy {
                selector: Selector {
                    src,
                    dst,
                    protocol,
                    src_ports,
                    dst_ports,
                },
                action: match act {
                    0 => Action::Bypass,
                    1 => Action::Discard,
                    n => Action::Protect(SaId(u64::from(n))),
                },
            })
    }

    fn flow() -> impl Strategy<Value = FlowKey> {
        (
            addr(),
            addr(),
            prop::sample::select(vec![1u8, 6, 17, 47]),
            prop::option::of((0u16..5, 0u16..5)),
        )
            .prop_map(|(src, dst, protocol, ports)| FlowKey {
                src: FlowAddr::from(src),
                dst: FlowAddr::from(dst),
                protocol,
                ports,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The index gives the answer of the ordered walk: the first matching policy.
        #[test]
        fn indexed_lookup_is_first_match(
            policies in prop::collection::vec(policy(), Spd::INDEX_FROM..200),
            flows in prop::collection::vec(flow(), 1..200),
        ) {
            let spd = Spd::new(policies, Action::Discard);
            prop_assert!(spd.index.is_some());
            for k in &flows {
                let walked = spd.lookup_in_order(k);
                let (action, found) = spd.lookup(k);
                prop_assert_eq!(found, walked, "{:?}", k);
                let want = walked.map_or(Action::Discard, |i| spd.policies()[i].action);
                prop_assert_eq!(action, want);
            }
        }
    }

    #[test]
    fn one_probe_per_group_for_many_host_policies() {
        // A hub with a host-to-host policy per spoke, behind a catch-all bypass for the
        // management network: two groups, whatever the number of spokes.
        let mut policies = vec![Policy {
            selector: sel("192.0.2.0/24", "0.0.0.0/0"),
            action: Action::Bypass,
        }];
        for i in 0..5000u32 {
            let spoke = std::net::Ipv4Addr::from_bits(0x0A00_0000 + i);
            policies.push(Policy {
                selector: sel("10.255.0.1/32", &format!("{spoke}/32")),
                action: Action::Protect(SaId(u64::from(i))),
            });
        }
        let spd = Spd::new(policies, Action::Discard);
        assert_eq!(spd.index.as_ref().map(|ix| ix.tuples.len()), Some(2));
        // Spoke 4000 is 10.0.15.160 (15 * 256 + 160), policy 4001.
        let k = FlowKey {
            src: a("10.255.0.1"),
            dst: a("10.0.15.160"),
            protocol: 6,
            ports: Some((1, 2)),
        };
        assert_eq!(spd.lookup(&k), (Action::Protect(SaId(4000)), Some(4001)));
        assert_eq!(spd.lookup_in_order(&k), Some(4001));
        let mgmt = FlowKey {
            src: a("192.0.2.5"),
            ..k
        };
        assert_eq!(spd.lookup(&mgmt), (Action::Bypass, Some(0)));
    }

    fn p(s: &str) -> Prefix {
        s.parse::<ipnet::IpNet>().map(Prefix::from).unwrap()
    }
    fn a(s: &str) -> FlowAddr {
        FlowAddr::from(s.parse::<IpAddr>().unwrap())
    }
    fn sel(src: &str, dst: &str) -> Selector {
        Selector {
            src: p(src),
            dst: p(dst),
            protocol: None,
            src_ports: PortRange::ANY,
            dst_ports: PortRange::ANY,
        }
    }

    #[test]
    fn prefixes() {
        assert!(p("10.1.0.0/16").contains(&a("10.1.255.3")));
        assert!(!p("10.1.0.0/16").contains(&a("10.2.0.1")));
        assert!(!p("10.1.0.0/16").contains(&a("2001:db8::1")));
        assert!(p("0.0.0.0/0").contains(&a("192.0.2.1")));
        assert!(p("2001:db8::/32").contains(&a("2001:db8:1::5")));
        assert!(p("192.0.2.7/32").contains(&a("192.0.2.7")));
        assert!(!p("192.0.2.7/32").contains(&a("192.0.2.6")));
        assert_eq!(p("10.1.2.3/16").to_string(), "10.1.0.0/16");
        assert!(p("10.0.0.0/8").covers(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").covers(&p("10.0.0.0/8")));
        assert!(p("10.1.0.0/16").overlaps(&p("10.0.0.0/8")));
        assert!(!p("10.1.0.0/16").overlaps(&p("10.2.0.0/16")));
    }

    #[test]
    fn ports_and_protocols() {
        let l2tp = Selector {
            protocol: Some(17),
            src_ports: PortRange { lo: 1701, hi: 1701 },
            ..sel("198.51.100.7/32", "203.0.113.1/32")
        };
        let k = |proto, ports| FlowKey {
            src: a("198.51.100.7"),
            dst: a("203.0.113.1"),
            protocol: proto,
            ports,
        };
        assert!(l2tp.matches(&k(17, Some((1701, 1701)))));
        assert!(!l2tp.matches(&k(17, Some((1702, 1701)))));
        assert!(!l2tp.matches(&k(6, Some((1701, 1701)))));
        // A selector with ports does not match a packet without ports (ICMP, later fragments).
        assert!(!l2tp.matches(&k(17, None)));
        assert!(sel("0.0.0.0/0", "0.0.0.0/0").matches(&k(1, None)));
    }

    #[test]
    fn first_match_wins_and_overlaps_are_reported() {
        let spd = Spd::new(
            vec![
                Policy {
                    selector: sel("10.1.0.0/16", "10.2.0.0/16"),
                    action: Action::Bypass,
                },
                Policy {
                    selector: sel("10.1.5.0/24", "10.2.0.0/24"),
                    action: Action::Discard,
                },
                Policy {
                    selector: sel("10.0.0.0/8", "10.2.0.0/16"),
                    action: Action::Discard,
                },
            ],
            Action::Discard,
        );
        let k = FlowKey {
            src: a("10.1.5.5"),
            dst: a("10.2.0.9"),
            protocol: 6,
            ports: Some((1, 2)),
        };
        assert_eq!(spd.lookup(&k), (Action::Bypass, Some(0)));
        let none = FlowKey {
            dst: a("192.0.2.1"),
            ..k
        };
        assert_eq!(spd.lookup(&none), (Action::Discard, None));
        let o = spd.overlaps();
        assert!(o.contains(&(0, 1, true)), "{o:?}");
        assert!(o.contains(&(0, 2, false)), "{o:?}");
    }
}
