//! Zero-copy views of the packet formats an ESP gateway parses and writes.
//!
//! Every packet type is a thin view over a byte buffer, `Foo<T: AsRef<[u8]>>`,
//! so the same type works over a UMEM frame, a `Vec<u8>` or a stack array.
//! Getters live in `impl<T: AsRef<[u8]>>`, setters in
//! `impl<T: AsRef<[u8]> + AsMut<[u8]>>`.
//!
//! # The length contract
//!
//! Each view has `new_unchecked` (no checks at all: getters may panic on a
//! short or inconsistent buffer) and `new_checked`, which calls `check_len`.
//! **Once `check_len` has succeeded, no getter of that view panics**, whatever
//! the bytes are. The contract covers the buffer as it was checked: a setter
//! that changes a length field (for example `set_total_len` or
//! `set_payload_len`) to a value the buffer cannot back voids it until
//! `check_len` is called again.
//!
//! Nothing here allocates, and the crate is `no_std` outside its tests.
//!
//! # Example
//!
//! ```
//! use espgw_wire::ipv4::Ipv4Packet;
//!
//! let bytes = [
//!     0x45, 0x00, 0x00, 0x14, 0x00, 0x00, 0x40, 0x00, 0x40, 0x32, 0x00, 0x00, 0xc0, 0xa8, 0x00,
//!     0x01, 0xc0, 0xa8, 0x00, 0xc7,
//! ];
//! let mut buf = bytes;
//! let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
//! ip.fill_checksum();
//! assert!(ip.verify_checksum());
//! assert_eq!(ip.next_header(), espgw_wire::ip::protocol::ESP);
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

use core::fmt;

pub mod checksum;
pub mod esp;
pub mod ethernet;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod natt;
pub mod udp;

/// Why a buffer could not be viewed as (or written as) a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer is shorter than the packet says it is, or than a header needs.
    Truncated,
    /// A field holds a value the format does not allow.
    Malformed,
    /// ESP padding bytes are not the default 1, 2, 3, … sequence (RFC 4303 §2.4).
    BadPadding,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated",
            Error::Malformed => "malformed",
            Error::BadPadding => "bad padding",
        })
    }
}

/// Same trait as `std::error::Error` (which re-exports it).
impl core::error::Error for Error {}

/// The result type of this crate.
pub type Result<T> = core::result::Result<T, Error>;

/// Reads a big-endian `u16` from the first two bytes of `b`.
#[inline]
pub(crate) fn read_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Reads a big-endian `u32` from the first four bytes of `b`.
#[inline]
pub(crate) fn read_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Writes `v` big-endian into the first two bytes of `b`.
#[inline]
pub(crate) fn write_u16(b: &mut [u8], v: u16) {
    b[..2].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` big-endian into the first four bytes of `b`.
#[inline]
pub(crate) fn write_u32(b: &mut [u8], v: u32) {
    b[..4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display() {
        assert_eq!(Error::Truncated.to_string(), "truncated");
        assert_eq!(Error::Malformed.to_string(), "malformed");
        assert_eq!(Error::BadPadding.to_string(), "bad padding");
        let e: &dyn std::error::Error = &Error::Malformed;
        assert_eq!(e.to_string(), "malformed");
    }

    #[test]
    fn byte_helpers() {
        let mut b = [0u8; 4];
        write_u32(&mut b, 0x0102_0304);
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(read_u32(&b), 0x0102_0304);
        write_u16(&mut b[2..], 0xabcd);
        assert_eq!(b, [1, 2, 0xab, 0xcd]);
        assert_eq!(read_u16(&b[2..]), 0xabcd);
    }
}
