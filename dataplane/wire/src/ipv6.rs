//! IPv6 headers (RFC 8200) and the extension-header walk that ESP transport
//! mode needs (RFC 4303 §3.1.1).

use core::net::Ipv6Addr;

use crate::ip::protocol;
use crate::{Error, Result, read_u16, read_u32, write_u16};

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

/// At most this many extension headers are walked; one more is
/// [`Error::Malformed`].
pub const MAX_EXT_HEADERS: usize = 8;

mod field {
    use core::ops::Range;

    /// Version (4 bits), traffic class (8), flow label (20).
    pub const VER_TC_FLOW: Range<usize> = 0..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC_ADDR: Range<usize> = 8..24;
    pub const DST_ADDR: Range<usize> = 24..40;
}

/// A view of an IPv6 packet (RFC 8200 §3).
///
/// The buffer may extend past `40 + payload_len` (for example Ethernet
/// padding); [`payload`](Self::payload) stops there. Jumbograms (RFC 2675,
/// payload length 0 with a Jumbo Payload option) are not supported: they
/// read as an empty payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wraps a buffer without checking it; getters may panic if it is short
    /// or its payload length is inconsistent.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv6Packet { buffer }
    }

    /// Wraps a buffer after [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the buffer: fewer than 40 bytes is [`Error::Truncated`], a
    /// version other than 6 is [`Error::Malformed`], and `40 + payload_len`
    /// beyond the buffer is [`Error::Truncated`].
    ///
    /// After this succeeds, no getter panics.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 6 {
            return Err(Error::Malformed);
        }
        if HEADER_LEN + usize::from(self.payload_len()) > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Consumes the view, returning the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    #[inline]
    fn ver_tc_flow(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::VER_TC_FLOW])
    }

    /// Version field (6 for a valid packet).
    #[inline]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 4
    }

    /// Traffic class (DSCP and ECN).
    #[inline]
    pub fn traffic_class(&self) -> u8 {
        (self.ver_tc_flow() >> 20) as u8
    }

    /// DSCP, the upper 6 bits of the traffic class (RFC 2474).
    #[inline]
    pub fn dscp(&self) -> u8 {
        self.traffic_class() >> 2
    }

    /// ECN, the lower 2 bits of the traffic class (RFC 3168).
    #[inline]
    pub fn ecn(&self) -> u8 {
        self.traffic_class() & 0x03
    }

    /// Flow label (20 bits).
    #[inline]
    pub fn flow_label(&self) -> u32 {
        self.ver_tc_flow() & 0x000f_ffff
    }

    /// Payload length: everything after the fixed header, extension headers
    /// included.
    #[inline]
    pub fn payload_len(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// Next header of the fixed header.
    #[inline]
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }

    /// Hop limit.
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC_ADDR]);
        Ipv6Addr::from(a)
    }

    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST_ADDR]);
        Ipv6Addr::from(a)
    }

    /// The payload, bytes 40 to `40 + payload_len` (extension headers
    /// included).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &self.buffer.as_ref()[HEADER_LEN..end]
    }

    /// Walks the extension-header chain (RFC 8200 §4).
    ///
    /// Hop-by-Hop (0), Routing (43) and Destination Options (60) have a length
    /// in 8-octet units not counting the first 8; Fragment (44) is 8 bytes;
    /// AH (51) is `(len + 2) * 4` bytes (RFC 4302 §2.2). Any other value,
    /// including ESP (50) and No Next Header (59), ends the walk as the upper
    /// protocol. After a Fragment header with a non-zero offset the walk also
    /// stops: what follows is the middle of the fragmentable part, so
    /// `upper_protocol` is that header's next-header value and the bytes at
    /// `upper_offset` are not a header.
    ///
    /// Errors: a header running past `40 + payload_len` (or past the buffer)
    /// is [`Error::Truncated`]; more than [`MAX_EXT_HEADERS`] extension
    /// headers, Hop-by-Hop anywhere but first (RFC 8200 §4.3), or a second
    /// Fragment header is [`Error::Malformed`].
    ///
    /// Never panics, even on an unchecked buffer (a short one is
    /// [`Error::Truncated`]).
    pub fn walk_ext_headers(&self) -> Result<ExtHeaders> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let end = HEADER_LEN + usize::from(self.payload_len());
        let pkt = b.get(..end).ok_or(Error::Truncated)?;

        let mut out = ExtHeaders {
            upper_protocol: self.next_header(),
            upper_offset: HEADER_LEN,
            fragment: None,
            esp_insert_offset: HEADER_LEN,
            esp_insert_nh_field: field::NXT_HDR,
        };
        let mut nh = self.next_header();
        let mut off = HEADER_LEN;
        let mut count = 0;
        loop {
            if !is_ext_header(nh) {
                break;
            }
            count += 1;
            if count > MAX_EXT_HEADERS || (nh == protocol::HOPOPT && count != 1) {
                return Err(Error::Malformed);
            }
            let len = match nh {
                protocol::FRAGMENT => 8,
                protocol::AH => (usize::from(*pkt.get(off + 1).ok_or(Error::Truncated)?) + 2) * 4,
                _ => (usize::from(*pkt.get(off + 1).ok_or(Error::Truncated)?) + 1) * 8,
            };
            let hdr = pkt.get(off..off + len).ok_or(Error::Truncated)?;
            let this = nh;
            nh = hdr[0];
            let mut stop = false;
            if this == protocol::FRAGMENT {
                if out.fragment.is_some() {
                    return Err(Error::Malformed);
                }
                let fo = read_u16(&hdr[2..4]);
                let frag = Fragment {
                    offset_bytes: fo & 0xfff8,
                    more: fo & 0x0001 != 0,
                    ident: read_u32(&hdr[4..8]),
                };
                stop = frag.offset_bytes != 0;
                out.fragment = Some(frag);
            }
            if matches!(
                this,
                protocol::HOPOPT | protocol::ROUTING | protocol::FRAGMENT
            ) {
                out.esp_insert_offset = off + len;
                out.esp_insert_nh_field = off;
            }
            off += len;
            if stop {
                break;
            }
        }
        out.upper_protocol = nh;
        out.upper_offset = off;
        Ok(out)
    }
}

