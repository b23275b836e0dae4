//! Encapsulating Security Payload (RFC 4303 §2): the cleartext header and the
//! trailer found after decryption.
//!
//! ```text
//!  0                   1                   2                   3
//! +---------------------------------------------------------------+
//! |               Security Parameters Index (SPI)                 |
//! |                      Sequence Number                          |
//! |        Payload Data* (IV, then ciphertext) ...                |
//! |        ... Padding (0-255 bytes) | Pad Length | Next Header   |
//! |        Integrity Check Value (variable)                       |
//! +---------------------------------------------------------------+
//! ```

use crate::{Error, Result, read_u32, write_u32};

/// Length of the ESP header (SPI and sequence number).
pub const HEADER_LEN: usize = 8;

/// Next-header value of a dummy packet (RFC 4303 §2.6): the receiver drops it.
pub const NEXT_HEADER_NO_NEXT: u8 = 59;

/// Largest pad length the one-byte Pad Length field can carry.
pub const MAX_PAD_LEN: usize = 255;

/// Length of the Pad Length and Next Header fields together.
pub const TRAILER_FIXED_LEN: usize = 2;

mod field {
    use core::ops::Range;

    pub const SPI: Range<usize> = 0..4;
    pub const SEQUENCE_NUMBER: Range<usize> = 4..8;
}

/// A view of an ESP packet (RFC 4303 §2): the 8-byte header, then everything
/// else (IV, ciphertext, ICV) as the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EspPacket<T> {
    /// Wraps a buffer without checking it; getters may panic if it is short.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        EspPacket { buffer }
    }

    /// Wraps a buffer after [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks that the buffer holds the 8-byte header, else
    /// [`Error::Truncated`].
    ///
    /// After this succeeds, no getter panics.
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// Consumes the view, returning the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Security Parameters Index (RFC 4303 §2.1).
    #[inline]
    pub fn spi(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::SPI])
    }

    /// Sequence number: the low 32 bits when extended sequence numbers are in
    /// use (RFC 4303 §2.2).
    #[inline]
    pub fn sequence_number(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::SEQUENCE_NUMBER])
    }

    /// Everything after the 8-byte header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EspPacket<T> {
    /// Sets the SPI.
    #[inline]
    pub fn set_spi(&mut self, spi: u32) {
        write_u32(&mut self.buffer.as_mut()[field::SPI], spi);
    }

    /// Sets the sequence number.
    #[inline]
    pub fn set_sequence_number(&mut self, seq: u32) {
        write_u32(&mut self.buffer.as_mut()[field::SEQUENCE_NUMBER], seq);
    }

    /// Everything after the 8-byte header, mutably.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for EspPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The smallest pad length such that `payload_len + pad + 2` is a multiple of
/// `align` (RFC 4303 §2.4).
///
/// `align` is the cipher's block size or 4, whichever is larger, and a power
/// of two: 16 for AES-CBC, 8 for 3DES-CBC, 4 for AES-GCM and NULL. The result
/// is below `align`, so at most 255 for any `align` up to 256.
#[inline]
pub fn pad_len(payload_len: usize, align: usize) -> usize {
    debug_assert!(align.is_power_of_two() && align >= 4);
    if align.is_power_of_two() {
        // A mask, not a division: this runs for every packet sent.
        let m = align - 1;
        (align - ((payload_len + TRAILER_FIXED_LEN) & m)) & m
    } else {
        let align = align.max(1);
        (align - (payload_len + TRAILER_FIXED_LEN) % align) % align
    }
}

