//! Names, sizes, weaknesses, key errors and `Debug` hygiene.

use super::keys_for;
use crate::transform::all_transforms;
use crate::{
    AeadAlg, CipherAlg, CryptoProvider, EspOp, IntegAlg, KeyError, OpStatus, SaKeys,
    SoftwareProvider, Transform, WorkerCtx,
};

fn ca(cipher: CipherAlg, integ: IntegAlg) -> Transform {
    Transform::CipherAuth { cipher, integ }
}

#[test]
fn aead_names_follow_strongswan() {
    for (name, alg, icv_len) in [
        ("aes128gcm16", AeadAlg::Aes128Gcm, 16),
        ("aes128gcm12", AeadAlg::Aes128Gcm, 12),
        ("aes128gcm8", AeadAlg::Aes128Gcm, 8),
        ("aes256gcm16", AeadAlg::Aes256Gcm, 16),
        ("aes256gcm12", AeadAlg::Aes256Gcm, 12),
        ("aes256gcm8", AeadAlg::Aes256Gcm, 8),
    ] {
        let t = Transform::aead_from_name(name).unwrap();
        assert_eq!(t, Transform::Aead { alg, icv_len });
        assert_eq!(t.name(), name);
    }
    for bad in [
        "",
        "aes128gcm",
        "aes128gcm10",
        "aes192gcm16",
        "aes128gcm128",
        "AES128GCM16",
        "aes128-cbc",
        "aes128gcm16 ",
    ] {
        assert_eq!(Transform::aead_from_name(bad), None, "{bad:?}");
    }
}

#[test]
fn cipher_and_integ_names() {
    for (name, c) in [
        ("null", CipherAlg::Null),
        ("aes128-cbc", CipherAlg::Aes128Cbc),
        ("aes256-cbc", CipherAlg::Aes256Cbc),
        ("3des-cbc", CipherAlg::TripleDesCbc),
    ] {
        assert_eq!(CipherAlg::from_name(name), Some(c));
        assert_eq!(c.name(), name);
    }
    for (name, i) in [
        ("hmac-md5-96", IntegAlg::HmacMd5_96),
        ("hmac-sha1-96", IntegAlg::HmacSha1_96),
        ("hmac-sha2-256-128", IntegAlg::HmacSha256_128),
        ("hmac-sha2-384-192", IntegAlg::HmacSha384_192),
        ("hmac-sha2-512-256", IntegAlg::HmacSha512_256),
    ] {
        assert_eq!(IntegAlg::from_name(name), Some(i));
        assert_eq!(i.name(), name);
    }
    assert_eq!(CipherAlg::from_name("des-cbc"), None);
    assert_eq!(IntegAlg::from_name("hmac-sha256"), None);
    assert_eq!(
        ca(CipherAlg::Aes128Cbc, IntegAlg::HmacSha1_96).name(),
        "aes128-cbc/hmac-sha1-96"
    );
}

#[test]
fn every_name_parses_back() {
    for t in all_transforms() {
        assert_eq!(Transform::from_name(&t.name()), Some(t), "{t}");
        assert_eq!(t.to_string(), t.name());
    }
    assert_eq!(Transform::from_name("aes128-cbc/"), None);
    assert_eq!(Transform::from_name("aes128-cbc"), None);
}

#[test]
fn sizes_per_transform() {
    use AeadAlg::*;
    use CipherAlg::*;
    use IntegAlg::*;
    let g = |alg, icv_len| Transform::Aead { alg, icv_len };
    // (transform, enc key, integ key, iv, align, icv)
    let table = [
        (g(Aes128Gcm, 16), 20, 0, 8, 4, 16),
        (g(Aes128Gcm, 12), 20, 0, 8, 4, 12),
        (g(Aes256Gcm, 8), 36, 0, 8, 4, 8),
        (ca(Aes128Cbc, HmacSha1_96), 16, 20, 16, 16, 12),
        (ca(Aes256Cbc, HmacSha256_128), 32, 32, 16, 16, 16),
        (ca(TripleDesCbc, HmacMd5_96), 24, 16, 8, 8, 12),
        (ca(Null, HmacSha384_192), 0, 48, 0, 4, 24),
        (ca(Null, HmacSha512_256), 0, 64, 0, 4, 32),
    ];
    for (t, enc, integ, iv, align, icv) in table {
        assert_eq!(t.enc_key_len(), enc, "{t}");
        assert_eq!(t.integ_key_len(), integ, "{t}");
        assert_eq!(t.iv_len(), iv, "{t}");
        assert_eq!(t.block_align(), align, "{t}");
        assert_eq!(t.icv_len(), icv, "{t}");
        assert_eq!(t.overhead(), 8 + iv + icv, "{t}");
    }
}