/// Whether `nh` names an extension header this crate walks over.
#[inline]
fn is_ext_header(nh: u8) -> bool {
    matches!(
        nh,
        protocol::HOPOPT
            | protocol::ROUTING
            | protocol::FRAGMENT
            | protocol::DSTOPTS
            | protocol::AH
    )
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    #[inline]
    fn set_ver_tc_flow(&mut self, v: u32) {
        self.buffer.as_mut()[field::VER_TC_FLOW].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets version 6 (the other fields of the first word are kept).
    #[inline]
    pub fn set_version(&mut self) {
        let v = (self.ver_tc_flow() & 0x0fff_ffff) | 0x6000_0000;
        self.set_ver_tc_flow(v);
    }

    /// Sets the traffic class.
    #[inline]
    pub fn set_traffic_class(&mut self, tc: u8) {
        let v = (self.ver_tc_flow() & 0xf00f_ffff) | (u32::from(tc) << 20);
        self.set_ver_tc_flow(v);
    }

    /// Sets the DSCP (6 bits), keeping the ECN bits.
    #[inline]
    pub fn set_dscp(&mut self, dscp: u8) {
        let tc = (self.traffic_class() & 0x03) | (dscp << 2);
        self.set_traffic_class(tc);
    }

    /// Sets the ECN field (2 bits), keeping the DSCP.
    #[inline]
    pub fn set_ecn(&mut self, ecn: u8) {
        let tc = (self.traffic_class() & !0x03) | (ecn & 0x03);
        self.set_traffic_class(tc);
    }

    /// Sets the flow label (the value is masked to 20 bits).
    #[inline]
    pub fn set_flow_label(&mut self, label: u32) {
        let v = (self.ver_tc_flow() & 0xfff0_0000) | (label & 0x000f_ffff);
        self.set_ver_tc_flow(v);
    }

    /// Sets the payload length.
    #[inline]
    pub fn set_payload_len(&mut self, len: u16) {
        write_u16(&mut self.buffer.as_mut()[field::LENGTH], len);
    }

    /// Sets the next header of the fixed header.
    #[inline]
    pub fn set_next_header(&mut self, nh: u8) {
        self.buffer.as_mut()[field::NXT_HDR] = nh;
    }

    /// Sets the hop limit.
    #[inline]
    pub fn set_hop_limit(&mut self, hl: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = hl;
    }

    /// Sets the source address.
    #[inline]
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// The payload (`40..40 + payload_len`), mutably.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Decrements the hop limit. Returns `false`, changing nothing, if it is
    /// 0 or 1 (the packet must not be forwarded).
    #[inline]
    pub fn decrement_hop_limit(&mut self) -> bool {
        let hl = self.hop_limit();
        if hl <= 1 {
            return false;
        }
        self.set_hop_limit(hl - 1);
        true
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Ipv6Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// A Fragment header's contents (RFC 8200 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Fragment offset in bytes (the field is in 8-byte units).
    pub offset_bytes: u16,
    /// M flag: more fragments follow.
    pub more: bool,
    /// Identification.
    pub ident: u32,
}

/// Result of [`Ipv6Packet::walk_ext_headers`]. All offsets are from the start
/// of the IPv6 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtHeaders {
    /// The first next-header value that is not a walked extension header
    /// (ESP = 50 and No Next Header = 59 also end the walk).
    pub upper_protocol: u8,
    /// Offset of that upper-layer header.
    pub upper_offset: usize,
    /// The Fragment header, if one was seen.
    pub fragment: Option<Fragment>,
    /// Where ESP goes in transport mode (RFC 4303 §3.1.1): after Hop-by-Hop,
    /// Routing and Fragment headers, and so after a Destination Options header
    /// only if a Routing header follows it. 40 when there is none of these.
    pub esp_insert_offset: usize,
    /// Offset of the next-header byte that names what follows
    /// `esp_insert_offset` (6, in the fixed header, when that is 40); ESP
    /// insertion rewrites this byte to 50.
    pub esp_insert_nh_field: usize,
}

/// The fields of a fixed IPv6 header, for [`emit_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Header {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Next header.
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class (DSCP and ECN).
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
    /// Payload length.
    pub payload_len: u16,
}

