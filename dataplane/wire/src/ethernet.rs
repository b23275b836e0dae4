//! Ethernet II frames (IEEE 802.3) with an optional single 802.1Q / 802.1ad tag.

use core::fmt;
use core::str::FromStr;

use crate::{Error, Result, read_u16, write_u16};

/// Length of an untagged Ethernet header.
pub const HEADER_LEN: usize = 14;
/// Length of an Ethernet header carrying one VLAN tag.
pub const VLAN_HEADER_LEN: usize = 18;

/// EtherType values the gateway meets.
pub mod ethertype {
    /// Internet Protocol version 4.
    pub const IPV4: u16 = 0x0800;
    /// Internet Protocol version 6.
    pub const IPV6: u16 = 0x86DD;
    /// Address Resolution Protocol.
    pub const ARP: u16 = 0x0806;
    /// IEEE 802.1Q customer VLAN tag (TPID).
    pub const VLAN: u16 = 0x8100;
    /// IEEE 802.1ad service VLAN tag (TPID), "Q-in-Q".
    pub const QINQ: u16 = 0x88A8;
}

/// A 48-bit Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EthernetAddress(pub [u8; 6]);

impl EthernetAddress {
    /// The broadcast address `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: EthernetAddress = EthernetAddress([0xff; 6]);

    /// Whether this is the broadcast address.
    #[inline]
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// Whether the group bit (least significant bit of the first octet) is set.
    /// The broadcast address is multicast too.
    #[inline]
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether this is an individual (unicast) address.
    #[inline]
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }
}

impl fmt::Display for EthernetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for EthernetAddress {
    type Err = Error;

    /// Parses six colon-separated pairs of hex digits (either case), e.g.
    /// `02:00:00:00:00:01`. Anything else is [`Error::Malformed`].
    fn from_str(s: &str) -> Result<Self> {
        let s = s.as_bytes();
        if s.len() != 17 {
            return Err(Error::Malformed);
        }
        let hex = |c: u8| -> Result<u8> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(Error::Malformed),
            }
        };
        let mut out = [0u8; 6];
        for (i, o) in out.iter_mut().enumerate() {
            let at = i * 3;
            if i > 0 && s[at - 1] != b':' {
                return Err(Error::Malformed);
            }
            *o = (hex(s[at])? << 4) | hex(s[at + 1])?;
        }
        Ok(EthernetAddress(out))
    }
}

mod field {
    use core::ops::Range;

    pub const DESTINATION: Range<usize> = 0..6;
    pub const SOURCE: Range<usize> = 6..12;
    /// EtherType of an untagged frame, or the TPID of a tagged one.
    pub const ETHERTYPE: Range<usize> = 12..14;
    /// Tag control information of a tagged frame.
    pub const TCI: Range<usize> = 14..16;
}

#[inline]
fn is_tpid(t: u16) -> bool {
    t == ethertype::VLAN || t == ethertype::QINQ
}

