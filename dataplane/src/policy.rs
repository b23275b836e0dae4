//! Traffic selectors and the outbound security policy database (RFC 4301 §4.4.1).
//!
//! A [`Selector`] matches a packet on source/destination prefix, protocol and ports. The SPD is
//! an ordered list of selectors with an action; the first match wins. SAs carry selectors too:
//! after decryption an inbound packet must match one of its SA's selectors (RFC 4301 §5.2).

use crate::sa::SaId;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spd {
    /// Policies in priority order.
    pub policies: Vec<Policy>,
    /// Action for packets no policy matches (Bypass or Discard).
    pub default_action: Action,
}

impl Default for Spd {
    fn default() -> Self {
        Spd {
            policies: Vec::new(),
            default_action: Action::Discard,
        }
    }
}

impl Spd {
    /// The first matching policy's action and its index, or the default action with `None`.
    #[inline]
    pub fn lookup(&self, k: &FlowKey) -> (Action, Option<usize>) {
        for (i, p) in self.policies.iter().enumerate() {
            if p.selector.matches(k) {
                return (p.action, Some(i));
            }
        }
        (self.default_action, None)
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
        let spd = Spd {
            policies: vec![
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
            default_action: Action::Discard,
        };
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