#[test]
fn weaknesses() {
    use CipherAlg::*;
    use IntegAlg::*;
    assert_eq!(
        ca(TripleDesCbc, HmacSha1_96).weakness(),
        Some("3DES-CBC has a 64-bit block")
    );
    assert_eq!(
        ca(Aes128Cbc, HmacMd5_96).weakness(),
        Some("HMAC-MD5-96 is deprecated")
    );
    assert_eq!(
        ca(Null, HmacSha256_128).weakness(),
        Some("NULL encryption: traffic is not confidential")
    );
    assert_eq!(ca(Aes256Cbc, HmacSha512_256).weakness(), None);
    assert_eq!(
        Transform::aead_from_name("aes128gcm8").unwrap().weakness(),
        None
    );
}

#[test]
fn provider_supports_everything_valid() {
    let p = SoftwareProvider;
    assert_eq!(p.name(), "software");
    for t in all_transforms() {
        assert!(p.supports(t), "{t}");
    }
    let odd = Transform::Aead {
        alg: AeadAlg::Aes128Gcm,
        icv_len: 10,
    };
    assert!(!p.supports(odd));
    let err = p
        .new_sa(odd, &SaKeys::new(&[0; 20], &[]), false)
        .unwrap_err();
    assert!(matches!(err, KeyError::Unsupported { .. }));
    assert_eq!(
        err.to_string(),
        "transform aes128gcm10 is not supported by the software crypto provider"
    );
}