/// A view of an Ethernet II frame, optionally carrying one 802.1Q (TPID
/// 0x8100) or 802.1ad (TPID 0x88A8) tag.
///
/// Only one tag is understood: in a double-tagged frame, [`ethertype`] returns
/// the inner TPID and [`payload`] starts at the inner tag.
///
/// [`ethertype`]: EthernetFrame::ethertype
/// [`payload`]: EthernetFrame::payload
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wraps a buffer without checking it; getters may panic if it is short.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        EthernetFrame { buffer }
    }

    /// Wraps a buffer after [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    /// Checks that the buffer holds the whole header: 14 bytes, or 18 when the
    /// first EtherType is a VLAN TPID. Otherwise [`Error::Truncated`].
    ///
    /// After this succeeds, no getter panics.
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if is_tpid(read_u16(&b[field::ETHERTYPE])) && b.len() < VLAN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Consumes the view, returning the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Whether the frame carries a VLAN tag.
    #[inline]
    pub fn is_tagged(&self) -> bool {
        is_tpid(read_u16(&self.buffer.as_ref()[field::ETHERTYPE]))
    }

    /// Header length: [`HEADER_LEN`] or, when tagged, [`VLAN_HEADER_LEN`].
    #[inline]
    pub fn header_len(&self) -> usize {
        if self.is_tagged() {
            VLAN_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Destination MAC address.
    #[inline]
    pub fn dst_addr(&self) -> EthernetAddress {
        let b = &self.buffer.as_ref()[field::DESTINATION];
        EthernetAddress([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// Source MAC address.
    #[inline]
    pub fn src_addr(&self) -> EthernetAddress {
        let b = &self.buffer.as_ref()[field::SOURCE];
        EthernetAddress([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// The tag control information (PCP, DEI, VLAN ID) if the frame is tagged.
    #[inline]
    pub fn vlan_tci(&self) -> Option<u16> {
        if self.is_tagged() {
            Some(read_u16(&self.buffer.as_ref()[field::TCI]))
        } else {
            None
        }
    }

    /// EtherType of the payload, i.e. after the tag if there is one.
    #[inline]
    pub fn ethertype(&self) -> u16 {
        let at = self.header_len() - 2;
        read_u16(&self.buffer.as_ref()[at..])
    }

    /// Everything after the header (including any Ethernet padding).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Sets the destination MAC address.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&addr.0);
    }

    /// Sets the source MAC address.
    #[inline]
    pub fn set_src_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&addr.0);
    }

    /// Sets the payload EtherType at the position of the current layout: after
    /// the tag if the frame is tagged (the TPID is left alone).
    #[inline]
    pub fn set_ethertype(&mut self, value: u16) {
        let at = self.header_len() - 2;
        write_u16(&mut self.buffer.as_mut()[at..], value);
    }

    /// Everything after the header, mutably.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let at = self.header_len();
        &mut self.buffer.as_mut()[at..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for EthernetFrame<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// Writes an Ethernet header at the start of `buf`: with an 802.1Q tag
/// (TPID 0x8100) carrying `vlan_tci` if it is `Some`. Returns the header
/// length (14 or 18), or [`Error::Truncated`] if `buf` is too short (then
/// nothing is written).
#[inline]
pub fn emit_header(
    buf: &mut [u8],
    dst: EthernetAddress,
    src: EthernetAddress,
    vlan_tci: Option<u16>,
    ethertype: u16,
) -> Result<usize> {
    let len = if vlan_tci.is_some() {
        VLAN_HEADER_LEN
    } else {
        HEADER_LEN
    };
    if buf.len() < len {
        return Err(Error::Truncated);
    }
    buf[field::DESTINATION].copy_from_slice(&dst.0);
    buf[field::SOURCE].copy_from_slice(&src.0);
    if let Some(tci) = vlan_tci {
        write_u16(&mut buf[field::ETHERTYPE], ethertype::VLAN);
        write_u16(&mut buf[field::TCI], tci);
    }
    write_u16(&mut buf[len - 2..len], ethertype);
    Ok(len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An ARP request (who-has 192.168.1.1 tell 192.168.1.100), broadcast,
    /// padded to the 60-byte minimum.
    const ARP_FRAME: [u8; 60] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08,
        0x06, // eth
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0xc0,
        0xa8, 0x01, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xa8, 0x01, 0x01, // arp
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding
    ];

    /// An 802.1Q-tagged (PCP 5, VLAN 100) IPv4 frame header plus 4 payload bytes.
    const VLAN_FRAME: [u8; 22] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x81, 0x00, 0xa0,
        0x64, 0x08, 0x00, 0x45, 0x00, 0x00, 0x14,
    ];

    #[test]
    fn parse_untagged() {
        let f = EthernetFrame::new_checked(&ARP_FRAME[..]).unwrap();
        assert_eq!(f.header_len(), 14);
        assert!(f.dst_addr().is_broadcast());
        assert_eq!(f.src_addr().to_string(), "52:54:00:12:34:56");
        assert_eq!(f.vlan_tci(), None);
        assert_eq!(f.ethertype(), ethertype::ARP);
        assert_eq!(f.payload().len(), 46);
        assert_eq!(&f.payload()[..4], &[0x00, 0x01, 0x08, 0x00]);
    }

    #[test]
    fn parse_tagged() {
        let f = EthernetFrame::new_checked(&VLAN_FRAME[..]).unwrap();
        assert!(f.is_tagged());
        assert_eq!(f.header_len(), 18);
        assert_eq!(f.vlan_tci(), Some(0xa064));
        assert_eq!(f.vlan_tci().unwrap() & 0x0fff, 100);
        assert_eq!(f.ethertype(), ethertype::IPV4);
        assert_eq!(f.payload(), &[0x45, 0x00, 0x00, 0x14]);

        let mut qinq = VLAN_FRAME;
        qinq[12] = 0x88;
        qinq[13] = 0xa8;
        let f = EthernetFrame::new_checked(&qinq[..]).unwrap();
        assert_eq!(f.vlan_tci(), Some(0xa064));
        assert_eq!(f.ethertype(), ethertype::IPV4);
    }

    #[test]
    fn check_len_errors() {
        assert_eq!(
            EthernetFrame::new_checked(&ARP_FRAME[..13]).unwrap_err(),
            Error::Truncated
        );
        assert!(EthernetFrame::new_checked(&ARP_FRAME[..14]).is_ok());
        // A tagged frame needs 18 bytes.
        assert_eq!(
            EthernetFrame::new_checked(&VLAN_FRAME[..17]).unwrap_err(),
            Error::Truncated
        );
        let f = EthernetFrame::new_checked(&VLAN_FRAME[..18]).unwrap();
        assert!(f.payload().is_empty());
    }

    #[test]
    fn setters() {
        let mut buf = VLAN_FRAME;
        let mut f = EthernetFrame::new_checked(&mut buf[..]).unwrap();
        let a: EthernetAddress = "0a:0b:0c:0d:0e:0f".parse().unwrap();
        f.set_dst_addr(a);
        f.set_src_addr(EthernetAddress::BROADCAST);
        f.set_ethertype(ethertype::IPV6);
        f.payload_mut()[0] = 0x60;
        assert_eq!(f.dst_addr(), a);
        assert_eq!(f.src_addr(), EthernetAddress::BROADCAST);
        assert_eq!(f.ethertype(), ethertype::IPV6);
        assert_eq!(f.vlan_tci(), Some(0xa064));
        // TPID untouched, inner ethertype rewritten.
        assert_eq!(&buf[12..18], &[0x81, 0x00, 0xa0, 0x64, 0x86, 0xdd]);
        assert_eq!(buf[18], 0x60);

        let mut buf = ARP_FRAME;
        let mut f = EthernetFrame::new_checked(&mut buf[..]).unwrap();
        f.set_ethertype(ethertype::IPV4);
        assert_eq!(&buf[12..14], &[0x08, 0x00]);
    }

    #[test]
    fn emit() {
        let dst: EthernetAddress = "02:00:00:00:00:01".parse().unwrap();
        let src: EthernetAddress = "02:00:00:00:00:02".parse().unwrap();
        let mut buf = [0u8; 22];
        assert_eq!(
            emit_header(&mut buf, dst, src, Some(0xa064), ethertype::IPV4),
            Ok(18)
        );
        assert_eq!(&buf[..18], &VLAN_FRAME[..18]);
        let mut buf = [0u8; 14];
        assert_eq!(
            emit_header(
                &mut buf,
                EthernetAddress::BROADCAST,
                src,
                None,
                ethertype::ARP
            ),
            Ok(14)
        );
        assert_eq!(&buf[6..], &[0x02, 0, 0, 0, 0, 0x02, 0x08, 0x06]);
        assert_eq!(
            emit_header(&mut buf, dst, src, Some(1), ethertype::IPV4),
            Err(Error::Truncated)
        );
        assert_eq!(
            emit_header(&mut buf[..13], dst, src, None, ethertype::IPV4),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn address_text() {
        let a = EthernetAddress([0x02, 0, 0, 0, 0, 0x01]);
        assert_eq!(a.to_string(), "02:00:00:00:00:01");
        assert_eq!("02:00:00:00:00:01".parse::<EthernetAddress>(), Ok(a));
        assert_eq!(
            "AA:bb:CC:dd:EE:ff".parse::<EthernetAddress>(),
            Ok(EthernetAddress([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]))
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:",
            "02:00:00:00:00:0g",
            "02-00-00-00-00-01",
            "02:00:00:00:00:1",
            "002:00:00:00:00:1",
            "+2:00:00:00:00:01",
            "02:00:00:00:00:é",
        ] {
            assert_eq!(
                bad.parse::<EthernetAddress>(),
                Err(Error::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn address_kinds() {
        assert!(EthernetAddress::BROADCAST.is_broadcast());
        assert!(EthernetAddress::BROADCAST.is_multicast());
        let mcast = EthernetAddress([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]);
        assert!(mcast.is_multicast() && !mcast.is_broadcast() && !mcast.is_unicast());
        let ucast = EthernetAddress([0x02, 0, 0, 0, 0, 1]);
        assert!(ucast.is_unicast() && !ucast.is_multicast() && !ucast.is_broadcast());
    }

    proptest! {
        #[test]
        fn checked_getters_never_panic(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(f) = EthernetFrame::new_checked(&data[..]) {
                let _ = (f.dst_addr(), f.src_addr(), f.vlan_tci(), f.ethertype());
                prop_assert_eq!(f.payload().len(), data.len() - f.header_len());
            }
        }

        #[test]
        fn emit_parse_round_trip(dst in any::<[u8; 6]>(), src in any::<[u8; 6]>(),
                                 tci in any::<Option<u16>>(), et in any::<u16>(),
                                 extra in 0usize..10) {
            prop_assume!(!is_tpid(et));
            let mut buf = [0u8; 28];
            let len = emit_header(&mut buf, EthernetAddress(dst), EthernetAddress(src), tci, et)
                .unwrap();
            let f = EthernetFrame::new_checked(&buf[..len + extra]).unwrap();
            prop_assert_eq!(f.header_len(), len);
            prop_assert_eq!(f.dst_addr(), EthernetAddress(dst));
            prop_assert_eq!(f.src_addr(), EthernetAddress(src));
            prop_assert_eq!(f.vlan_tci(), tci);
            prop_assert_eq!(f.ethertype(), et);
            prop_assert_eq!(f.payload().len(), extra);
        }

        #[test]
        fn address_text_round_trip(a in any::<[u8; 6]>()) {
            let a = EthernetAddress(a);
            prop_assert_eq!(a.to_string().parse::<EthernetAddress>(), Ok(a));
        }

        #[test]
        fn address_parse_never_panics(s in "\\PC{0,20}") {
            let _ = s.parse::<EthernetAddress>();
        }
    }
}
