//! IPv4 headers (RFC 791), with RFC 1624 incremental checksum updates.

use core::net::Ipv4Addr;

use crate::{Error, Result, checksum, read_u16, write_u16};

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

mod field {
    use core::ops::Range;

    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC_ADDR: Range<usize> = 12..16;
    pub const DST_ADDR: Range<usize> = 16..20;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet (RFC 791 §3.1).
///
/// The buffer may extend past `total_len` (for example Ethernet padding);
/// [`payload`](Self::payload) stops at `total_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps a buffer without checking it; getters may panic if it is short
    /// or its length fields are inconsistent.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Wraps a buffer after [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the buffer against the header's length fields:
    ///
    /// * fewer than 20 bytes: [`Error::Truncated`];
    /// * version not 4, or IHL below 5: [`Error::Malformed`];
    /// * header length beyond the buffer: [`Error::Truncated`];
    /// * total length below the header length: [`Error::Malformed`];
    /// * total length beyond the buffer: [`Error::Truncated`].
    ///
    /// After this succeeds, no getter panics. The checksum is not checked
    /// (see [`verify_checksum`](Self::verify_checksum)).
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 4 {
            return Err(Error::Malformed);
        }
        let hl = self.header_len();
        if hl < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if hl > len {
            return Err(Error::Truncated);
        }
        let total = usize::from(self.total_len());
        if total < hl {
            return Err(Error::Malformed);
        }
        if total > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Consumes the view, returning the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version field (4 for a valid packet).
    #[inline]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL × 4), options included.
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// Differentiated Services Code Point (RFC 2474), the upper 6 bits of the
    /// former TOS byte.
    #[inline]
    pub fn dscp(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] >> 2
    }

    /// ECN field (RFC 3168 §5), the lower 2 bits of the former TOS byte.
    #[inline]
    pub fn ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] & 0x03
    }

    /// Total length: header plus payload, in bytes.
    #[inline]
    pub fn total_len(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// Identification field.
    #[inline]
    pub fn ident(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::IDENT])
    }

    #[inline]
    fn flags_offset(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::FLG_OFF])
    }

    /// Don't Fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & FLAG_DF != 0
    }

    /// More Fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        self.flags_offset() & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field is in 8-byte units).
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (self.flags_offset() & OFFSET_MASK) << 3
    }

    /// Whether this is a fragment: More Fragments set or a non-zero offset.
    #[inline]
    pub fn is_fragment(&self) -> bool {
        self.flags_offset() & (FLAG_MF | OFFSET_MASK) != 0
    }

    /// Time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Protocol field: the next header (see [`crate::ip::protocol`]).
    #[inline]
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::CHECKSUM])
    }

    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC_ADDR];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST_ADDR];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// The options, bytes 20 to `header_len` (empty when IHL is 5).
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    /// The payload, bytes `header_len` to `total_len`.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let range = self.header_len()..usize::from(self.total_len());
        &self.buffer.as_ref()[range]
    }

    /// Whether the header checksum is correct (the header, options included,
    /// sums to 0xFFFF).
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::sum(&self.buffer.as_ref()[..self.header_len()]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets version 4 and the header length `len_bytes` (a multiple of 4
    /// from 20 to 60; stored as `len_bytes / 4`).
    #[inline]
    pub fn set_version_and_header_len(&mut self, len_bytes: usize) {
        debug_assert!(len_bytes.is_multiple_of(4) && (HEADER_LEN..=60).contains(&len_bytes));
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((len_bytes / 4) as u8 & 0x0f);
    }

    /// Sets the DSCP, keeping the ECN bits.
    #[inline]
    pub fn set_dscp(&mut self, dscp: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & 0x03) | (dscp << 2);
    }

    /// Sets the ECN field, keeping the DSCP; the checksum is not touched
    /// (see [`set_ecn_update_checksum`](Self::set_ecn_update_checksum)).
    #[inline]
    pub fn set_ecn(&mut self, ecn: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & !0x03) | (ecn & 0x03);
    }

    /// Sets the total length.
    #[inline]
    pub fn set_total_len(&mut self, len: u16) {
        write_u16(&mut self.buffer.as_mut()[field::LENGTH], len);
    }

    /// Sets the identification field.
    #[inline]
    pub fn set_ident(&mut self, ident: u16) {
        write_u16(&mut self.buffer.as_mut()[field::IDENT], ident);
    }

    #[inline]
    fn set_flags_offset(&mut self, v: u16) {
        write_u16(&mut self.buffer.as_mut()[field::FLG_OFF], v);
    }

    /// Sets or clears Don't Fragment.
    #[inline]
    pub fn set_dont_frag(&mut self, value: bool) {
        let v = self.flags_offset() & !FLAG_DF;
        self.set_flags_offset(if value { v | FLAG_DF } else { v });
    }

    /// Sets or clears More Fragments.
    #[inline]
    pub fn set_more_frags(&mut self, value: bool) {
        let v = self.flags_offset() & !FLAG_MF;
        self.set_flags_offset(if value { v | FLAG_MF } else { v });
    }

    /// Sets the fragment offset, given in bytes (a multiple of 8; the low
    /// three bits are dropped). The flags are kept.
    #[inline]
    pub fn set_frag_offset(&mut self, offset_bytes: u16) {
        debug_assert!(offset_bytes.is_multiple_of(8));
        let v = (self.flags_offset() & !OFFSET_MASK) | (offset_bytes >> 3);
        self.set_flags_offset(v);
    }

    /// Sets the time to live (checksum not touched).
    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    /// Sets the protocol field.
    #[inline]
    pub fn set_next_header(&mut self, protocol: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = protocol;
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::CHECKSUM], value);
    }

    /// Sets the source address.
    #[inline]
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// Computes and writes the header checksum over `header_len` bytes.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len();
        let c = !checksum::sum(&self.buffer.as_ref()[..hl]);
        self.set_checksum(c);
    }

    /// The payload (`header_len..total_len`), mutably.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = self.header_len()..usize::from(self.total_len());
        &mut self.buffer.as_mut()[range]
    }

    /// Decrements the TTL and updates the checksum incrementally (RFC 1624).
    /// Returns `false`, changing nothing, if the TTL is 0 or 1 (the packet
    /// must not be forwarded).
    #[inline]
    pub fn decrement_ttl(&mut self) -> bool {
        let ttl = self.ttl();
        if ttl <= 1 {
            return false;
        }
        let proto = self.next_header();
        let old = u16::from_be_bytes([ttl, proto]);
        let new = u16::from_be_bytes([ttl - 1, proto]);
        self.set_ttl(ttl - 1);
        let c = checksum::update16(self.checksum(), old, new);
        self.set_checksum(c);
        true
    }

    /// Sets the ECN field (lower two bits of `ecn`) and updates the checksum
    /// incrementally (RFC 1624).
    pub fn set_ecn_update_checksum(&mut self, ecn: u8) {
        let b = self.buffer.as_ref();
        let old = u16::from_be_bytes([b[field::VER_IHL], b[field::DSCP_ECN]]);
        self.set_ecn(ecn);
        let b = self.buffer.as_ref();
        let new = u16::from_be_bytes([b[field::VER_IHL], b[field::DSCP_ECN]]);
        let c = checksum::update16(self.checksum(), old, new);
        self.set_checksum(c);
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Ipv4Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The fields of an option-less IPv4 header, for [`emit_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Protocol (next header).
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// DSCP (6 bits).
    pub dscp: u8,
    /// ECN (2 bits).
    pub ecn: u8,
    /// Don't Fragment flag.
    pub dont_frag: bool,
    /// Identification.
    pub ident: u16,
    /// Payload length in bytes; the total length written is 20 more.
    pub payload_len: u16,
}

/// Writes a 20-byte IPv4 header (no options, not a fragment) with a correct
/// checksum into `buf[..20]`.
///
/// [`Error::Truncated`] if `buf` is shorter than 20 bytes;
/// [`Error::Malformed`] if `payload_len + 20` does not fit the 16-bit total
/// length, or `dscp`/`ecn` do not fit their 6/2 bits. Nothing is written on
/// error.
#[inline]
pub fn emit_header(buf: &mut [u8], h: &Ipv4Header) -> Result<()> {
    if buf.len() < HEADER_LEN {
        return Err(Error::Truncated);
    }
    let total = h
        .payload_len
        .checked_add(HEADER_LEN as u16)
        .ok_or(Error::Malformed)?;
    if h.dscp > 0x3f || h.ecn > 0x03 {
        return Err(Error::Malformed);
    }
    // Build the ten 16-bit words in registers and sum them there: writing the bytes one field
    // at a time and reading them back for the checksum stalls on store forwarding.
    let src = h.src.to_bits();
    let dst = h.dst.to_bits();
    let mut w: [u16; 10] = [
        0x4500 | u16::from((h.dscp << 2) | h.ecn),
        total,
        h.ident,
        if h.dont_frag { FLAG_DF } else { 0 },
        (u16::from(h.ttl) << 8) | u16::from(h.protocol),
        0,
        (src >> 16) as u16,
        src as u16,
        (dst >> 16) as u16,
        dst as u16,
    ];
    let mut sum: u32 = w.iter().map(|x| u32::from(*x)).sum();
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    w[5] = !(sum as u16);
    let mut out = [0u8; HEADER_LEN];
    for (o, x) in out.chunks_exact_mut(2).zip(w) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    buf[..HEADER_LEN].copy_from_slice(&out);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The classic example: UDP from 192.168.0.1 to 192.168.0.199, total
    /// length 115, DF, TTL 64, checksum 0xb861.
    const CLASSIC: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    fn classic_packet() -> Vec<u8> {
        let mut v = CLASSIC.to_vec();
        v.extend((0..95u8).map(|i| i.wrapping_mul(7)));
        v
    }

    #[test]
    fn parse_classic() {
        let buf = classic_packet();
        let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.dscp(), 0);
        assert_eq!(p.ecn(), 0);
        assert_eq!(p.total_len(), 115);
        assert_eq!(p.ident(), 0);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert!(!p.is_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.next_header(), 17);
        assert_eq!(p.checksum(), 0xb861);
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 0, 199));
        assert!(p.options().is_empty());
        assert_eq!(p.payload(), &buf[20..]);
        assert!(p.verify_checksum());
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut buf = classic_packet();
        buf.extend([0xee; 11]);
        let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.payload().len(), 95);
    }

    #[test]
    fn check_len_errors() {
        let buf = classic_packet();
        // Header alone: total_len 115 > 20.
        assert_eq!(
            Ipv4Packet::new_checked(&CLASSIC[..]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Ipv4Packet::new_checked(&buf[..19]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Ipv4Packet::new_checked(&buf[..114]).unwrap_err(),
            Error::Truncated
        );
        let mut b = buf.clone();
        b[0] = 0x65; // version 6
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            Error::Malformed
        );
        let mut b = buf.clone();
        b[0] = 0x44; // IHL 4
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            Error::Malformed
        );
        let mut b = buf.clone();
        b[3] = 19; // total_len < header_len
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            Error::Malformed
        );
        let mut b = buf.clone();
        b[0] = 0x46; // IHL 6, total_len 24 < 20+4? no: header 24 <= total 24 OK
        b[3] = 24;
        assert!(Ipv4Packet::new_checked(&b[..]).is_ok());
        b[3] = 23; // total below header length
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            Error::Malformed
        );
        let mut b = CLASSIC;
        b[0] = 0x4f; // 60-byte header in a 20-byte buffer
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            Error::Truncated
        );
    }

    #[test]
    fn options_and_payload_with_ihl_6() {
        // Router Alert option (RFC 2113): 94 04 00 00.
        let mut b = [
            0x46, 0xb8, 0x00, 0x1c, 0x12, 0x34, 0x20, 0x03, 0x01, 0x02, 0x00, 0x00, 0x0a, 0x00,
            0x00, 0x01, 0xe0, 0x00, 0x00, 0x16, 0x94, 0x04, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef,
        ];
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.dscp(), 46); // EF
        assert_eq!(p.ecn(), 0);
        assert_eq!(p.ident(), 0x1234);
        assert!(!p.dont_frag());
        assert!(p.more_frags());
        assert_eq!(p.frag_offset(), 24);
        assert!(p.is_fragment());
        assert_eq!(p.options(), &[0x94, 0x04, 0x00, 0x00]);
        assert_eq!(p.payload(), &[0xde, 0xad, 0xbe, 0xef]);
        p.payload_mut()[0] = 0;
        assert_eq!(p.payload()[0], 0);
        // The checksum covers the options.
        b[21] = 0x05;
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(!p.verify_checksum());
    }

    #[test]
    fn setters_touch_only_their_bits() {
        let mut buf = classic_packet();
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        p.set_dscp(0x2e);
        p.set_ecn(3);
        assert_eq!((p.dscp(), p.ecn()), (0x2e, 3));
        p.set_ecn(1);
        assert_eq!((p.dscp(), p.ecn()), (0x2e, 1));
        p.set_dscp(0);
        assert_eq!((p.dscp(), p.ecn()), (0, 1));
        p.set_frag_offset(8 * 0x1fff);
        assert!(p.dont_frag() && !p.more_frags());
        assert_eq!(p.frag_offset(), 65528);
        p.set_more_frags(true);
        p.set_dont_frag(false);
        assert!(!p.dont_frag() && p.more_frags());
        assert_eq!(p.frag_offset(), 65528);
        p.set_frag_offset(0);
        assert!(p.is_fragment()); // MF still set
        p.set_more_frags(false);
        assert!(!p.is_fragment());
        p.set_ident(0xbeef);
        p.set_ttl(9);
        p.set_next_header(50);
        p.set_src_addr(Ipv4Addr::new(1, 2, 3, 4));
        p.set_dst_addr(Ipv4Addr::new(5, 6, 7, 8));
        p.set_total_len(100);
        p.set_version_and_header_len(20);
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.ident(), 0xbeef);
        assert_eq!(p.ttl(), 9);
        assert_eq!(p.next_header(), 50);
        assert_eq!(p.src_addr(), Ipv4Addr::new(1, 2, 3, 4));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(5, 6, 7, 8));
        assert_eq!(p.payload().len(), 80);
        assert_eq!(
            &buf[..20],
            &[
                0x45, 0x01, 0x00, 0x64, 0xbe, 0xef, 0x00, 0x00, 0x09, 0x32, 0xe2, 0x64, 1, 2, 3, 4,
                5, 6, 7, 8
            ]
        );
    }

    #[test]
    fn decrement_ttl_classic() {
        let mut buf = classic_packet();
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        assert!(p.decrement_ttl());
        assert_eq!(p.ttl(), 63);
        // 0x4011 -> 0x3f11: checksum rises by 0x0100.
        assert_eq!(p.checksum(), 0xb961);
        assert!(p.verify_checksum());
        p.set_ttl(1);
        p.fill_checksum();
        let before = buf.clone();
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        assert!(!p.decrement_ttl());
        p.set_ttl(0);
        p.fill_checksum();
        assert!(!p.decrement_ttl());
        assert_eq!(p.ttl(), 0);
        p.set_ttl(1);
        p.fill_checksum();
        assert_eq!(buf, before);
    }

    #[test]
    fn ecn_update_classic() {
        let mut buf = classic_packet();
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        p.set_ecn_update_checksum(3);
        assert_eq!(p.ecn(), 3);
        assert_eq!(p.checksum(), 0xb85e);
        assert!(p.verify_checksum());
        p.set_ecn_update_checksum(0);
        assert_eq!(p.checksum(), 0xb861);
    }

    #[test]
    fn emit_classic() {
        let h = Ipv4Header {
            src: Ipv4Addr::new(192, 168, 0, 1),
            dst: Ipv4Addr::new(192, 168, 0, 199),
            protocol: 17,
            ttl: 64,
            dscp: 0,
            ecn: 0,
            dont_frag: true,
            ident: 0,
            payload_len: 95,
        };
        let mut buf = [0xaau8; 24];
        emit_header(&mut buf, &h).unwrap();
        assert_eq!(&buf[..20], &CLASSIC);
        assert_eq!(&buf[20..], &[0xaa; 4]);
        assert_eq!(emit_header(&mut buf[..19], &h), Err(Error::Truncated));
        let big = Ipv4Header {
            payload_len: 65516,
            ..h
        };
        assert_eq!(emit_header(&mut buf, &big), Err(Error::Malformed));
        let max = Ipv4Header {
            payload_len: 65515,
            ..h
        };
        assert_eq!(emit_header(&mut buf, &max), Ok(()));
        assert_eq!(&buf[2..4], &[0xff, 0xff]);
        let bad = Ipv4Header { ecn: 4, ..h };
        assert_eq!(emit_header(&mut buf, &bad), Err(Error::Malformed));
        let bad = Ipv4Header { dscp: 64, ..h };
        assert_eq!(emit_header(&mut buf, &bad), Err(Error::Malformed));
    }

    fn arb_header() -> impl Strategy<Value = Ipv4Header> {
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u8>(),
            any::<u8>(),
            0u8..64,
            0u8..4,
            any::<bool>(),
            any::<u16>(),
            0u16..600,
        )
            .prop_map(
                |(s, d, protocol, ttl, dscp, ecn, dont_frag, ident, payload_len)| Ipv4Header {
                    src: Ipv4Addr::from(s),
                    dst: Ipv4Addr::from(d),
                    protocol,
                    ttl,
                    dscp,
                    ecn,
                    dont_frag,
                    ident,
                    payload_len,
                },
            )
    }

    proptest! {
        #[test]
        fn checked_getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..100),
                                       fix_version in any::<bool>()) {
            if fix_version && !data.is_empty() {
                data[0] = 0x40 | (data[0] & 0x0f);
            }
            if let Ok(p) = Ipv4Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.dscp(), p.ecn(), p.ident(), p.dont_frag(),
                         p.more_frags(), p.frag_offset(), p.is_fragment(), p.ttl(),
                         p.next_header(), p.checksum(), p.src_addr(), p.dst_addr(),
                         p.verify_checksum());
                prop_assert_eq!(p.options().len() + HEADER_LEN, p.header_len());
                prop_assert_eq!(p.header_len() + p.payload().len(), usize::from(p.total_len()));
            }
        }

        #[test]
        fn emit_parse_round_trip(h in arb_header()) {
            let mut buf = vec![0u8; HEADER_LEN + usize::from(h.payload_len)];
            emit_header(&mut buf, &h).unwrap();
            let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
            prop_assert!(p.verify_checksum());
            prop_assert_eq!(p.src_addr(), h.src);
            prop_assert_eq!(p.dst_addr(), h.dst);
            prop_assert_eq!(p.next_header(), h.protocol);
            prop_assert_eq!(p.ttl(), h.ttl);
            prop_assert_eq!(p.dscp(), h.dscp);
            prop_assert_eq!(p.ecn(), h.ecn);
            prop_assert_eq!(p.dont_frag(), h.dont_frag);
            prop_assert!(!p.is_fragment());
            prop_assert_eq!(p.ident(), h.ident);
            prop_assert_eq!(p.payload().len(), usize::from(h.payload_len));
        }

        #[test]
        fn incremental_updates_match_full_recompute(h in arb_header(), ecn in 0u8..4) {
            let mut buf = vec![0u8; HEADER_LEN + usize::from(h.payload_len)];
            emit_header(&mut buf, &h).unwrap();
            let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
            let ttl = p.ttl();
            prop_assert_eq!(p.decrement_ttl(), ttl > 1);
            p.set_ecn_update_checksum(ecn);
            let incremental = p.checksum();
            p.fill_checksum();
            prop_assert_eq!(incremental, p.checksum());
            prop_assert_eq!(p.ttl(), if ttl > 1 { ttl - 1 } else { ttl });
            prop_assert_eq!(p.ecn(), ecn);
        }
    }
}
