//! Record encoding: round trips, truncation, corruption, and the errors' field names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use espgw_ring::record::{FieldProblem, MAX_ENCODED_LEN, MAX_REASON_LEN};
use espgw_ring::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip(rec in arb_record()) {
        let bytes = encode(&rec);
        prop_assert!(bytes.len() <= MAX_ENCODED_LEN);
        prop_assert_eq!(Record::decode(&bytes), Ok(rec));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every strict prefix fails to decode (the fields are read in order and the last one
    /// always has a fixed or prefixed length), and so does every extension.
    #[test]
    fn every_truncation_is_rejected(rec in arb_record(), extra in 1u8..) {
        let bytes = encode(&rec);
        for n in 0..bytes.len() {
            prop_assert!(Record::decode(&bytes[..n]).is_err(), "prefix of {} bytes decoded", n);
        }
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert_eq!(
            Record::decode(&longer),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
    }

    /// Every single-byte corruption either fails or decodes to a different valid record
    /// (no byte is ignored), and never panics.
    #[test]
    fn every_single_byte_corruption_is_seen(rec in arb_record(), masks in prop::collection::vec(1u8.., 512)) {
        let bytes = encode(&rec);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= masks[i];
            if let Ok(other) = Record::decode(&b) {
                prop_assert_ne!(&other, &rec, "corrupting byte {} went unnoticed", i);
                // A different valid record re-encodes to exactly the corrupted bytes.
                prop_assert_eq!(encode(&other), b);
            }
        }
    }

    /// Random bytes never panic the decoder.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = Record::decode(&bytes);
    }
}

/// Exhaustive: every value of every byte of one record of each kind.
#[test]
fn every_byte_value_of_every_kind() {
    let mut records: Vec<Record> = (0..8).map(to_dp_record).collect();
    records.extend((0..10).map(from_dp_record));
    records.push(Record::AddSa(Box::new(sa_for(4)))); // four selectors
    records.push(Record::AddSa(Box::new(sa_for(9)))); // IPv6, four selectors
    for rec in records {
        let bytes = encode(&rec);
        for i in 0..bytes.len() {
            for x in 1..=255u8 {
                let mut b = bytes.clone();
                b[i] ^= x;
                if let Ok(other) = Record::decode(&b) {
                    assert_ne!(other, rec, "{:?}: byte {i} ^ {x:#x}", rec.kind());
                }
            }
        }
    }
}

#[test]
fn every_kind_is_covered_by_the_samples() {
    let mut kinds: Vec<Kind> = (0..8)
        .map(to_dp_record)
        .chain((0..10).map(from_dp_record))
        .map(|r| r.kind())
        .collect();
    kinds.dedup();
    assert_eq!(kinds, Kind::ALL);
    for k in Kind::ALL {
        assert_eq!(Kind::from_wire(k.to_wire()), Some(*k));
    }
}

/// The longest possible encoding fits the bound the slot size is checked against.
#[test]
fn largest_record_fits() {
    let mut sa = sa_for(0);
    sa.enc_alg = EncAlg::Aes256Gcm16;
    sa.integ_alg = IntegAlg::None;
    sa.enc_key = Key::new(&[7; 32]).unwrap();
    sa.salt = Key::new(&[1; 4]).unwrap();
    sa.integ_key = Key::empty();
    sa.icv_len = 16;
    sa.name = "n".repeat(32);
    sa.local = v6(1);
    sa.remote = v6(2);
    sa.encap = Some(UdpEncap {
        local_port: 1,
        remote_port: 2,
    });
    let sel = Selector {
        src: IpPrefix {
            addr: v6(3),
            len: 128,
        },
        dst: IpPrefix {
            addr: v6(4),
            len: 0,
        },
        protocol: 6,
        src_ports: PortRange::ANY,
        dst_ports: PortRange::ANY,
    };
    sa.selectors = vec![sel; 4];
    let bytes = encode(&Record::AddSa(Box::new(sa.clone())));
    // The bound assumes 64-byte encryption and integrity keys and an 8-byte salt, which no
    // algorithm has: exactly that much slack.
    assert_eq!(bytes.len() + (64 - 32) + (8 - 4) + 64, MAX_ENCODED_LEN);
    const { assert!(24 + MAX_ENCODED_LEN <= 512) };

    // AES-CBC with HMAC-SHA2-512: the largest real key material.
    sa.enc_alg = EncAlg::Aes256Cbc;
    sa.integ_alg = IntegAlg::HmacSha2_512_256;
    sa.salt = Key::empty();
    sa.integ_key = Key::new(&[9; 64]).unwrap();
    sa.icv_len = 32;
    let bytes = encode(&Record::AddSa(Box::new(sa)));
    assert!(bytes.len() <= MAX_ENCODED_LEN);
}