/// Writes the trailer into `buf[..pad_len + 2]`: the default padding
/// 1, 2, 3, …, `pad_len` (RFC 4303 §2.4), then the Pad Length, then
/// `next_header`.
///
/// [`Error::Malformed`] if `pad_len` exceeds 255; [`Error::Truncated`] if
/// `buf` is shorter than `pad_len + 2`. Nothing is written on error.
#[inline]
pub fn write_trailer(buf: &mut [u8], pad_len: usize, next_header: u8) -> Result<()> {
    if pad_len > MAX_PAD_LEN {
        return Err(Error::Malformed);
    }
    let t = buf
        .get_mut(..pad_len + TRAILER_FIXED_LEN)
        .ok_or(Error::Truncated)?;
    let (padding, fixed) = t.split_at_mut(pad_len);
    padding.copy_from_slice(&PAD_PATTERN[..pad_len]);
    fixed[0] = pad_len as u8;
    fixed[1] = next_header;
    Ok(())
}

/// The default padding bytes 1, 2, 3, …, 255 (RFC 4303 §2.4), copied rather than counted.
/// For `n` ≤ 16: the 16 bytes that end with `n` bytes of padding (1, 2, …, n), big-endian,
/// zeros in front of the padding.
const PAD_TAILS: [u128; 17] = {
    let mut t = [0u128; 17];
    let mut n = 1;
    while n <= 16 {
        let mut i = 0;
        while i < n {
            t[n] |= ((i + 1) as u128) << (8 * (n - 1 - i));
            i += 1;
        }
        n += 1;
    }
    t
};

const PAD_PATTERN: [u8; MAX_PAD_LEN] = {
    let mut p = [0u8; MAX_PAD_LEN];
    let mut i = 0;
    while i < MAX_PAD_LEN {
        p[i] = (i + 1) as u8;
        i += 1;
    }
    p
};

/// A parsed ESP trailer; see [`parse_trailer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Length of the payload before the padding.
    pub payload_len: usize,
    /// Number of padding bytes.
    pub pad_len: usize,
    /// Next Header: the protocol of the payload (RFC 4303 §2.6).
    pub next_header: u8,
}

