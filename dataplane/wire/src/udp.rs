//! UDP datagrams (RFC 768), with IPv4 and IPv6 (RFC 8200 §8.1) checksums.

use core::net::{Ipv4Addr, Ipv6Addr};

use crate::ip::protocol;
use crate::{Error, Result, checksum, read_u16, write_u16};

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

mod field {
    use core::ops::Range;

    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const CHECKSUM: Range<usize> = 6..8;
}

/// A view of a UDP datagram (RFC 768).
///
/// The buffer may extend past the length field; [`payload`](Self::payload)
/// and the checksum stop at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wraps a buffer without checking it; getters may panic if it is short
    /// or its length field is inconsistent.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }

    /// Wraps a buffer after [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the buffer: fewer than 8 bytes is [`Error::Truncated`], a length
    /// field below 8 is [`Error::Malformed`] (so IPv6 jumbograms, RFC 2675,
    /// are refused), and a length beyond the buffer is [`Error::Truncated`].
    ///
    /// After this succeeds, no getter panics.
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let len = usize::from(self.len());
        if len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len > b.len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Consumes the view, returning the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::SRC_PORT])
    }

    /// Destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::DST_PORT])
    }

    /// Length field: header plus payload, in bytes.
    #[inline]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::CHECKSUM])
    }

    /// The payload, bytes 8 to `len`.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    /// One's-complement sum of the datagram (`..len`), not inverted.
    #[inline]
    fn data_sum(&self) -> u16 {
        checksum::sum(&self.buffer.as_ref()[..usize::from(self.len())])
    }

    /// Whether the checksum is correct over the IPv4 pseudo-header and the
    /// datagram. A zero checksum means "no checksum" (RFC 768) and verifies.
    pub fn verify_checksum_v4(&self, src: &Ipv4Addr, dst: &Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let ph = checksum::pseudo_header_v4(src, dst, protocol::UDP, u32::from(self.len()));
        checksum::combine(&[ph, self.data_sum()]) == 0xffff
    }

    /// Whether the checksum is correct over the IPv6 pseudo-header and the
    /// datagram. A zero checksum does not verify: it is forbidden over IPv6
    /// (RFC 8200 §8.1; the RFC 6935 tunnel exception is not applied).
    pub fn verify_checksum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        if self.checksum() == 0 {
            return false;
        }
        let ph = checksum::pseudo_header_v6(src, dst, protocol::UDP, u32::from(self.len()));
        checksum::combine(&[ph, self.data_sum()]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the source port.
    #[inline]
    pub fn set_src_port(&mut self, port: u16) {
        write_u16(&mut self.buffer.as_mut()[field::SRC_PORT], port);
    }

    /// Sets the destination port.
    #[inline]
    pub fn set_dst_port(&mut self, port: u16) {
        write_u16(&mut self.buffer.as_mut()[field::DST_PORT], port);
    }

    /// Sets the length field.
    #[inline]
    pub fn set_len(&mut self, len: u16) {
        write_u16(&mut self.buffer.as_mut()[field::LENGTH], len);
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::CHECKSUM], value);
    }

    /// The payload (`8..len`), mutably.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Computes and writes the checksum over the IPv4 pseudo-header and the
    /// datagram. A computed 0 is sent as 0xFFFF, since 0 means "none"
    /// (RFC 768).
    pub fn fill_checksum_v4(&mut self, src: &Ipv4Addr, dst: &Ipv4Addr) {
        self.set_checksum(0);
        let ph = checksum::pseudo_header_v4(src, dst, protocol::UDP, u32::from(self.len()));
        let c = !checksum::combine(&[ph, self.data_sum()]);
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }

    /// Computes and writes the checksum over the IPv6 pseudo-header and the
    /// datagram. A computed 0 is sent as 0xFFFF (RFC 8200 §8.1).
    pub fn fill_checksum_v6(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let ph = checksum::pseudo_header_v6(src, dst, protocol::UDP, u32::from(self.len()));
        let c = !checksum::combine(&[ph, self.data_sum()]);
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for UdpPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// Writes a UDP header with checksum 0 into `buf[..8]`. `len` is the length
/// field (header plus payload).
///
/// [`Error::Truncated`] if `buf` is shorter than 8 bytes;
/// [`Error::Malformed`] if `len` is below 8. Nothing is written on error.
#[inline]
pub fn emit_header(buf: &mut [u8], src_port: u16, dst_port: u16, len: u16) -> Result<()> {
    if buf.len() < HEADER_LEN {
        return Err(Error::Truncated);
    }
    if usize::from(len) < HEADER_LEN {
        return Err(Error::Malformed);
    }
    let mut p = UdpPacket::new_unchecked(&mut buf[..HEADER_LEN]);
    p.set_src_port(src_port);
    p.set_dst_port(dst_port);
    p.set_len(len);
    p.set_checksum(0);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A DNS query for example.com/A from port 54321 to 53, checksum 0 (the
    /// expected checksums were computed independently).
    const DNS_QUERY: [u8; 37] = [
        0xd4, 0x31, 0x00, 0x35, 0x00, 0x25, 0x00, 0x00, // udp header
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // dns header
        0x07, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0x03, b'c', b'o', b'm', 0x00, // qname
        0x00, 0x01, 0x00, 0x01, // qtype, qclass
    ];
    const V4_CHECKSUM: u16 = 0xc782;
    const V6_CHECKSUM: u16 = 0xee26;

    fn v4() -> (Ipv4Addr, Ipv4Addr) {
        (
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
        )
    }
    fn v6() -> (Ipv6Addr, Ipv6Addr) {
        (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        )
    }

    #[test]
    fn parse_dns_query() {
        let p = UdpPacket::new_checked(&DNS_QUERY[..]).unwrap();
        assert_eq!(p.src_port(), 54321);
        assert_eq!(p.dst_port(), 53);
        assert_eq!(p.len(), 37);
        assert_eq!(p.checksum(), 0);
        assert_eq!(p.payload(), &DNS_QUERY[8..]);
        let (s, d) = v4();
        assert!(p.verify_checksum_v4(&s, &d)); // zero = none
        let (s, d) = v6();
        assert!(!p.verify_checksum_v6(&s, &d)); // zero is forbidden over IPv6
    }

    #[test]
    fn checksum_v4_known_value() {
        let mut buf = DNS_QUERY;
        let mut p = UdpPacket::new_checked(&mut buf[..]).unwrap();
        let (s, d) = v4();
        p.fill_checksum_v4(&s, &d);
        assert_eq!(p.checksum(), V4_CHECKSUM);
        assert!(p.verify_checksum_v4(&s, &d));
        assert!(!p.verify_checksum_v4(&s, &Ipv4Addr::new(192, 168, 0, 200)));
        p.payload_mut()[0] ^= 1;
        assert!(!p.verify_checksum_v4(&s, &d));
    }

    #[test]
    fn checksum_v6_known_value() {
        let mut buf = DNS_QUERY;
        let mut p = UdpPacket::new_checked(&mut buf[..]).unwrap();
        let (s, d) = v6();
        p.fill_checksum_v6(&s, &d);
        assert_eq!(p.checksum(), V6_CHECKSUM);
        assert!(p.verify_checksum_v6(&s, &d));
        assert!(!p.verify_checksum_v6(&s, &s));
    }

    #[test]
    fn checksum_ignores_bytes_past_len() {
        let mut buf = DNS_QUERY.to_vec();
        buf.extend([0x55; 7]);
        let mut p = UdpPacket::new_checked(&mut buf[..]).unwrap();
        assert_eq!(p.payload().len(), 29);
        let (s, d) = v4();
        p.fill_checksum_v4(&s, &d);
        assert_eq!(p.checksum(), V4_CHECKSUM);
        let (s, d) = v6();
        p.fill_checksum_v6(&s, &d);
        assert_eq!(p.checksum(), V6_CHECKSUM);
    }

    #[test]
    fn computed_zero_is_sent_as_ffff() {
        // Make the payload's last word cancel everything else, so the
        // computed checksum is 0.
        for v6mode in [false, true] {
            let mut buf = [0u8; 12];
            emit_header(&mut buf, 1000, 2000, 12).unwrap();
            let ph = if v6mode {
                let (s, d) = v6();
                checksum::pseudo_header_v6(&s, &d, 17, 12)
            } else {
                let (s, d) = v4();
                checksum::pseudo_header_v4(&s, &d, 17, 12)
            };
            let rest = checksum::combine(&[ph, checksum::sum(&buf)]);
            buf[10..12].copy_from_slice(&(!rest).to_be_bytes());
            let mut p = UdpPacket::new_checked(&mut buf[..]).unwrap();
            if v6mode {
                let (s, d) = v6();
                p.fill_checksum_v6(&s, &d);
                assert_eq!(p.checksum(), 0xffff);
                assert!(p.verify_checksum_v6(&s, &d));
            } else {
                let (s, d) = v4();
                p.fill_checksum_v4(&s, &d);
                assert_eq!(p.checksum(), 0xffff);
                assert!(p.verify_checksum_v4(&s, &d));
            }
        }
    }

    #[test]
    fn check_len_errors() {
        assert_eq!(
            UdpPacket::new_checked(&DNS_QUERY[..7]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            UdpPacket::new_checked(&DNS_QUERY[..36]).unwrap_err(),
            Error::Truncated
        );
        let mut b = DNS_QUERY;
        b[5] = 7;
        assert_eq!(
            UdpPacket::new_checked(&b[..]).unwrap_err(),
            Error::Malformed
        );
        b[5] = 8;
        let p = UdpPacket::new_checked(&b[..]).unwrap();
        assert!(p.payload().is_empty());
        let mut b = DNS_QUERY;
        b[4] = 0;
        b[5] = 0; // jumbogram
        assert_eq!(
            UdpPacket::new_checked(&b[..]).unwrap_err(),
            Error::Malformed
        );
    }

    #[test]
    fn emit_and_setters() {
        let mut buf = [0xffu8; 37];
        buf[8..].copy_from_slice(&DNS_QUERY[8..]);
        emit_header(&mut buf, 54321, 53, 37).unwrap();
        assert_eq!(buf, DNS_QUERY);
        assert_eq!(emit_header(&mut buf[..7], 1, 2, 8), Err(Error::Truncated));
        assert_eq!(emit_header(&mut buf, 1, 2, 7), Err(Error::Malformed));
        let mut p = UdpPacket::new_checked(&mut buf[..]).unwrap();
        p.set_src_port(4500);
        p.set_dst_port(500);
        p.set_len(9);
        p.set_checksum(0xabcd);
        assert_eq!(p.src_port(), 4500);
        assert_eq!(p.dst_port(), 500);
        assert_eq!(p.len(), 9);
        assert_eq!(p.checksum(), 0xabcd);
        assert_eq!(p.payload(), &[0x12]);
        assert_eq!(&buf[..8], &[0x11, 0x94, 0x01, 0xf4, 0x00, 0x09, 0xab, 0xcd]);
    }

    proptest! {
        #[test]
        fn checked_getters_never_panic(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(p) = UdpPacket::new_checked(&data[..]) {
                let _ = (p.src_port(), p.dst_port(), p.checksum());
                prop_assert_eq!(p.payload().len() + HEADER_LEN, usize::from(p.len()));
                let (s, d) = v4();
                let _ = p.verify_checksum_v4(&s, &d);
                let (s, d) = v6();
                let _ = p.verify_checksum_v6(&s, &d);
            }
        }

        #[test]
        fn emit_fill_verify_round_trip(sport in any::<u16>(), dport in any::<u16>(),
                                       payload in proptest::collection::vec(any::<u8>(), 0..200),
                                       s4 in any::<[u8; 4]>(), d4 in any::<[u8; 4]>(),
                                       s6 in any::<[u8; 16]>(), d6 in any::<[u8; 16]>(),
                                       flip in any::<prop::sample::Index>()) {
            let len = HEADER_LEN + payload.len();
            let mut buf = vec![0u8; len];
            buf[HEADER_LEN..].copy_from_slice(&payload);
            emit_header(&mut buf, sport, dport, len as u16).unwrap();
            let mut p = UdpPacket::new_checked(&mut buf[..]).unwrap();
            prop_assert_eq!((p.src_port(), p.dst_port(), usize::from(p.len())), (sport, dport, len));
            prop_assert_eq!(p.payload(), &payload[..]);
            let (s4, d4) = (Ipv4Addr::from(s4), Ipv4Addr::from(d4));
            let (s6, d6) = (Ipv6Addr::from(s6), Ipv6Addr::from(d6));
            p.fill_checksum_v4(&s4, &d4);
            prop_assert_ne!(p.checksum(), 0);
            prop_assert!(p.verify_checksum_v4(&s4, &d4));
            p.fill_checksum_v6(&s6, &d6);
            prop_assert_ne!(p.checksum(), 0);
            prop_assert!(p.verify_checksum_v6(&s6, &d6));
            // A single-bit error outside the length and checksum fields is detected.
            let i = flip.index(len);
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            let q = UdpPacket::new_unchecked(&bad[..]);
            if !(4..8).contains(&i) {
                prop_assert!(!q.verify_checksum_v6(&s6, &d6));
            }
        }
    }
}
