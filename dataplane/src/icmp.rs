//! Packets the gateway writes itself: ICMP "fragmentation needed" / ICMPv6 "packet too big"
//! answers when a DF packet will not fit the tunnel (seed 004: the PMTU problem behind most
//! "the VPN is up but large transfers hang" calls), IPv4 fragments of packets without DF that
//! do not fit (fragmentation before encryption), and TCP MSS clamping of SYNs (Cisco's
//! `ip tcp adjust-mss`).

use espgw_wire::checksum;
use std::net::IpAddr;

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const ICMP_HEADER: usize = 8;
/// RFC 1812 §4.3.2.3: an ICMP error holds as much of the original as fits in 576 bytes.
const V4_MAX: usize = 576;
/// RFC 4443 §2.4(c): as much as fits the minimum IPv6 MTU.
const V6_MAX: usize = 1280;

/// Replace the IP packet at `buf[ip_at..ip_at + ip_len]` by an ICMP error telling its source
/// that at most `mtu` bytes fit: type 3 code 4 with the next-hop MTU for IPv4 (RFC 1191),
/// type 2 "packet too big" for IPv6 (RFC 4443 §3.2). The error quotes the start of the original
/// and is sent from `ours` (the gateway's address on the port the packet came in by). Returns
/// the new `(ip_at, ip_len)`, or `None` when no error may be sent (RFC 1122 §3.2.2 / RFC 4443
/// §2.4(e): never about an ICMP error, a non-first fragment or a multicast/unspecified
/// source) or there is no room in front.
pub fn too_big(
    buf: &mut [u8],
    ip_at: usize,
    ip_len: usize,
    v6: bool,
    ours: IpAddr,
    mtu: u32,
) -> Option<(usize, usize)> {
    let orig = buf.get(ip_at..ip_at.checked_add(ip_len)?)?;
    if v6 {
        let IpAddr::V6(src_us) = ours else {
            return None;
        };
        if orig.len() < IPV6_HEADER {
            return None;
        }
        let dst: [u8; 16] = orig[8..24].try_into().ok()?;
        let d = std::net::Ipv6Addr::from(dst);
        if d.is_multicast() || d.is_unspecified() {
            return None;
        }
        // An ICMPv6 error (types 0-127) right after the fixed header is never answered.
        if orig[6] == 58 && orig.get(IPV6_HEADER).is_some_and(|t| *t < 128) {
            return None;
        }
        let quoted = ip_len.min(V6_MAX - IPV6_HEADER - ICMP_HEADER);
        let at = ip_at.checked_sub(IPV6_HEADER + ICMP_HEADER)?;
        let icmp_len = ICMP_HEADER + quoted;
        let h = buf.get_mut(at..at + IPV6_HEADER + icmp_len)?;
        h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        h[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
        h[6] = 58;
        h[7] = 255;
        h[8..24].copy_from_slice(&src_us.octets());
        h[24..40].copy_from_slice(&dst);
        let icmp = &mut h[IPV6_HEADER..];
        icmp[0] = 2;
        icmp[1] = 0;
        icmp[2..4].copy_from_slice(&[0, 0]);
        icmp[4..8].copy_from_slice(&mtu.to_be_bytes());
        let sum = checksum::combine(&[
            checksum::pseudo_header_v6(&src_us, &d, 58, icmp_len as u32),
            checksum::sum(icmp),
        ]);
        icmp[2..4].copy_from_slice(&(!sum).to_be_bytes());
        Some((at, IPV6_HEADER + icmp_len))
    } else {
        let IpAddr::V4(src_us) = ours else {
            return None;
        };
        if orig.len() < IPV4_HEADER {
            return None;
        }
        let ihl = usize::from(orig[0] & 0x0f) * 4;
        let frag_off = u16::from_be_bytes([orig[6], orig[7]]) & 0x1fff;
        let dst: [u8; 4] = orig[12..16].try_into().ok()?;
        let d = std::net::Ipv4Addr::from(dst);
        if frag_off != 0 || d.is_multicast() || d.is_broadcast() || d.is_unspecified() {
            return None;
        }
        // ICMP errors (destination unreachable, source quench, redirect, time exceeded,
        // parameter problem) are never answered.
        if orig[9] == 1
            && orig
                .get(ihl)
                .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
        {
            return None;
        }
        let quoted = ip_len.min(V4_MAX - IPV4_HEADER - ICMP_HEADER);
        let at = ip_at.checked_sub(IPV4_HEADER + ICMP_HEADER)?;
        let total = IPV4_HEADER + ICMP_HEADER + quoted;
        let h = buf.get_mut(at..at + total)?;
        h[0] = 0x45;
        h[1] = 0xc0; // precedence "internetwork control", as routers send errors
        h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        h[4..8].copy_from_slice(&[0, 0, 0, 0]);
        h[8] = 64;
        h[9] = 1;
        h[10..12].copy_from_slice(&[0, 0]);
        h[12..16].copy_from_slice(&src_us.octets());
        h[16..20].copy_from_slice(&dst);
        let hsum = checksum::sum(&h[..IPV4_HEADER]);
        h[10..12].copy_from_slice(&(!hsum).to_be_bytes());
        let icmp = &mut h[IPV4_HEADER..];
        icmp[0] = 3;
        icmp[1] = 4;
        icmp[2..6].copy_from_slice(&[0, 0, 0, 0]);
        icmp[6..8].copy_from_slice(&(mtu.min(0xffff) as u16).to_be_bytes());
        let sum = checksum::sum(icmp);
        icmp[2..4].copy_from_slice(&(!sum).to_be_bytes());
        Some((at, total))
    }
}

/// Split the IPv4 packet `ip` (a 20-byte header, no options) into fragments of at most
/// `max_ip` bytes each (RFC 791: payload pieces in multiples of 8 bytes, except the last; a
/// packet that is itself a fragment keeps its offset and its MF on the last piece). For each
/// piece `emit(header, payload)` is called with the piece's finished header (length, flags,
/// offset, checksum). Returns the number of pieces, 0 if the packet cannot be split (DF set,
/// options present, too small a `max_ip`).
pub fn fragment_v4(ip: &[u8], max_ip: usize, mut emit: impl FnMut(&[u8; 20], &[u8])) -> usize {
    if ip.len() < IPV4_HEADER || ip[0] != 0x45 || ip[6] & 0x40 != 0 {
        return 0;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let step = max_ip.saturating_sub(IPV4_HEADER) / 8 * 8;
    if step == 0 || total <= IPV4_HEADER {
        return 0;
    }
    let flags_off = u16::from_be_bytes([ip[6], ip[7]]);
    let base = usize::from(flags_off & 0x1fff) * 8;
    let orig_more = flags_off & 0x2000 != 0;
    let payload = &ip[IPV4_HEADER..total];
    let mut n = 0;
    let mut off = 0;
    while off < payload.len() {
        let len = step.min(payload.len() - off);
        let last = off + len == payload.len();
        let mut h = [0u8; 20];
        h.copy_from_slice(&ip[..IPV4_HEADER]);
        h[2..4].copy_from_slice(&((IPV4_HEADER + len) as u16).to_be_bytes());
        let fo = ((base + off) / 8) as u16 | if !last || orig_more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&fo.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum::sum(&h);
        h[10..12].copy_from_slice(&(!sum).to_be_bytes());
        emit(&h, &payload[off..off + len]);
        n += 1;
        off += len;
    }
    n
}

/// [`fragment_v4`] for an Ethernet frame (optionally 802.1Q/802.1ad tagged): `emit(ethernet,
/// header, payload)` per piece, the Ethernet header being the frame's own.
pub fn fragment_frame(
    frame: &[u8],
    max_ip: usize,
    mut emit: impl FnMut(&[u8], &[u8; 20], &[u8]),
) -> usize {
    let eth_len = match frame.get(12..14) {
        Some([0x81, 0x00]) | Some([0x88, 0xa8]) => 18,
        _ => 14,
    };
    if frame.len() < eth_len {
        return 0;
    }
    let (eth, ip) = frame.split_at(eth_len);
    fragment_v4(ip, max_ip, |h, d| emit(eth, h, d))
}

/// If `pkt` (an IP packet whose upper-layer header starts at `upper`) is a TCP segment with SYN
/// set and an MSS option above `mss`, lower the option to `mss` and patch the TCP checksum
/// (RFC 1624). Returns whether the packet changed.
pub fn clamp_mss(pkt: &mut [u8], upper: usize, mss: u16) -> bool {
    let Some(tcp) = pkt.get_mut(upper..) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return false;
    }
    let hlen = usize::from(tcp[12] >> 4) * 4;
    if hlen < 20 || hlen > tcp.len() {
        return false;
    }
    let mut i = 20;
    while i < hlen {
        match tcp[i] {
            0 => return false, // end of options
            1 => i += 1,       // no-op
            kind => {
                let Some(&len) = tcp.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > hlen {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= mss {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    // The option sits at an even or odd offset; RFC 1624 works on aligned 16-bit
                    // words, so update the word(s) that hold the two bytes.
                    let csum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    let new = if i % 2 == 0 {
                        incremental(csum, old, mss)
                    } else {
                        // Bytes straddle two words: [x, hi] and [lo, y].
                        let w1_old = u16::from_be_bytes([tcp[i + 1], (old >> 8) as u8]);
                        let w1_new = u16::from_be_bytes([tcp[i + 1], (mss >> 8) as u8]);
                        let y = tcp.get(i + 4).copied().unwrap_or(0);
                        let w2_old = u16::from_be_bytes([old as u8, y]);
                        let w2_new = u16::from_be_bytes([mss as u8, y]);
                        incremental(incremental(csum, w1_old, w1_new), w2_old, w2_new)
                    };
                    tcp[16..18].copy_from_slice(&new.to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
fn incremental(hc: u16, old: u16, new: u16) -> u16 {
    !checksum::combine(&[!hc, !old, new])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4_packet(len: usize, proto: u8, df: bool) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        if df {
            p[6] = 0x40;
        }
        p[8] = 63;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 1, 0, 5]);
        p[16..20].copy_from_slice(&[10, 2, 0, 9]);
        let s = checksum::sum(&p[..20]);
        p[10..12].copy_from_slice(&(!s).to_be_bytes());
        p
    }

    #[test]
    fn frag_needed_quotes_the_original_and_checks_out() {
        let orig = v4_packet(1500, 6, true);
        let mut buf = vec![0u8; 256];
        buf.extend_from_slice(&orig);
        let (at, len) = too_big(
            &mut buf,
            256,
            1500,
            false,
            "10.1.0.1".parse().unwrap(),
            1418,
        )
        .unwrap();
        assert_eq!(len, 576);
        let p = &buf[at..at + len];
        assert_eq!(checksum::sum(&p[..20]), 0xffff, "IPv4 header checksum");
        assert_eq!(&p[12..16], &[10, 1, 0, 1]);
        assert_eq!(&p[16..20], &[10, 1, 0, 5]);
        assert_eq!((p[20], p[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([p[26], p[27]]), 1418);
        assert_eq!(checksum::sum(&p[20..]), 0xffff, "ICMP checksum");
        assert_eq!(
            &p[28..],
            &orig[..548],
            "quotes the original from its IP header on"
        );
    }

    #[test]
    fn packet_too_big_v6() {
        let mut orig = vec![0u8; 1400];
        orig[0] = 0x60;
        orig[4..6].copy_from_slice(&1360u16.to_be_bytes());
        orig[6] = 17;
        orig[7] = 64;
        let src: Ipv6Addr = "2001:db8:1::5".parse().unwrap();
        orig[8..24].copy_from_slice(&src.octets());
        orig[24..40].copy_from_slice(&"2001:db8:2::9".parse::<Ipv6Addr>().unwrap().octets());
        let mut buf = vec![0u8; 256];
        buf.extend_from_slice(&orig);
        let us: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        let (at, len) = too_big(&mut buf, 256, 1400, true, IpAddr::V6(us), 1350).unwrap();
        assert_eq!(len, 1280);
        let p = &buf[at..at + len];
        assert_eq!(p[6], 58);
        assert_eq!(&p[24..40], &src.octets());
        assert_eq!((p[40], p[41]), (2, 0));
        assert_eq!(u32::from_be_bytes([p[44], p[45], p[46], p[47]]), 1350);
        let sum = checksum::combine(&[
            checksum::pseudo_header_v6(&us, &src, 58, 1240),
            checksum::sum(&p[40..]),
        ]);
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn no_error_about_errors_fragments_or_broadcast() {
        let us: IpAddr = Ipv4Addr::new(10, 1, 0, 1).into();
        let mut icmp_err = v4_packet(1500, 1, true);
        icmp_err[20] = 3;
        let mut buf = vec![0u8; 64];
        buf.extend_from_slice(&icmp_err);
        assert!(too_big(&mut buf, 64, 1500, false, us, 1400).is_none());
        let mut frag = v4_packet(1500, 6, false);
        frag[7] = 10;
        let mut buf = vec![0u8; 64];
        buf.extend_from_slice(&frag);
        assert!(too_big(&mut buf, 64, 1500, false, us, 1400).is_none());
        let mut bcast = v4_packet(1500, 17, true);
        bcast[12..16].copy_from_slice(&[255, 255, 255, 255]);
        let mut buf = vec![0u8; 64];
        buf.extend_from_slice(&bcast);
        assert!(too_big(&mut buf, 64, 1500, false, us, 1400).is_none());
        // No room in front.
        let mut buf = v4_packet(1500, 6, true);
        assert!(too_big(&mut buf, 0, 1500, false, us, 1400).is_none());
        // Wrong family for our address.
        let mut buf = vec![0u8; 64];
        buf.extend_from_slice(&v4_packet(1500, 6, true));
        assert!(
            too_big(
                &mut buf,
                64,
                1500,
                false,
                "2001:db8::1".parse().unwrap(),
                1400
            )
            .is_none()
        );
    }

    #[test]
    fn fragments_carry_the_packet_in_multiples_of_eight() {
        let p = v4_packet(1500, 17, false);
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let n = fragment_v4(&p, 1000, |h, d| {
            let mut v = h.to_vec();
            v.extend_from_slice(d);
            pieces.push(v);
        });
        assert_eq!(n, 2);
        assert_eq!(pieces[0].len(), 20 + 976);
        assert_eq!(pieces[1].len(), 20 + 1480 - 976);
        for (i, f) in pieces.iter().enumerate() {
            assert_eq!(checksum::sum(&f[..20]), 0xffff);
            assert_eq!(usize::from(u16::from_be_bytes([f[2], f[3]])), f.len());
            let fo = u16::from_be_bytes([f[6], f[7]]);
            assert_eq!(fo & 0x2000 != 0, i == 0, "MF on all but the last");
            assert_eq!(usize::from(fo & 0x1fff) * 8, i * 976);
            assert_eq!(&f[12..20], &p[12..20]);
        }
        let joined: Vec<u8> = pieces.iter().flat_map(|f| f[20..].to_vec()).collect();
        assert_eq!(joined, p[20..].to_vec());
        // A fragment split again keeps its offset and MF.
        let mut frag = v4_packet(1000, 17, false);
        frag[6..8].copy_from_slice(&(0x2000u16 | 100).to_be_bytes());
        let mut offs = Vec::new();
        fragment_v4(&frag, 600, |h, _| {
            offs.push(u16::from_be_bytes([h[6], h[7]]))
        });
        assert_eq!(offs, vec![0x2000 | 100, 0x2000 | (100 + 72)]);
        // DF, options or no room: not split.
        assert_eq!(fragment_v4(&v4_packet(1500, 17, true), 1000, |_, _| {}), 0);
        let mut opt = v4_packet(1500, 17, false);
        opt[0] = 0x46;
        assert_eq!(fragment_v4(&opt, 1000, |_, _| {}), 0);
        assert_eq!(fragment_v4(&p, 27, |_, _| {}), 0);
    }

    fn syn(options: &[u8], mss_at_odd: bool) -> (Vec<u8>, usize) {
        let mut opts = Vec::new();
        if mss_at_odd {
            opts.push(1); // NOP shifts the MSS option to an odd offset
        }
        opts.extend_from_slice(options);
        while opts.len() % 4 != 0 {
            opts.push(1);
        }
        let tcp_len = 20 + opts.len();
        let mut p = v4_packet(20 + tcp_len, 6, true);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&443u16.to_be_bytes());
        t[12] = ((tcp_len / 4) as u8) << 4;
        t[13] = 0x02;
        t[20..].copy_from_slice(&opts);
        let src = Ipv4Addr::new(10, 1, 0, 5);
        let dst = Ipv4Addr::new(10, 2, 0, 9);
        let sum = checksum::combine(&[
            checksum::pseudo_header_v4(&src, &dst, 6, tcp_len as u32),
            checksum::sum(&p[20..]),
        ]);
        p[36..38].copy_from_slice(&(!sum).to_be_bytes());
        (p, tcp_len)
    }

    fn tcp_ok(p: &[u8], tcp_len: usize) -> bool {
        let src = Ipv4Addr::new(10, 1, 0, 5);
        let dst = Ipv4Addr::new(10, 2, 0, 9);
        checksum::combine(&[
            checksum::pseudo_header_v4(&src, &dst, 6, tcp_len as u32),
            checksum::sum(&p[20..]),
        ]) == 0xffff
    }

    #[test]
    fn mss_clamped_with_valid_checksum_at_even_and_odd_offsets() {
        for odd in [false, true] {
            let (mut p, tl) = syn(&[2, 4, 0x05, 0xb4, 4, 2], odd);
            assert!(tcp_ok(&p, tl));
            assert!(clamp_mss(&mut p, 20, 1360));
            let at = 20 + 20 + usize::from(odd);
            assert_eq!(u16::from_be_bytes([p[at + 2], p[at + 3]]), 1360);
            assert!(
                tcp_ok(&p, tl),
                "checksum after clamping (odd offset: {odd})"
            );
        }
    }

    #[test]
    fn mss_left_alone_when_small_absent_or_not_syn() {
        let (mut p, _) = syn(&[2, 4, 0x04, 0x00], false);
        let before = p.clone();
        assert!(!clamp_mss(&mut p, 20, 1360));
        assert_eq!(p, before);
        let (mut p, _) = syn(&[4, 2], false);
        assert!(!clamp_mss(&mut p, 20, 1360));
        let (mut p, _) = syn(&[2, 4, 0x05, 0xb4], false);
        p[33] = 0x10; // ACK only
        assert!(!clamp_mss(&mut p, 20, 1360));
        // Garbage option lengths do not loop or panic.
        let (mut p, _) = syn(&[2, 0, 0, 0], false);
        assert!(!clamp_mss(&mut p, 20, 1360));
        let (mut p, _) = syn(&[9, 200, 0, 0], false);
        assert!(!clamp_mss(&mut p, 20, 1360));
        assert!(!clamp_mss(&mut [0u8; 10], 20, 1360));
    }
}