fn decode_err(bytes: &[u8]) -> DecodeError {
    Record::decode(bytes).unwrap_err()
}

fn invalid(field: &'static str, problem: &str) -> DecodeError {
    DecodeError::Invalid(FieldProblem {
        field,
        problem: problem.to_string(),
    })
}

/// Offset of a field in the encoding of `sa_for(1)` (IPv4, ESP-in-UDP, aes128gcm12).
fn add_sa_bytes() -> (SaSpec, Vec<u8>) {
    let sa = sa_for(1);
    let bytes = encode(&Record::AddSa(Box::new(sa.clone())));
    (sa, bytes)
}

#[test]
fn errors_name_the_field() {
    let (sa, bytes) = add_sa_bytes();
    assert_eq!(sa.enc_alg, EncAlg::Aes128Gcm12);
    // kind(2) generation(8) spi(4) direction(1) mode(1) reqid(4) name(1+4 "sa-1")
    let direction = 2 + 8 + 4;
    let mut b = bytes.clone();
    b[direction] = 7;
    let e = decode_err(&b);
    assert_eq!(e.field(), Some("direction"));
    assert_eq!(
        e.to_string(),
        "`direction`: 7 is not a valid direction (1 = in, 2 = out)"
    );

    let mut b = bytes.clone();
    b[0] = 0x77;
    assert_eq!(decode_err(&b).to_string(), "unknown record kind 0x0077");

    // The name's length byte claims more than MAX_NAME_LEN.
    let name = direction + 1 + 1 + 4;
    let mut b = bytes.clone();
    b[name] = 40;
    assert_eq!(
        decode_err(&b),
        DecodeError::TooLong {
            field: "name",
            len: 40,
            max: 32
        }
    );
    // Invalid UTF-8 in the name.
    let mut b = bytes.clone();
    b[name + 1] = 0xff;
    assert_eq!(decode_err(&b), DecodeError::NotUtf8 { field: "name" });

    // Local address family.
    let local = name + 1 + 4;
    let mut b = bytes.clone();
    b[local] = 5;
    let e = decode_err(&b);
    assert_eq!(e.field(), Some("local"));
    assert!(e.to_string().contains("address family"), "{e}");

    // Truncation names the field it ends in.
    assert_eq!(
        decode_err(&bytes[..direction + 3]),
        DecodeError::Truncated { field: "reqid" }
    );
    assert_eq!(
        decode_err(&bytes[..bytes.len() - 1]),
        DecodeError::Truncated { field: "outer_ttl" }
    );
}

