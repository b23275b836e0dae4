//! Things common to IPv4 and IPv6: protocol numbers, transport ports and ECN
//! tunnelling (RFC 6040).

/// IP protocol / IPv6 next-header numbers (IANA "Assigned Internet Protocol
/// Numbers").
pub mod protocol {
    /// IPv6 Hop-by-Hop Options (RFC 8200 §4.3).
    pub const HOPOPT: u8 = 0;
    /// ICMP for IPv4 (RFC 792).
    pub const ICMP: u8 = 1;
    /// IPv4 encapsulation (IP-in-IP, RFC 2003).
    pub const IPIP: u8 = 4;
    /// TCP (RFC 9293).
    pub const TCP: u8 = 6;
    /// UDP (RFC 768).
    pub const UDP: u8 = 17;
    /// IPv6 encapsulation (RFC 2473).
    pub const IPV6: u8 = 41;
    /// IPv6 Routing header (RFC 8200 §4.4).
    pub const ROUTING: u8 = 43;
    /// IPv6 Fragment header (RFC 8200 §4.5).
    pub const FRAGMENT: u8 = 44;
    /// Generic Routing Encapsulation (RFC 2784).
    pub const GRE: u8 = 47;
    /// Encapsulating Security Payload (RFC 4303).
    pub const ESP: u8 = 50;
    /// Authentication Header (RFC 4302).
    pub const AH: u8 = 51;
    /// ICMP for IPv6 (RFC 4443).
    pub const ICMPV6: u8 = 58;
    /// IPv6 No Next Header (RFC 8200 §4.7).
    pub const NO_NEXT: u8 = 59;
    /// IPv6 Destination Options (RFC 8200 §4.6).
    pub const DSTOPTS: u8 = 60;
    /// SCTP (RFC 9260).
    pub const SCTP: u8 = 132;
    /// UDP-Lite (RFC 3828).
    pub const UDPLITE: u8 = 136;
}

/// Source and destination ports of a TCP, UDP, SCTP or UDP-Lite header at the
/// start of `l4` (all four put them in the first four bytes). `None` for any
/// other protocol or when `l4` is shorter than 4 bytes.
#[inline]
pub fn l4_ports(protocol: u8, l4: &[u8]) -> Option<(u16, u16)> {
    match protocol {
        protocol::TCP | protocol::UDP | protocol::SCTP | protocol::UDPLITE => match *l4 {
            [a, b, c, d, ..] => Some((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))),
            _ => None,
        },
        _ => None,
    }
}

/// ECN propagation through IP-in-IP tunnels such as ESP tunnel mode
/// (RFC 6040). Values are the 2-bit ECN field; inputs are masked to 2 bits.
pub mod ecn {
    /// Not ECN-Capable Transport.
    pub const NOT_ECT: u8 = 0;
    /// ECN-Capable Transport (1).
    pub const ECT1: u8 = 1;
    /// ECN-Capable Transport (0).
    pub const ECT0: u8 = 2;
    /// Congestion Experienced.
    pub const CE: u8 = 3;

    /// Outer ECN on encapsulation, normal mode (RFC 6040 §4.1): a copy of the
    /// inner ECN, CE included.
    #[inline]
    pub fn encap(inner: u8) -> u8 {
        inner & 0x03
    }

    /// Outer ECN on encapsulation, compatibility mode (RFC 6040 §4.1):
    /// always Not-ECT.
    #[inline]
    pub fn encap_compat(_inner: u8) -> u8 {
        NOT_ECT
    }

