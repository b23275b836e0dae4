//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! [`sum`] and [`combine`] return the one's-complement *sum*, not inverted; the
//! checksum written into a header is `!sum`. A buffer whose checksum field is
//! correct sums to `0xFFFF`.

use core::net::{Ipv4Addr, Ipv6Addr};

/// Folds a 64-bit accumulator of 16-bit words down to a 16-bit
/// one's-complement sum (end-around carry).
#[inline]
fn fold(acc: u64) -> u16 {
    let s = (acc & 0xffff_ffff) + (acc >> 32); // < 2^33
    let s = (s & 0xffff_ffff) + (s >> 32); // <= 2^32
    let s = (s & 0xffff) + (s >> 16); // <= 0x1fffe
    let s = (s & 0xffff) + (s >> 16); // <= 0xffff
    s as u16
}

/// Adds `w` to `acc` with end-around carry.
#[inline]
fn add_carry(acc: u64, w: u64) -> u64 {
    let (s, carry) = acc.overflowing_add(w);
    // When the add overflowed, `s <= u64::MAX - 1`, so this cannot overflow.
    s + u64::from(carry)
}

/// One's-complement sum of `data` taken as big-endian 16-bit words
/// (RFC 1071 §1), not inverted. An odd final byte is padded with a zero byte.
///
/// Runs over 8-byte words in native byte order and swaps at the end, which is
/// valid because the one's-complement sum is byte-order independent
/// (RFC 1071 §2(B)).
pub fn sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc = add_carry(acc, w);
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc = add_carry(acc, u64::from(u16::from_ne_bytes([p[0], p[1]])));
    }
    if let [last] = pairs.remainder() {
        acc = add_carry(acc, u64::from(u16::from_ne_bytes([*last, 0])));
    }
    // `fold(acc)` is the sum of native-order words; its bytes, read
    // big-endian, are the sum of big-endian words.
    u16::from_be_bytes(fold(acc).to_ne_bytes())
}

/// One's-complement sum of several partial sums (each from [`sum`] or a
/// pseudo-header function), not inverted.
pub fn combine(sums: &[u16]) -> u16 {
    let mut acc: u64 = 0;
    for &s in sums {
        acc += u64::from(s);
    }
    fold(acc)
}

/// Sum of the IPv4 pseudo-header (RFC 768; RFC 793 §3.1): source, destination,
/// zero + protocol, and the upper-layer length. Not inverted.
pub fn pseudo_header_v4(src: &Ipv4Addr, dst: &Ipv4Addr, protocol: u8, length: u32) -> u16 {
    let s = src.octets();
    let d = dst.octets();
    let acc = u64::from(u16::from_be_bytes([s[0], s[1]]))
        + u64::from(u16::from_be_bytes([s[2], s[3]]))
        + u64::from(u16::from_be_bytes([d[0], d[1]]))
        + u64::from(u16::from_be_bytes([d[2], d[3]]))
        + u64::from(protocol)
        + u64::from(length >> 16)
        + u64::from(length & 0xffff);
    fold(acc)
}

/// Sum of the IPv6 pseudo-header (RFC 8200 §8.1): source, destination, the
/// 32-bit upper-layer length, and three zero bytes + next header. Not inverted.
pub fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, next_header: u8, length: u32) -> u16 {
    let mut acc: u64 = 0;
    for seg in src.segments().iter().chain(dst.segments().iter()) {
        acc += u64::from(*seg);
    }
    acc += u64::from(length >> 16) + u64::from(length & 0xffff) + u64::from(next_header);
    fold(acc)
}

