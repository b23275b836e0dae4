//! UDP encapsulation of ESP for NAT traversal (RFC 3948).
//!
//! On UDP port 4500 one socket carries three kinds of payload: ESP (whose
//! SPI is never zero), IKE messages behind a four-byte zero "non-ESP marker",
//! and one-byte NAT-keepalives.

use crate::{Error, Result, esp};

/// UDP port for UDP-encapsulated ESP and IKE after NAT detection (RFC 3948 §1).
pub const NATT_PORT: u16 = 4500;
/// UDP port for IKE (RFC 7296 §2).
pub const IKE_PORT: u16 = 500;
/// Length of the non-ESP marker: four zero bytes where an SPI would be
/// (RFC 3948 §2.2).
pub const NON_ESP_MARKER_LEN: usize = 4;
/// The single byte of a NAT-keepalive packet (RFC 3948 §2.3).
pub const KEEPALIVE_BYTE: u8 = 0xff;

/// What a UDP payload on the NAT-T port carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpEncapPayload {
    /// A NAT-keepalive (RFC 3948 §2.3): the single byte 0xFF. Drop it.
    Keepalive,
    /// A non-ESP packet: an IKE message after the 4-byte zero marker
    /// (RFC 3948 §2.2). The IKE message starts at [`NON_ESP_MARKER_LEN`].
    NonEsp,
    /// An ESP packet (RFC 3948 §2.1) starting at offset 0: at least the
    /// 8-byte ESP header, with a non-zero SPI.
    Esp,
}

/// Classifies the payload of a UDP datagram received on the NAT-T port.
///
/// * exactly one byte 0xFF: [`UdpEncapPayload::Keepalive`];
/// * at least 4 bytes, the first four zero: [`UdpEncapPayload::NonEsp`];
/// * otherwise at least 8 bytes: [`UdpEncapPayload::Esp`].
///
/// Errors: a single byte other than 0xFF is [`Error::Malformed`] (it can be
/// nothing else); an empty payload, or 2 to 7 bytes not starting with the
/// marker, is [`Error::Truncated`] (too short for an ESP header).
pub fn classify(udp_payload: &[u8]) -> Result<UdpEncapPayload> {
    match udp_payload {
        [] => Err(Error::Truncated),
        [KEEPALIVE_BYTE] => Ok(UdpEncapPayload::Keepalive),
        [_] => Err(Error::Malformed),
        [0, 0, 0, 0, ..] => Ok(UdpEncapPayload::NonEsp),
        p if p.len() >= esp::HEADER_LEN => Ok(UdpEncapPayload::Esp),
        _ => Err(Error::Truncated),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keepalive() {
        assert_eq!(classify(&[0xff]), Ok(UdpEncapPayload::Keepalive));
        assert_eq!(classify(&[0x00]), Err(Error::Malformed));
        assert_eq!(classify(&[0xfe]), Err(Error::Malformed));
    }

    #[test]
    fn ike_after_marker() {
        // Marker, then the start of an IKE_SA_INIT request header (RFC 7296 §3.1):
        // initiator SPI, zero responder SPI, next payload SA (33), version 2.0,
        // exchange type 34, flags Initiator.
        let mut ike = vec![0u8, 0, 0, 0];
        ike.extend([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        ike.extend([0u8; 8]);
        ike.extend([33, 0x20, 34, 0x08, 0, 0, 0, 0, 0, 0, 0, 28]);
        assert_eq!(classify(&ike), Ok(UdpEncapPayload::NonEsp));
        assert_eq!(ike[NON_ESP_MARKER_LEN + 17], 0x20);
        // The marker alone is still non-ESP.
        assert_eq!(classify(&[0, 0, 0, 0]), Ok(UdpEncapPayload::NonEsp));
    }

    #[test]
    fn esp() {
        let esp = [0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x01, 0xaa, 0xbb];
        assert_eq!(classify(&esp), Ok(UdpEncapPayload::Esp));
        assert_eq!(classify(&esp[..8]), Ok(UdpEncapPayload::Esp));
        // An SPI whose first byte is 0xff is still ESP when long enough.
        assert_eq!(
            classify(&[0xff, 0, 0, 1, 0, 0, 0, 1]),
            Ok(UdpEncapPayload::Esp)
        );
    }

    #[test]
    fn short_payloads() {
        assert_eq!(classify(&[]), Err(Error::Truncated));
        for n in 2..8 {
            assert_eq!(classify(&[0x01; 8][..n]), Err(Error::Truncated), "{n}");
        }
        assert_eq!(classify(&[0xff, 0xff]), Err(Error::Truncated));
        assert_eq!(classify(&[0, 0, 0]), Err(Error::Truncated));
        assert_eq!(classify(&[0, 0, 0, 1, 0, 0, 0]), Err(Error::Truncated));
    }

    proptest! {
        #[test]
        fn classify_is_consistent(data in proptest::collection::vec(any::<u8>(), 0..20)) {
            match classify(&data) {
                Ok(UdpEncapPayload::Keepalive) => prop_assert_eq!(&data[..], &[0xff]),
                Ok(UdpEncapPayload::NonEsp) => prop_assert!(data.len() >= 4 && data[..4] == [0; 4]),
                Ok(UdpEncapPayload::Esp) => prop_assert!(data.len() >= 8 && data[..4] != [0; 4]),
                Err(Error::Malformed) => prop_assert!(data.len() == 1 && data[0] != 0xff),
                Err(e) => {
                    prop_assert_eq!(e, Error::Truncated);
                    prop_assert!(data.len() < 8 && data.len() != 1);
                }
            }
        }
    }
}