#[test]
fn semantic_checks_on_both_sides() {
    let (_, bytes) = add_sa_bytes();
    // Wrong key length for the algorithm: change the algorithm byte to AES-256-GCM-12.
    // enc_alg follows: remote(1+4) encap(1+2+2)
    let local = 2 + 8 + 4 + 1 + 1 + 4 + 1 + 4;
    let enc_alg = local + 5 + 5 + 5;
    let mut b = bytes.clone();
    assert_eq!(b[enc_alg], 2);
    b[enc_alg] = 5;
    assert_eq!(
        decode_err(&b),
        invalid("enc_key", "16 bytes, aes256gcm12 needs 32")
    );

    let mut sa = sa_for(1);
    sa.icv_len = 16;
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`icv_len`: 16 bytes, aes128gcm12/none produces 12"
    );

    let mut sa = sa_for(1);
    sa.integ_alg = IntegAlg::HmacSha1_96;
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`integ_alg`: aes128gcm12 is combined mode and takes integ_alg none, not hmac-sha1-96"
    );

    let mut sa = sa_for(6); // aes128-cbc
    assert_eq!(sa.enc_alg, EncAlg::Aes128Cbc);
    sa.integ_alg = IntegAlg::None;
    sa.integ_key = Key::empty();
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`integ_alg`: aes128-cbc needs an integrity algorithm"
    );

    let mut sa = sa_for(1);
    sa.spi = 255;
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`spi`: SPI 255 is reserved (0…255, RFC 4303 §2.1)"
    );

    let mut sa = sa_for(1);
    sa.remote = v6(1);
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`remote`: IPv6 address with an IPv4 local address"
    );

    let mut sa = sa_for(1);
    sa.selectors = vec![sa_for(4).selectors[0]; 5];
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(e.to_string(), "`selectors`: 5 selectors, at most 4 allowed");

    let mut sa = sa_for(4);
    sa.selectors[1].dst.addr = v6(9);
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`selector.dst`: IPv6 destination with an IPv4 source"
    );

    let mut sa = sa_for(4);
    sa.selectors[0].src.len = 33;
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`selector.src_len`: prefix length 33 exceeds 32"
    );

    let mut sa = sa_for(1);
    sa.name = String::new();
    let e = Record::AddSa(Box::new(sa))
        .encode(&mut [0u8; 512])
        .unwrap_err();
    assert_eq!(e.to_string(), "`name`: must not be empty");

    let mut sa = sa_for(1);
    sa.outer_ttl = 0;
    assert!(Record::AddSa(Box::new(sa)).encode(&mut [0u8; 512]).is_err());

    let mut sa = sa_for(1);
    sa.dscp = DscpMode::Set(64);
    assert!(Record::AddSa(Box::new(sa)).encode(&mut [0u8; 512]).is_err());

    // A buffer too small names the first field that did not fit.
    let e = Record::Applied { seq: 1 }
        .encode(&mut [0u8; 5])
        .unwrap_err();
    assert_eq!(
        e,
        EncodeError::BufferTooSmall {
            field: "seq",
            have: 5
        }
    );
}

#[test]
fn rejected_reason_is_shortened_at_a_char_boundary() {
    let long = "€".repeat(100);
    let Record::Rejected { reason, .. } = Record::rejected(3, &long) else {
        unreachable!()
    };
    assert!(reason.len() <= MAX_REASON_LEN);
    assert!(reason.ends_with('…'));
    let r = Record::rejected(3, &long);
    assert_eq!(Record::decode(&encode(&r)), Ok(r));

    let too_long = Record::Rejected {
        seq: 1,
        reason: "x".repeat(97),
    };
    assert!(too_long.encode(&mut [0u8; 512]).is_err());
}

#[test]
fn keys_are_redacted_in_debug_output() {
    let sa = sa_for(0);
    let text = format!("{sa:?}");
    assert!(text.contains("Key(<16 bytes>)"), "{text}");
    let key_hex = format!("{:?}", sa.enc_key.as_bytes());
    assert!(!text.contains(&key_hex[1..key_hex.len() - 1]));
}

#[test]
fn algorithm_tables() {
    for e in EncAlg::ALL {
        assert_eq!(e.is_aead(), e.aead_icv_len().is_some());
        assert_eq!(e.salt_len(), if e.is_aead() { 4 } else { 0 });
    }
    assert_eq!(EncAlg::Aes256Gcm8.name(), "aes256gcm8");
    assert_eq!(IntegAlg::HmacSha2_384_192.key_len(), 48);
    assert_eq!(IntegAlg::HmacSha2_384_192.icv_len(), 24);
    assert_eq!(Kind::AddSa.ring(), RingDir::ToDataPlane);
    assert_eq!(Kind::Applied.ring(), RingDir::FromDataPlane);
}