/// Parses the trailer of a decrypted `[payload][padding][pad length][next
/// header]` (ICV already removed).
///
/// [`Error::Truncated`] if `plain` has fewer than 2 bytes or the pad length
/// runs past its start; [`Error::BadPadding`] unless the padding bytes are
/// exactly 1, 2, 3, … (RFC 4303 §2.4 default padding, which is required on
/// receipt here).
///
/// Run this only after the ICV has been verified: with an integrity check in
/// place the padding result is no oracle. The padding comparison itself does
/// not exit early.
#[inline]
pub fn parse_trailer(plain: &[u8]) -> Result<Trailer> {
    let len = plain.len();
    let [.., pad, next_header] = *plain else {
        return Err(Error::Truncated);
    };
    let pad_len = usize::from(pad);
    let payload_len = len
        .checked_sub(pad_len + TRAILER_FIXED_LEN)
        .ok_or(Error::Truncated)?;
    let end = payload_len + pad_len;
    let ok = match plain.get(end.wrapping_sub(16)..end) {
        // Short padding (block ciphers, GCM padded to 16) with 16 bytes in front of its end:
        // one 16-byte compare under a mask.
        Some(last16) if pad_len <= 16 => {
            let mut w = [0u8; 16];
            w.copy_from_slice(last16);
            let keep = u128::MAX
                .checked_shr(8 * (16 - pad_len) as u32)
                .unwrap_or(0);
            (u128::from_be_bytes(w) ^ PAD_TAILS[pad_len]) & keep == 0
        }
        // Against the pattern, without an early exit (it vectorises).
        _ => {
            plain[payload_len..end]
                .iter()
                .zip(PAD_PATTERN.iter())
                .fold(0u8, |d, (b, p)| d | (b ^ p))
                == 0
        }
    };
    if !ok {
        return Err(Error::BadPadding);
    }
    Ok(Trailer {
        payload_len,
        pad_len,
        next_header,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// ESP header SPI 0x0000_1000, sequence 1, followed by a 16-byte IV and
    /// 16 bytes of ciphertext (AES-CBC) and a 12-byte ICV.
    fn esp_bytes() -> Vec<u8> {
        let mut v = vec![0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x01];
        v.extend(0u8..16); // IV
        v.extend([0xc3; 16]); // ciphertext
        v.extend([0x5a; 12]); // ICV
        v
    }

    #[test]
    fn parse_header() {
        let buf = esp_bytes();
        let p = EspPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(p.spi(), 0x1000);
        assert_eq!(p.sequence_number(), 1);
        assert_eq!(p.payload().len(), 44);
        assert_eq!(&p.payload()[..16], &(0u8..16).collect::<Vec<_>>()[..]);
        assert_eq!(
            EspPacket::new_checked(&buf[..7]).unwrap_err(),
            Error::Truncated
        );
        assert!(
            EspPacket::new_checked(&buf[..8])
                .unwrap()
                .payload()
                .is_empty()
        );
    }

    #[test]
    fn set_header() {
        let mut buf = [0u8; 12];
        let mut p = EspPacket::new_checked(&mut buf[..]).unwrap();
        p.set_spi(0xdead_beef);
        p.set_sequence_number(0x0102_0304);
        p.payload_mut().copy_from_slice(&[9, 8, 7, 6]);
        assert_eq!(p.spi(), 0xdead_beef);
        assert_eq!(p.sequence_number(), 0x0102_0304);
        assert_eq!(buf, [0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 9, 8, 7, 6]);
    }

    #[test]
    fn pad_len_values() {
        assert_eq!(pad_len(0, 4), 2);
        assert_eq!(pad_len(1, 4), 1);
        assert_eq!(pad_len(2, 4), 0);
        assert_eq!(pad_len(3, 4), 3);
        assert_eq!(pad_len(0, 16), 14);
        assert_eq!(pad_len(14, 16), 0);
        assert_eq!(pad_len(15, 16), 15);
        assert_eq!(pad_len(84, 16), 10); // 20-byte IPv4 header + 64-byte ICMP
        assert_eq!(pad_len(1400, 8), 6);
        for align in [4, 8, 16, 32, 64, 128, 256] {
            for n in 0..600 {
                let p = pad_len(n, align);
                assert!(p < align);
                assert_eq!((n + p + 2) % align, 0, "n {n} align {align}");
            }
        }
    }

    #[test]
    fn trailer_known_bytes() {
        // A 5-byte payload, AES-CBC alignment: 9 bytes of padding, next header 4.
        let mut buf = [0u8; 16];
        buf[..5].copy_from_slice(b"hello");
        let pad = pad_len(5, 16);
        assert_eq!(pad, 9);
        write_trailer(&mut buf[5..], pad, 4).unwrap();
        assert_eq!(
            buf,
            [
                b'h', b'e', b'l', b'l', b'o', 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 4
            ]
        );
        assert_eq!(
            parse_trailer(&buf),
            Ok(Trailer {
                payload_len: 5,
                pad_len: 9,
                next_header: 4
            })
        );
        // Zero padding, dummy packet.
        assert_eq!(
            parse_trailer(&[0, 59]),
            Ok(Trailer {
                payload_len: 0,
                pad_len: 0,
                next_header: NEXT_HEADER_NO_NEXT
            })
        );
    }

    #[test]
    fn every_pad_length_round_trips() {
        for pad in 0..=255usize {
            let payload_len = 3;
            let mut buf = vec![0xeeu8; payload_len + pad + 2];
            write_trailer(&mut buf[payload_len..], pad, 41).unwrap();
            assert_eq!(&buf[..payload_len], &[0xee; 3]);
            let t = parse_trailer(&buf).unwrap();
            assert_eq!(
                t,
                Trailer {
                    payload_len,
                    pad_len: pad,
                    next_header: 41
                }
            );
        }
    }

    #[test]
    fn one_wrong_pad_byte_is_bad_padding() {
        for pad in 1..=255usize {
            let mut buf = vec![0u8; pad + 2];
            write_trailer(&mut buf, pad, 6).unwrap();
            for pos in 0..pad {
                let mut bad = buf.clone();
                bad[pos] = bad[pos].wrapping_add(1);
                assert_eq!(
                    parse_trailer(&bad),
                    Err(Error::BadPadding),
                    "pad {pad} pos {pos}"
                );
                bad[pos] = 0;
                assert_eq!(
                    parse_trailer(&bad),
                    Err(Error::BadPadding),
                    "pad {pad} pos {pos}"
                );
            }
        }
    }

    #[test]
    fn trailer_errors() {
        assert_eq!(parse_trailer(&[]), Err(Error::Truncated));
        assert_eq!(parse_trailer(&[4]), Err(Error::Truncated));
        // pad_len + 2 > len.
        assert_eq!(parse_trailer(&[1, 2, 3, 4]), Err(Error::Truncated));
        assert_eq!(parse_trailer(&[1, 2, 3, 3, 4]).unwrap().payload_len, 0);
        assert_eq!(parse_trailer(&[1, 255, 4]), Err(Error::Truncated));
        let mut buf = [0u8; 10];
        assert_eq!(write_trailer(&mut buf, 9, 4), Err(Error::Truncated));
        assert_eq!(write_trailer(&mut buf, 256, 4), Err(Error::Malformed));
        assert_eq!(buf, [0; 10]);
        assert_eq!(write_trailer(&mut buf, 8, 4), Ok(()));
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 8, 4]);
    }

    proptest! {
        #[test]
        fn checked_getters_never_panic(data in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(p) = EspPacket::new_checked(&data[..]) {
                let _ = (p.spi(), p.sequence_number());
                prop_assert_eq!(p.payload().len() + HEADER_LEN, data.len());
            }
        }

        /// Every padding length and position of a wrong byte, with and without payload bytes
        /// in front (short padding with 16 bytes before its end takes a masked compare).
        #[test]
        fn padding_check_matches_a_byte_by_byte_reference(
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            pad in 0usize..=40,
            flip in proptest::option::of((0usize..40, 1u8..=255)),
        ) {
            let mut buf = payload.clone();
            buf.resize(payload.len() + pad + 2, 0);
            write_trailer(&mut buf[payload.len()..], pad, 4).unwrap();
            if let Some((pos, x)) = flip {
                let at = pos % (buf.len());
                buf[at] ^= x;
            }
            let pad_len = usize::from(buf[buf.len() - 2]);
            let reference = match buf.len().checked_sub(pad_len + 2) {
                None => Err(Error::Truncated),
                Some(start) => {
                    if (0..pad_len).all(|i| buf[start + i] == (i + 1) as u8) {
                        Ok((start, pad_len, buf[buf.len() - 1]))
                    } else {
                        Err(Error::BadPadding)
                    }
                }
            };
            let got = parse_trailer(&buf).map(|t| (t.payload_len, t.pad_len, t.next_header));
            prop_assert_eq!(got, reference);
        }

        #[test]
        fn parse_trailer_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(t) = parse_trailer(&data) {
                prop_assert_eq!(t.payload_len + t.pad_len + 2, data.len());
            }
        }

        #[test]
        fn pad_write_parse_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                      align_log in 2u32..9, nh in any::<u8>(),
                                      spi in any::<u32>(), seq in any::<u32>()) {
            let align = 1usize << align_log;
            let pad = pad_len(payload.len(), align);
            let mut buf = vec![0u8; HEADER_LEN + payload.len() + pad + 2];
            let mut p = EspPacket::new_checked(&mut buf[..]).unwrap();
            p.set_spi(spi);
            p.set_sequence_number(seq);
            let body = p.payload_mut();
            body[..payload.len()].copy_from_slice(&payload);
            write_trailer(&mut body[payload.len()..], pad, nh).unwrap();
            prop_assert_eq!(body.len() % align, 0);
            let p = EspPacket::new_checked(&buf[..]).unwrap();
            prop_assert_eq!((p.spi(), p.sequence_number()), (spi, seq));
            let t = parse_trailer(p.payload()).unwrap();
            prop_assert_eq!(t, Trailer { payload_len: payload.len(), pad_len: pad, next_header: nh });
            prop_assert_eq!(&p.payload()[..t.payload_len], &payload[..]);
        }
    }
}
