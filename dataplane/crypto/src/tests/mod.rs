//! Tests: published known-answer vectors, round trips, tampering, key errors, `Debug` hygiene.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod kat_cbc;
mod kat_gcm;
mod roundtrip;
mod timing;

use crate::{CryptoProvider, SaCrypto, SaKeys, SoftwareProvider, Transform};

/// Hex with whitespace allowed (as the RFCs print it).
pub(crate) fn h(s: &str) -> Vec<u8> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(compact).expect("valid hex in test vector")
}

/// Deterministic, distinct key material for a transform.
pub(crate) fn keys_for(t: Transform, tweak: u8) -> SaKeys {
    let enc: Vec<u8> = (0..t.enc_key_len())
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(0x31 ^ tweak))
        .collect();
    let integ: Vec<u8> = (0..t.integ_key_len())
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(0x5c ^ tweak))
        .collect();
    SaKeys::new(&enc, &integ)
}

pub(crate) fn sa(t: Transform, esn: bool) -> Box<dyn SaCrypto> {
    SoftwareProvider
        .new_sa(t, &keys_for(t, 0), esn)
        .expect("valid keys")
}

/// A plaintext ESP packet as the ESP code lays it out: header, IV space (zero), payload,
/// RFC 4303 padding 1, 2, 3, ..., pad length, next header (4 = IPv4), ICV space (zero).
/// Returns the packet and the expected plaintext body (payload + trailer).
pub(crate) fn plain_packet(
    t: Transform,
    payload_len: usize,
    spi: u32,
    seq: u64,
) -> (Vec<u8>, Vec<u8>) {
    let align = t.block_align();
    let pad = (align - (payload_len + 2) % align) % align;
    let mut body: Vec<u8> = (0..payload_len).map(|i| (i * 31 + 7) as u8).collect();
    body.extend((1..=pad).map(|i| i as u8));
    body.push(pad as u8);
    body.push(4);
    let mut p = Vec::with_capacity(t.overhead() + body.len());
    p.extend_from_slice(&spi.to_be_bytes());
    p.extend_from_slice(&(seq as u32).to_be_bytes());
    p.resize(8 + t.iv_len(), 0);
    p.extend_from_slice(&body);
    p.resize(p.len() + t.icv_len(), 0);
    (p, body)
}

/// The region between IV and ICV.
pub(crate) fn body_of(t: Transform, p: &[u8]) -> &[u8] {
    &p[8 + t.iv_len()..p.len() - t.icv_len()]
}