/// Incrementally updates a header checksum field after one 16-bit word of the
/// header changes from `old` to `new`: RFC 1624 eqn. 3,
/// `HC' = ~(~HC + ~m + m')`. Returns the new checksum field value.
#[inline]
pub fn update16(checksum: u16, old: u16, new: u16) -> u16 {
    // Three 16-bit terms: two folds absorb every carry.
    let s = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    let s = (s & 0xFFFF) + (s >> 16);
    let s = (s & 0xFFFF) + (s >> 16);
    !(s as u16)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Straightforward byte-pair reference implementation.
    fn naive(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]) << 8;
            let lo = data.get(i + 1).map_or(0, |&b| u32::from(b));
            acc += hi | lo;
            while acc > 0xffff {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            i += 2;
        }
        acc as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 numerical example.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(!sum(&data), 0x220d);
        // Odd length: trailing byte is the high byte of a zero-padded word.
        assert_eq!(sum(&[0x12]), 0x1200);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
        assert_eq!(sum(&[]), 0);
    }

    #[test]
    fn classic_ipv4_header_sums_to_ffff() {
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(sum(&hdr), 0xffff);
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(!sum(&zeroed), 0xb861);
    }

    #[test]
    fn carries_across_many_words() {
        // 0xffff words must not lose carries in the 64-bit accumulator.
        let data = [0xffu8; 1500];
        assert_eq!(sum(&data), naive(&data));
        assert_eq!(sum(&data), 0xffff);
        let data = [0xfe; 4097];
        assert_eq!(sum(&data), naive(&data));
    }

    #[test]
    fn every_length_and_alignment() {
        let mut buf = [0u8; 2008];
        let mut x: u32 = 0x1234_5678;
        for b in buf.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *b = (x >> 16) as u8;
        }
        for start in 0..8 {
            for len in 0..2000 {
                let d = &buf[start..start + len];
                assert_eq!(sum(d), naive(d), "start {start} len {len}");
            }
        }
    }

    #[test]
    fn combine_is_sum_of_parts() {
        let data: [u8; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        // Splitting at an even offset keeps word boundaries.
        assert_eq!(combine(&[sum(&data[..4]), sum(&data[4..])]), sum(&data));
        assert_eq!(combine(&[0xffff, 0x0001]), 0x0001);
        assert_eq!(combine(&[0x8000, 0x8000]), 0x0001);
        assert_eq!(combine(&[]), 0);
    }

    #[test]
    fn pseudo_headers_match_explicit_layout() {
        let s4 = Ipv4Addr::new(192, 168, 0, 1);
        let d4 = Ipv4Addr::new(10, 1, 2, 254);
        let mut ph = [0u8; 12];
        ph[..4].copy_from_slice(&s4.octets());
        ph[4..8].copy_from_slice(&d4.octets());
        ph[9] = 17;
        ph[10..12].copy_from_slice(&1234u16.to_be_bytes());
        assert_eq!(pseudo_header_v4(&s4, &d4, 17, 1234), sum(&ph));

        let s6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let d6: Ipv6Addr = "fe80::abcd:ef01:2345:6789".parse().unwrap();
        let mut ph = [0u8; 40];
        ph[..16].copy_from_slice(&s6.octets());
        ph[16..32].copy_from_slice(&d6.octets());
        ph[32..36].copy_from_slice(&70_000u32.to_be_bytes());
        ph[39] = 58;
        assert_eq!(pseudo_header_v6(&s6, &d6, 58, 70_000), sum(&ph));
    }

    #[test]
    fn update16_matches_rfc1624_example() {
        // RFC 1624 §4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
        assert_eq!(update16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    proptest! {
        #[test]
        fn fast_sum_matches_naive(data in proptest::collection::vec(any::<u8>(), 0..2000),
                                  start in 0usize..8) {
            let start = start.min(data.len());
            let d = &data[start..];
            prop_assert_eq!(sum(d), naive(d));
        }

        #[test]
        fn update16_matches_recompute(mut words in proptest::collection::vec(any::<u16>(), 2..40),
                                      idx in any::<prop::sample::Index>(), new in any::<u16>()) {
            // words[0] is the checksum field.
            words[0] = 0;
            // Keep one word non-zero so the sum is never the all-zero edge case.
            words[1] |= 1;
            let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
            words[0] = !sum(&bytes(&words));
            let i = 1 + idx.index(words.len() - 1);
            let old = words[i];
            words[i] = new;
            if i == 1 { words[1] |= 1; }
            let incr = update16(words[0], old, words[i]);
            words[0] = 0;
            let full = !sum(&bytes(&words));
            prop_assert_eq!(incr, full);
        }
    }
}