/// Writes a 40-byte IPv6 header into `buf[..40]`.
///
/// [`Error::Truncated`] if `buf` is shorter than 40 bytes;
/// [`Error::Malformed`] if `flow_label` does not fit 20 bits. Nothing is
/// written on error.
#[inline]
pub fn emit_header(buf: &mut [u8], h: &Ipv6Header) -> Result<()> {
    if buf.len() < HEADER_LEN {
        return Err(Error::Truncated);
    }
    if h.flow_label > 0x000f_ffff {
        return Err(Error::Malformed);
    }
    let mut p = Ipv6Packet::new_unchecked(&mut buf[..HEADER_LEN]);
    p.set_ver_tc_flow(0x6000_0000 | (u32::from(h.traffic_class) << 20) | h.flow_label);
    p.set_payload_len(h.payload_len);
    p.set_next_header(h.next_header);
    p.set_hop_limit(h.hop_limit);
    p.set_src_addr(h.src);
    p.set_dst_addr(h.dst);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2001:db8::1 -> 2001:db8::2, traffic class 0xb9 (EF, ECT(1)), flow label
    /// 0x12345, hop limit 64, followed by `payload` with `nh` as next header.
    fn packet(nh: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![
            0x6b, 0x91, 0x23, 0x45, 0x00, 0x00, nh, 0x40, // ver/tc/flow, len, nh, hlim
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // src
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // dst
        ];
        let len = payload.len() as u16;
        v[4..6].copy_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A UDP datagram 1234 -> 53 with 4 payload bytes.
    const UDP: [u8; 12] = [
        0x04, 0xd2, 0x00, 0x35, 0x00, 0x0c, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef,
    ];

    #[test]
    fn parse_fixed_header() {
        let buf = packet(17, &UDP);
        let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0xb9);
        assert_eq!(p.dscp(), 46);
        assert_eq!(p.ecn(), 1);
        assert_eq!(p.flow_label(), 0x12345);
        assert_eq!(p.payload_len(), 12);
        assert_eq!(p.next_header(), 17);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr(), "2001:db8::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "2001:db8::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload(), &UDP);
        let e = p.walk_ext_headers().unwrap();
        assert_eq!(
            e,
            ExtHeaders {
                upper_protocol: 17,
                upper_offset: 40,
                fragment: None,
                esp_insert_offset: 40,
                esp_insert_nh_field: 6,
            }
        );
    }

    #[test]
    fn check_len_errors() {
        let mut buf = packet(17, &UDP);
        assert_eq!(
            Ipv6Packet::new_checked(&buf[..39]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Ipv6Packet::new_checked(&buf[..51]).unwrap_err(),
            Error::Truncated
        );
        buf.push(0); // trailing padding is fine
        let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.payload().len(), 12);
        buf[0] = 0x4b;
        assert_eq!(
            Ipv6Packet::new_checked(&buf[..]).unwrap_err(),
            Error::Malformed
        );
    }

    #[test]
    fn setters() {
        let mut buf = packet(17, &UDP);
        let mut p = Ipv6Packet::new_checked(&mut buf[..]).unwrap();
        p.set_ecn(3);
        assert_eq!((p.dscp(), p.ecn()), (46, 3));
        p.set_dscp(10);
        assert_eq!((p.dscp(), p.ecn(), p.traffic_class()), (10, 3, 0x2b));
        assert_eq!(p.flow_label(), 0x12345);
        p.set_flow_label(0xfffff);
        assert_eq!(p.flow_label(), 0xfffff);
        assert_eq!(p.traffic_class(), 0x2b);
        assert_eq!(p.version(), 6);
        p.set_traffic_class(0xff);
        assert_eq!(p.flow_label(), 0xfffff);
        assert_eq!(p.version(), 6);
        p.set_flow_label(0x1_00001);
        assert_eq!(p.flow_label(), 1);
        p.set_next_header(50);
        p.set_hop_limit(2);
        assert!(p.decrement_hop_limit());
        assert!(!p.decrement_hop_limit());
        assert_eq!(p.hop_limit(), 1);
        p.set_hop_limit(0);
        assert!(!p.decrement_hop_limit());
        assert_eq!(p.hop_limit(), 0);
        let a: Ipv6Addr = "fe80::1".parse().unwrap();
        p.set_src_addr(a);
        p.set_dst_addr(Ipv6Addr::LOCALHOST);
        p.set_payload_len(4);
        p.payload_mut().copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(p.src_addr(), a);
        assert_eq!(p.dst_addr(), Ipv6Addr::LOCALHOST);
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        assert_eq!(&buf[..8], &[0x6f, 0xf0, 0x00, 0x01, 0x00, 0x04, 50, 0]);
    }

    /// Hop-by-Hop with a Router Alert option (RFC 2711), 8 bytes.
    fn hbh(nh: u8) -> [u8; 8] {
        [nh, 0, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00]
    }
    /// Destination Options, 16 bytes (len 1) of PadN.
    fn dstopts(nh: u8) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0] = nh;
        h[1] = 1;
        h[2] = 0x01; // PadN
        h[3] = 12;
        h
    }
    /// Type 4 (segment routing) header with one segment: 24 bytes (len 2).
    fn routing(nh: u8) -> [u8; 24] {
        let mut h = [0u8; 24];
        h[0] = nh;
        h[1] = 2;
        h[2] = 4;
        h[8..24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        h
    }
    fn fragment(nh: u8, offset: u16, more: bool, ident: u32) -> [u8; 8] {
        let fo = offset | u16::from(more);
        let mut h = [nh, 0, 0, 0, 0, 0, 0, 0];
        h[2..4].copy_from_slice(&fo.to_be_bytes());
        h[4..8].copy_from_slice(&ident.to_be_bytes());
        h
    }
    /// AH with a 12-byte ICV: payload len (3 + 3) - 2 = 4, 24 bytes.
    fn ah(nh: u8) -> [u8; 24] {
        let mut h = [0u8; 24];
        h[0] = nh;
        h[1] = 4;
        h[4..8].copy_from_slice(&0x1000u32.to_be_bytes());
        h
    }

    fn walk(nh: u8, chain: &[&[u8]]) -> Result<ExtHeaders> {
        let payload: Vec<u8> = chain.concat();
        let buf = packet(nh, &payload);
        Ipv6Packet::new_checked(&buf[..])?.walk_ext_headers()
    }

    #[test]
    fn walk_hop_by_hop() {
        let e = walk(0, &[&hbh(17), &UDP]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (17, 48));
        assert_eq!((e.esp_insert_offset, e.esp_insert_nh_field), (48, 40));
        assert_eq!(e.fragment, None);
    }

    #[test]
    fn walk_full_chain_rfc8200_order() {
        // HbH, DestOpts (before Routing), Routing, Fragment, AH, DestOpts, TCP.
        let e = walk(
            0,
            &[
                &hbh(60),
                &dstopts(43),
                &routing(44),
                &fragment(51, 0, true, 0xdead_beef),
                &ah(60),
                &dstopts(6),
                &[0u8; 20],
            ],
        )
        .unwrap();
        assert_eq!(e.upper_protocol, 6);
        assert_eq!(e.upper_offset, 40 + 8 + 16 + 24 + 8 + 24 + 16);
        assert_eq!(
            e.fragment,
            Some(Fragment {
                offset_bytes: 0,
                more: true,
                ident: 0xdead_beef
            })
        );
        // ESP goes after the Fragment header; its next-header byte is at its start.
        assert_eq!(e.esp_insert_offset, 40 + 8 + 16 + 24 + 8);
        assert_eq!(e.esp_insert_nh_field, 40 + 8 + 16 + 24);
    }

    #[test]
    fn walk_dest_opts_before_routing_goes_before_esp() {
        let e = walk(60, &[&dstopts(43), &routing(17), &UDP]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (17, 80));
        assert_eq!((e.esp_insert_offset, e.esp_insert_nh_field), (80, 56));
    }

    #[test]
    fn walk_dest_opts_without_routing_goes_after_esp() {
        let e = walk(60, &[&dstopts(17), &UDP]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (17, 56));
        assert_eq!((e.esp_insert_offset, e.esp_insert_nh_field), (40, 6));
        let e = walk(0, &[&hbh(60), &dstopts(6), &[0u8; 20]]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (6, 64));
        assert_eq!((e.esp_insert_offset, e.esp_insert_nh_field), (48, 40));
    }

    #[test]
    fn walk_stops_at_esp_and_no_next() {
        let esp = [0, 0, 0x10, 0, 0, 0, 0, 1, 0xaa, 0xbb];
        let e = walk(0, &[&hbh(50), &esp]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (50, 48));
        let e = walk(59, &[]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (59, 40));
        // Trailing bytes after No Next Header are ignored.
        let e = walk(60, &[&dstopts(59), &[1, 2, 3]]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (59, 56));
    }

    #[test]
    fn walk_ah_length() {
        let e = walk(51, &[&ah(17), &UDP]).unwrap();
        assert_eq!((e.upper_protocol, e.upper_offset), (17, 64));
        assert_eq!(e.esp_insert_offset, 40);
    }

    #[test]
    fn walk_non_first_fragment_stops() {
        // The bytes after this fragment header are not a Destination Options
        // header even though the Fragment header says 60.
        let e = walk(44, &[&fragment(60, 1448, false, 7), &[0xff; 32]]).unwrap();
        assert_eq!(e.upper_protocol, 60);
        assert_eq!(e.upper_offset, 48);
        assert_eq!(
            e.fragment,
            Some(Fragment {
                offset_bytes: 1448,
                more: false,
                ident: 7
            })
        );
        assert_eq!((e.esp_insert_offset, e.esp_insert_nh_field), (48, 40));
    }

    #[test]
    fn walk_errors() {
        // A header past payload_len.
        assert_eq!(walk(0, &[&hbh(17)[..7]]), Err(Error::Truncated));
        assert_eq!(walk(60, &[&dstopts(17)[..15]]), Err(Error::Truncated));
        assert_eq!(
            walk(44, &[&fragment(17, 0, true, 1)[..7]]),
            Err(Error::Truncated)
        );
        assert_eq!(walk(51, &[&ah(17)[..23]]), Err(Error::Truncated));
        assert_eq!(walk(60, &[]), Err(Error::Truncated));
        assert_eq!(walk(60, &[&[17]]), Err(Error::Truncated));
        // Bytes beyond payload_len in the buffer do not count.
        let mut buf = packet(60, &dstopts(17)[..8]);
        buf.extend_from_slice(&[0; 8]);
        let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.walk_ext_headers(), Err(Error::Truncated));
        // Hop-by-Hop not first.
        assert_eq!(walk(60, &[&dstopts(0), &hbh(17)]), Err(Error::Malformed));
        // Two Fragment headers.
        assert_eq!(
            walk(44, &[&fragment(44, 0, true, 1), &fragment(17, 0, true, 1)]),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn walk_header_count_limit() {
        let mid = dstopts(60);
        let last = dstopts(17);
        let mut chain: Vec<&[u8]> = vec![&mid; 7];
        chain.push(&last);
        let e = walk(60, &chain).unwrap();
        assert_eq!(e.upper_offset, 40 + 8 * 16);
        // Nine extension headers.
        chain.insert(0, &mid);
        assert_eq!(walk(60, &chain), Err(Error::Malformed));
    }

    #[test]
    fn walk_on_unchecked_never_panics() {
        let buf = packet(60, &dstopts(17));
        for n in 0..buf.len() {
            let p = Ipv6Packet::new_unchecked(&buf[..n]);
            assert_eq!(p.walk_ext_headers(), Err(Error::Truncated));
        }
    }

    #[test]
    fn emit() {
        let h = Ipv6Header {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
            next_header: 17,
            hop_limit: 64,
            traffic_class: 0xb9,
            flow_label: 0x12345,
            payload_len: 12,
        };
        let mut buf = [0u8; 40];
        emit_header(&mut buf, &h).unwrap();
        assert_eq!(&buf[..], &packet(17, &UDP)[..40]);
        assert_eq!(emit_header(&mut buf[..39], &h), Err(Error::Truncated));
        let bad = Ipv6Header {
            flow_label: 0x100000,
            ..h
        };
        assert_eq!(emit_header(&mut buf, &bad), Err(Error::Malformed));
    }

    proptest! {
        #[test]
        fn checked_getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..120),
                                       fix in any::<bool>(), len in any::<u8>(), nh in prop::sample::select(vec![0u8, 43, 44, 51, 60, 17])) {
            if fix && data.len() >= 40 {
                data[0] = 0x60 | (data[0] & 0x0f);
                let plen = (usize::from(len) % (data.len() - 39)) as u16;
                data[4..6].copy_from_slice(&plen.to_be_bytes());
                data[6] = nh;
            }
            if let Ok(p) = Ipv6Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.traffic_class(), p.dscp(), p.ecn(), p.flow_label(),
                         p.next_header(), p.hop_limit(), p.src_addr(), p.dst_addr());
                prop_assert_eq!(p.payload().len(), usize::from(p.payload_len()));
                if let Ok(e) = p.walk_ext_headers() {
                    let end = 40 + usize::from(p.payload_len());
                    prop_assert!(e.upper_offset <= end);
                    prop_assert!(e.esp_insert_offset <= e.upper_offset);
                    prop_assert!(e.esp_insert_nh_field < e.esp_insert_offset);
                }
            }
        }

        #[test]
        fn emit_parse_round_trip(src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(),
                                 next_header in any::<u8>(), hop_limit in any::<u8>(),
                                 traffic_class in any::<u8>(), flow_label in 0u32..0x100000,
                                 payload_len in 0u16..300) {
            let h = Ipv6Header { src: src.into(), dst: dst.into(), next_header, hop_limit,
                                 traffic_class, flow_label, payload_len };
            let mut buf = vec![0u8; 40 + usize::from(payload_len)];
            emit_header(&mut buf, &h).unwrap();
            let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(p.src_addr(), h.src);
            prop_assert_eq!(p.dst_addr(), h.dst);
            prop_assert_eq!(p.next_header(), next_header);
            prop_assert_eq!(p.hop_limit(), hop_limit);
            prop_assert_eq!(p.traffic_class(), traffic_class);
            prop_assert_eq!(p.flow_label(), flow_label);
            prop_assert_eq!(p.payload().len(), usize::from(payload_len));
        }
    }
}