#[test]
fn wrong_key_lengths_are_explained() {
    let p = SoftwareProvider;
    // GCM without the salt: the classic mistake.
    let t = Transform::aead_from_name("aes128gcm16").unwrap();
    let err = p.new_sa(t, &SaKeys::new(&[1; 16], &[]), false).unwrap_err();
    assert!(matches!(
        err,
        KeyError::EncKeyLen {
            expected: 20,
            got: 16,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "wrong encryption key length for aes128gcm16: expected 20 bytes \
         (16-byte AES key followed by the 4-byte salt), got 16"
    );
    let t = Transform::aead_from_name("aes256gcm12").unwrap();
    let msg = p
        .new_sa(t, &SaKeys::new(&[1; 32], &[]), true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("expected 36 bytes") && msg.contains("4-byte salt") && msg.contains("got 32"),
        "{msg}"
    );
    // AEAD takes no integrity key.
    let msg = p
        .new_sa(t, &SaKeys::new(&[1; 36], &[2; 20]), true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "wrong integrity key length for aes256gcm12: expected 0 bytes \
         (AES-GCM has no separate integrity key), got 20"
    );
    // CBC: both keys checked.
    let t = ca(CipherAlg::Aes256Cbc, IntegAlg::HmacSha1_96);
    let err = p
        .new_sa(t, &SaKeys::new(&[1; 16], &[2; 20]), false)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "wrong encryption key length for aes256-cbc/hmac-sha1-96: expected 32 bytes, got 16"
    );
    let err = p
        .new_sa(t, &SaKeys::new(&[1; 32], &[2; 32]), false)
        .unwrap_err();
    assert!(matches!(
        err,
        KeyError::IntegKeyLen {
            expected: 20,
            got: 32,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "wrong integrity key length for aes256-cbc/hmac-sha1-96: expected 20 bytes, got 32"
    );
    // Every transform: one byte short and one byte long on each key.
    for t in all_transforms() {
        let good = keys_for(t, 0);
        assert!(p.new_sa(t, &good, false).is_ok(), "{t}");
        let mut long_enc = good.enc.to_vec();
        long_enc.push(0);
        let err = p
            .new_sa(t, &SaKeys::new(&long_enc, &good.integ), false)
            .unwrap_err();
        assert!(matches!(err, KeyError::EncKeyLen { .. }), "{t}");
        let mut long_integ = good.integ.to_vec();
        long_integ.push(0);
        let err = p
            .new_sa(t, &SaKeys::new(&good.enc, &long_integ), false)
            .unwrap_err();
        assert!(matches!(err, KeyError::IntegKeyLen { .. }), "{t}");
        if t.integ_key_len() > 0 {
            let short = &good.integ[..good.integ.len() - 1];
            let err = p
                .new_sa(t, &SaKeys::new(&good.enc, short), false)
                .unwrap_err();
            assert!(matches!(err, KeyError::IntegKeyLen { .. }), "{t}");
        }
    }
}

/// `Debug` of SAs, keys and the worker context never shows key bytes.
#[test]
fn debug_never_prints_key_bytes() {
    let mut ctx = WorkerCtx::from_seed([0x77; 32]);
    for t in all_transforms() {
        let keys = keys_for(t, 0x40);
        let sa = SoftwareProvider.new_sa(t, &keys, true).unwrap();
        // Use the SA once so that any lazily filled state would exist.
        let (mut p, _) = super::plain_packet(t, 40, 1, 1);
        let mut ops = [EspOp::new(&mut p, 1)];
        sa.seal(&mut ops, &mut ctx);
        assert_eq!(ops[0].status, OpStatus::Ok);
        for text in [
            format!("{sa:?}"),
            format!("{sa:#?}"),
            format!("{keys:?}"),
            format!("{keys:#?}"),
        ] {
            for key in [&keys.enc[..], &keys.integ[..]] {
                if key.is_empty() {
                    continue;
                }
                let lower = hex::encode(key);
                let upper = hex::encode_upper(key);
                // Any 4 consecutive key bytes, in hex or as a decimal list.
                for w in 0..key.len().saturating_sub(3) {
                    let l = &lower[2 * w..2 * w + 8];
                    let u = &upper[2 * w..2 * w + 8];
                    assert!(!text.contains(l) && !text.contains(u), "{t}: {text}");
                    let dec = format!("{}, {}, {}, {}", key[w], key[w + 1], key[w + 2], key[w + 3]);
                    assert!(!text.contains(&dec), "{t}: {text}");
                }
            }
        }
        assert!(format!("{sa:?}").contains(&t.name()));
    }
    let keys = SaKeys::new(&[0xab; 20], &[0xcd; 20]);
    assert_eq!(
        format!("{keys:?}"),
        "SaKeys { enc_len: 20, integ_len: 20, .. }"
    );
    assert_eq!(format!("{ctx:?}"), "WorkerCtx { .. }");
}

#[test]
fn esp_op_debug_is_short() {
    let mut buf = [0xaau8; 40];
    let op = EspOp::new(&mut buf, 5);
    assert_eq!(
        format!("{op:?}"),
        "EspOp { len: 40, seq: 5, status: Pending }"
    );
}

#[test]
fn provider_and_sa_are_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<SoftwareProvider>();
    check::<Box<dyn crate::SaCrypto>>();
    check::<Box<dyn CryptoProvider>>();
    fn send<T: Send>() {}
    send::<WorkerCtx>();
}

/// The key-holding RustCrypto types wipe themselves on drop with the features this crate
/// enables (`aes/zeroize`, `des/zeroize`, `{md-5,sha1,sha2}/zeroize`, `hmac/zeroize`). An HMAC
/// state is two hash cores plus a block buffer, all of which are covered here; the CTR and CBC
/// wrappers borrow the cipher and zeroize their counter/IV; `GHash` wraps a `Polyval` that
/// zeroizes itself (`ghash/zeroize`). ring's key is wiped by `RingKey`.
#[test]
fn key_state_types_zeroize_on_drop() {
    fn z<T: zeroize::ZeroizeOnDrop>() {}
    z::<aes::Aes128>();
    z::<aes::Aes256>();
    z::<aes::Aes128Enc>();
    z::<aes::Aes256Enc>();
    z::<des::TdesEde3>();
    z::<md5::block_api::Md5Core>();
    z::<sha1::block_api::Sha1Core>();
    z::<sha2::block_api::Sha256VarCore>();
    z::<sha2::block_api::Sha512VarCore>();
    z::<hmac::digest::block_api::Buffer<hmac::block_api::HmacCore<sha2::Sha512>>>();
}