    /// New inner ECN on decapsulation (RFC 6040 §4.2, Figure 4), or `None`
    /// where the table says drop: inner Not-ECT with outer CE.
    ///
    /// ```text
    ///            outer: Not-ECT  ECT(0)   ECT(1)   CE
    /// inner Not-ECT     Not-ECT  Not-ECT  Not-ECT  drop
    /// inner ECT(0)      ECT(0)   ECT(0)   ECT(1)   CE
    /// inner ECT(1)      ECT(1)   ECT(1)   ECT(1)   CE
    /// inner CE          CE       CE       CE       CE
    /// ```
    #[inline]
    pub fn decap(outer: u8, inner: u8) -> Option<u8> {
        let (outer, inner) = (outer & 0x03, inner & 0x03);
        match (inner, outer) {
            (NOT_ECT, CE) => None,
            (NOT_ECT, _) => Some(NOT_ECT),
            (_, CE) | (CE, _) => Some(CE),
            (ECT0, ECT1) => Some(ECT1),
            (inner, _) => Some(inner),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::ecn::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn protocol_numbers() {
        use protocol::*;
        let all = [
            (HOPOPT, 0),
            (ICMP, 1),
            (IPIP, 4),
            (TCP, 6),
            (UDP, 17),
            (IPV6, 41),
            (ROUTING, 43),
            (FRAGMENT, 44),
            (GRE, 47),
            (ESP, 50),
            (AH, 51),
            (ICMPV6, 58),
            (NO_NEXT, 59),
            (DSTOPTS, 60),
            (SCTP, 132),
            (UDPLITE, 136),
        ];
        for (c, v) in all {
            assert_eq!(c, v);
        }
    }

    #[test]
    fn ports() {
        // TCP SYN from 49152 to 443 (first bytes of the header).
        let tcp = [0xc0, 0x00, 0x01, 0xbb, 0x00, 0x00, 0x00, 0x01];
        assert_eq!(l4_ports(protocol::TCP, &tcp), Some((49152, 443)));
        for p in [protocol::UDP, protocol::SCTP, protocol::UDPLITE] {
            assert_eq!(l4_ports(p, &tcp[..4]), Some((49152, 443)));
            assert_eq!(l4_ports(p, &tcp[..3]), None);
        }
        assert_eq!(l4_ports(protocol::ICMP, &tcp), None);
        assert_eq!(l4_ports(protocol::ESP, &tcp), None);
        assert_eq!(l4_ports(protocol::GRE, &tcp), None);
        assert_eq!(l4_ports(protocol::TCP, &[]), None);
    }

    #[test]
    fn encapsulation() {
        for e in [NOT_ECT, ECT0, ECT1, CE] {
            assert_eq!(encap(e), e);
            assert_eq!(encap_compat(e), NOT_ECT);
        }
        assert_eq!(encap(0xb9), ECT1); // a whole traffic-class byte is masked
    }

    #[test]
    fn decapsulation_full_table() {
        // Rows: inner; columns: outer Not-ECT, ECT(0), ECT(1), CE (RFC 6040 Figure 4).
        let outers = [NOT_ECT, ECT0, ECT1, CE];
        let table: [(u8, [Option<u8>; 4]); 4] = [
            (NOT_ECT, [Some(NOT_ECT), Some(NOT_ECT), Some(NOT_ECT), None]),
            (ECT0, [Some(ECT0), Some(ECT0), Some(ECT1), Some(CE)]),
            (ECT1, [Some(ECT1), Some(ECT1), Some(ECT1), Some(CE)]),
            (CE, [Some(CE), Some(CE), Some(CE), Some(CE)]),
        ];
        for (inner, row) in table {
            for (outer, want) in outers.into_iter().zip(row) {
                assert_eq!(decap(outer, inner), want, "outer {outer} inner {inner}");
            }
        }
        // Upper bits are ignored.
        assert_eq!(decap(0xfc | CE, 0xb8 | ECT0), Some(CE));
    }

    proptest! {
        #[test]
        fn normal_mode_round_trip_is_identity(inner in 0u8..4) {
            // Without congestion on the way, encap then decap changes nothing.
            prop_assert_eq!(decap(encap(inner), inner), Some(inner));
        }

        #[test]
        fn compat_mode_round_trip_is_identity(inner in 0u8..4) {
            prop_assert_eq!(decap(encap_compat(inner), inner), Some(inner));
        }

        #[test]
        fn ports_never_panic(p in any::<u8>(), l4 in proptest::collection::vec(any::<u8>(), 0..8)) {
            let r = l4_ports(p, &l4);
            prop_assert_eq!(r.is_some(), l4.len() >= 4 && matches!(p, 6 | 17 | 132 | 136));
        }
    }
}
