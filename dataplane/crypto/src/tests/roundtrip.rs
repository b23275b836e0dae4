//! Round trips through the public API, tampering, ESN, lengths, truncated-tag interop.

use proptest::prelude::*;

use super::{body_of, keys_for, plain_packet, sa};
use crate::gcm::GcmSa;
use crate::transform::all_transforms;
use crate::{
    AeadAlg, CipherAlg, CryptoProvider, EspOp, OpStatus, SoftwareProvider, Transform, WorkerCtx,
};

const SPI: u32 = 0xc0ffee01;

fn sizes() -> impl Iterator<Item = usize> {
    (0..=300).chain([1400])
}

/// Seals and opens every size in bursts of 32 ops; checks layout, IV rule, and the plaintext.
#[test]
fn round_trip_every_transform_esn_and_size() {
    let mut ctx = WorkerCtx::from_seed([7; 32]);
    for t in all_transforms() {
        for esn in [false, true] {
            let sa = sa(t, esn);
            assert_eq!(sa.transform(), t);
            assert_eq!(sa.esn(), esn);
            let sizes: Vec<usize> = sizes().collect();
            for chunk in sizes.chunks(32) {
                let mut pkts = Vec::new();
                let mut bodies = Vec::new();
                let mut seqs = Vec::new();
                for (i, &n) in chunk.iter().enumerate() {
                    // Exercise the high bits too (they only matter with ESN).
                    let seq = (3u64 << 32) + 1000 + (n as u64) * 7 + i as u64;
                    let seq = if esn { seq } else { seq & 0xffff_ffff };
                    let (p, b) = plain_packet(t, n, SPI, seq);
                    pkts.push(p);
                    bodies.push(b);
                    seqs.push(seq);
                }
                let hdrs: Vec<Vec<u8>> = pkts.iter().map(|p| p[..8].to_vec()).collect();
                {
                    let mut ops: Vec<EspOp<'_>> = pkts
                        .iter_mut()
                        .zip(&seqs)
                        .map(|(p, &s)| EspOp::new(p, s))
                        .collect();
                    sa.seal(&mut ops, &mut ctx);
                    for op in &ops {
                        assert_eq!(
                            op.status,
                            OpStatus::Ok,
                            "{t} esn={esn} len={}",
                            op.esp.len()
                        );
                    }
                }
                for ((p, hdr), (b, &s)) in pkts.iter().zip(&hdrs).zip(bodies.iter().zip(&seqs)) {
                    assert_eq!(&p[..8], &hdr[..], "{t}: header must not change");
                    assert_eq!(body_of(t, p).len(), b.len());
                    match t {
                        Transform::Aead { .. } => {
                            assert_eq!(&p[8..16], &s.to_be_bytes(), "{t}: GCM IV = seq");
                            assert_ne!(body_of(t, p), &b[..], "{t}: encrypted");
                        }
                        Transform::CipherAuth {
                            cipher: CipherAlg::Null,
                            ..
                        } => assert_eq!(body_of(t, p), &b[..], "{t}: NULL leaves plaintext"),
                        Transform::CipherAuth { .. } => {
                            assert_ne!(body_of(t, p), &b[..], "{t}: encrypted");
                        }
                    }
                }
                let mut ops: Vec<EspOp<'_>> = pkts
                    .iter_mut()
                    .zip(&seqs)
                    .map(|(p, &s)| EspOp::new(p, s))
                    .collect();
                sa.open(&mut ops, &mut ctx);
                for (op, b) in ops.iter().zip(&bodies) {
                    assert_eq!(op.status, OpStatus::Ok, "{t} esn={esn}");
                    assert_eq!(body_of(t, op.esp), &b[..], "{t} esn={esn}");
                }
            }
        }
    }
}

/// Every single-bit flip anywhere in the packet fails, in one batch with an intact packet
/// that still opens.
#[test]
fn any_flipped_bit_fails_and_only_that_op() {
    let mut ctx = WorkerCtx::from_seed([9; 32]);
    for t in all_transforms() {
        for esn in [false, true] {
            let sa = sa(t, esn);
            let seq = if esn { 0x0000_0005_0000_0011 } else { 0x11 };
            let (mut sealed, body) = plain_packet(t, 37, SPI, seq);
            {
                let mut ops = [EspOp::new(&mut sealed, seq)];
                sa.seal(&mut ops, &mut ctx);
                assert_eq!(ops[0].status, OpStatus::Ok);
            }
            let nbits = sealed.len() * 8;
            let good_at = nbits / 2;
            let mut pkts: Vec<Vec<u8>> = Vec::with_capacity(nbits + 1);
            for bit in 0..nbits {
                if bit == good_at {
                    pkts.push(sealed.clone());
                }
                let mut p = sealed.clone();
                p[bit / 8] ^= 1 << (bit % 8);
                pkts.push(p);
            }
            let mut ops: Vec<EspOp<'_>> = pkts.iter_mut().map(|p| EspOp::new(p, seq)).collect();
            sa.open(&mut ops, &mut ctx);
            for (i, op) in ops.iter().enumerate() {
                if i == good_at {
                    assert_eq!(op.status, OpStatus::Ok, "{t} esn={esn}");
                    assert_eq!(body_of(t, op.esp), &body[..]);
                } else {
                    assert_eq!(op.status, OpStatus::AuthFailed, "{t} esn={esn} op {i}");
                }
            }
        }
    }
}

#[test]
fn failed_verification_does_not_decrypt_on_verify_first_paths() {
    // CBC/NULL + HMAC and truncated GCM check the ICV before touching the ciphertext.
    let mut ctx = WorkerCtx::from_seed([3; 32]);
    for t in all_transforms() {
        if t.icv_len() == 16 && matches!(t, Transform::Aead { .. }) {
            continue; // ring decrypts and verifies in one pass, then zeroes the body.
        }
        let sa = sa(t, false);
        let (mut p, _) = plain_packet(t, 64, SPI, 1);
        sa.seal(&mut [EspOp::new(&mut p, 1)], &mut ctx);
        let last = p.len() - 1;
        p[last] ^= 0x80;
        let before = p.clone();
        let mut ops = [EspOp::new(&mut p, 1)];
        sa.open(&mut ops, &mut ctx);
        assert_eq!(ops[0].status, OpStatus::AuthFailed);
        assert_eq!(p, before, "{t}");
    }
}

#[test]
fn wrong_esn_high_bits_fail() {
    let mut ctx = WorkerCtx::from_seed([4; 32]);
    for t in all_transforms() {
        let sa = sa(t, true);
        let seq = (7u64 << 32) | 0xfffffff0;
        let (mut p, body) = plain_packet(t, 50, SPI, seq);
        sa.seal(&mut [EspOp::new(&mut p, seq)], &mut ctx);
        for wrong in [seq + (1 << 32), seq - (1 << 32), seq & 0xffff_ffff] {
            let mut q = p.clone();
            let mut ops = [EspOp::new(&mut q, wrong)];
            sa.open(&mut ops, &mut ctx);
            assert_eq!(ops[0].status, OpStatus::AuthFailed, "{t}");
        }
        let mut ops = [EspOp::new(&mut p, seq)];
        sa.open(&mut ops, &mut ctx);
        assert_eq!(ops[0].status, OpStatus::Ok, "{t}");
        assert_eq!(body_of(t, &p), &body[..]);
    }
}

#[test]
fn without_esn_the_high_bits_are_not_authenticated() {
    // Without ESN only the transmitted 32 bits count (the GCM IV still carries the full seq).
    let mut ctx = WorkerCtx::from_seed([4; 32]);
    for t in all_transforms() {
        let sa = sa(t, false);
        let (mut p, _) = plain_packet(t, 10, SPI, 77);
        sa.seal(&mut [EspOp::new(&mut p, 77)], &mut ctx);
        let mut ops = [EspOp::new(&mut p, (9 << 32) | 77)];
        sa.open(&mut ops, &mut ctx);
        assert_eq!(ops[0].status, OpStatus::Ok, "{t}");
    }
}

#[test]
fn short_or_misaligned_packets_are_bad_length_and_untouched() {
    let mut ctx = WorkerCtx::from_seed([5; 32]);
    for t in all_transforms() {
        for esn in [false, true] {
            let sa = sa(t, esn);
            // Too short for header + IV + 2-byte trailer + ICV.
            for len in 0..t.overhead() + 2 {
                let mut p: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let orig = p.clone();
                let mut ops = [EspOp::new(&mut p, 1)];
                sa.open(&mut ops, &mut ctx);
                assert_eq!(ops[0].status, OpStatus::BadLength, "{t} open len {len}");
                sa.seal(&mut ops, &mut ctx);
                assert_eq!(ops[0].status, OpStatus::BadLength, "{t} seal len {len}");
                assert_eq!(p, orig);
            }
            // CBC: body not a multiple of the block size.
            if let Transform::CipherAuth { cipher, .. } = t
                && cipher != CipherAlg::Null
            {
                let block = t.block_align();
                for extra in 1..block {
                    let len = t.overhead() + block + extra;
                    let mut p = vec![0x42; len];
                    let orig = p.clone();
                    let mut ops = [EspOp::new(&mut p, 1)];
                    sa.seal(&mut ops, &mut ctx);
                    assert_eq!(ops[0].status, OpStatus::BadLength, "{t} seal misaligned");
                    sa.open(&mut ops, &mut ctx);
                    assert_eq!(ops[0].status, OpStatus::BadLength, "{t} open misaligned");
                    assert_eq!(p, orig);
                }
            }
        }
    }
}

#[test]
fn mixed_batch_keeps_per_op_status() {
    let mut ctx = WorkerCtx::from_seed([6; 32]);
    let t = Transform::Aead {
        alg: AeadAlg::Aes128Gcm,
        icv_len: 16,
    };
    let sa = sa(t, false);
    let (mut a, body_a) = plain_packet(t, 20, SPI, 1);
    let mut short = vec![0u8; 5];
    let (mut c, body_c) = plain_packet(t, 21, SPI, 3);
    {
        let mut ops = [
            EspOp::new(&mut a, 1),
            EspOp::new(&mut short, 2),
            EspOp::new(&mut c, 3),
        ];
        sa.seal(&mut ops, &mut ctx);
        let st: Vec<OpStatus> = ops.iter().map(|o| o.status).collect();
        assert_eq!(st, [OpStatus::Ok, OpStatus::BadLength, OpStatus::Ok]);
    }
    let mut bad = a.clone();
    bad[20] ^= 1;
    let mut ops = [
        EspOp::new(&mut a, 1),
        EspOp::new(&mut bad, 1),
        EspOp::new(&mut short, 2),
        EspOp::new(&mut c, 3),
    ];
    sa.open(&mut ops, &mut ctx);
    let st: Vec<OpStatus> = ops.iter().map(|o| o.status).collect();
    assert_eq!(
        st,
        [
            OpStatus::Ok,
            OpStatus::AuthFailed,
            OpStatus::BadLength,
            OpStatus::Ok
        ]
    );
    assert_eq!(body_of(t, &a), &body_a[..]);
    assert_eq!(body_of(t, &c), &body_c[..]);
}

#[test]
fn empty_batch_is_fine() {
    let mut ctx = WorkerCtx::from_seed([0; 32]);
    for t in all_transforms() {
        let sa = sa(t, false);
        sa.seal(&mut [], &mut ctx);
        sa.open(&mut [], &mut ctx);
    }
}

/// 8/12-byte GCM ICVs are the prefix of the 16-byte one: both directions interoperate.
#[test]
fn truncated_gcm_interoperates_with_full_gcm() {
    let mut ctx = WorkerCtx::from_seed([8; 32]);
    for alg in [AeadAlg::Aes128Gcm, AeadAlg::Aes256Gcm] {
        for esn in [false, true] {
            let full_t = Transform::Aead { alg, icv_len: 16 };
            // Same key material for all three SAs.
            let keys = keys_for(full_t, 1);
            let full = SoftwareProvider.new_sa(full_t, &keys, esn).unwrap();
            for n in [0usize, 1, 15, 16, 17, 100, 1400] {
                let seq = if esn {
                    (2 << 32) | n as u64
                } else {
                    n as u64 + 1
                };
                let (mut p16, body) = plain_packet(full_t, n, SPI, seq);
                full.seal(&mut [EspOp::new(&mut p16, seq)], &mut ctx);
                for icv in [12u8, 8] {
                    let t = Transform::Aead { alg, icv_len: icv };
                    let short = SoftwareProvider.new_sa(t, &keys, esn).unwrap();
                    let icv = usize::from(icv);
                    // Seal with the truncated SA: same ciphertext, ICV = prefix of the full tag.
                    let (mut p, _) = plain_packet(t, n, SPI, seq);
                    short.seal(&mut [EspOp::new(&mut p, seq)], &mut ctx);
                    assert_eq!(&p[..], &p16[..p16.len() - 16 + icv], "{t} len {n}");
                    // Open the full-ICV packet cut down to the short ICV.
                    let mut q = p16[..p16.len() - 16 + icv].to_vec();
                    let mut ops = [EspOp::new(&mut q, seq)];
                    short.open(&mut ops, &mut ctx);
                    assert_eq!(ops[0].status, OpStatus::Ok, "{t} len {n}");
                    assert_eq!(body_of(t, &q), &body[..]);
                    // And the full SA opens the truncated SA's packet once the tag is complete.
                    let mut r = p.clone();
                    r.extend_from_slice(&p16[p16.len() - 16 + icv..]);
                    let mut ops = [EspOp::new(&mut r, seq)];
                    full.open(&mut ops, &mut ctx);
                    assert_eq!(ops[0].status, OpStatus::Ok, "{t} len {n}");
                }
            }
        }
    }
}

/// The RustCrypto tag computation agrees with ring's, for every length and ESN.
#[test]
fn software_gcm_tag_agrees_with_ring() {
    let mut ctx = WorkerCtx::from_seed([8; 32]);
    for alg in [AeadAlg::Aes128Gcm, AeadAlg::Aes256Gcm] {
        for esn in [false, true] {
            let t = Transform::Aead { alg, icv_len: 16 };
            let keys = keys_for(t, 2);
            let ring_sa = SoftwareProvider.new_sa(t, &keys, esn).unwrap();
            let soft = GcmSa::build(alg, 16, &keys.enc, esn, true).unwrap();
            for n in sizes() {
                let seq = (n as u64) << 20 | 3;
                let seq = if esn { seq } else { seq & 0xffff_ffff };
                let (mut p, body) = plain_packet(t, n, SPI, seq);
                ring_sa.seal(&mut [EspOp::new(&mut p, seq)], &mut ctx);
                let mut bad = p.clone();
                bad[p.len() - 1 - n % 16] ^= 4;
                assert_eq!(
                    soft.open_one_impl(&mut p, seq, true),
                    OpStatus::Ok,
                    "len {n}"
                );
                assert_eq!(body_of(t, &p), &body[..]);
                assert_eq!(
                    soft.open_one_impl(&mut bad, seq, true),
                    OpStatus::AuthFailed
                );
            }
        }
    }
}

#[test]
fn cbc_ivs_come_from_the_worker_rng() {
    let t = Transform::CipherAuth {
        cipher: CipherAlg::Aes128Cbc,
        integ: crate::IntegAlg::HmacSha256_128,
    };
    let sa = sa(t, false);
    let seal = |seed: [u8; 32]| {
        let mut ctx = WorkerCtx::from_seed(seed);
        let (mut a, _) = plain_packet(t, 30, SPI, 1);
        let (mut b, _) = plain_packet(t, 30, SPI, 2);
        sa.seal(
            &mut [EspOp::new(&mut a, 1), EspOp::new(&mut b, 2)],
            &mut ctx,
        );
        (a, b)
    };
    let (a1, b1) = seal([1; 32]);
    let (a2, _) = seal([1; 32]);
    let (a3, _) = seal([2; 32]);
    assert_eq!(a1, a2, "deterministic for a fixed seed");
    assert_ne!(a1[8..24], a3[8..24], "seed changes the IV");
    assert_ne!(a1[8..24], b1[8..24], "fresh IV per packet");
    // OS-seeded contexts differ from each other.
    let mut c1 = WorkerCtx::new();
    let mut c2 = WorkerCtx::default();
    let (mut x, _) = plain_packet(t, 30, SPI, 1);
    let (mut y, _) = plain_packet(t, 30, SPI, 1);
    sa.seal(&mut [EspOp::new(&mut x, 1)], &mut c1);
    sa.seal(&mut [EspOp::new(&mut y, 1)], &mut c2);
    assert_ne!(x[8..24], y[8..24]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes never panic and never authenticate.
    #[test]
    fn open_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), seq in any::<u64>(), esn in any::<bool>()) {
        let mut ctx = WorkerCtx::from_seed([0; 32]);
        for t in all_transforms() {
            let sa = sa(t, esn);
            let mut p = data.clone();
            let mut ops = [EspOp::new(&mut p, seq)];
            sa.open(&mut ops, &mut ctx);
            prop_assert!(matches!(ops[0].status, OpStatus::AuthFailed | OpStatus::BadLength));
        }
    }

    /// Random payloads, sequence numbers and ESN round-trip.
    #[test]
    fn random_round_trip(n in 0usize..600, seq in any::<u64>(), esn in any::<bool>(), which in 0usize..26) {
        let mut ctx = WorkerCtx::from_seed([0; 32]);
        let t = all_transforms()[which];
        let seq = if esn { seq } else { seq & 0xffff_ffff };
        let sa = sa(t, esn);
        let (mut p, body) = plain_packet(t, n, SPI, seq);
        let mut ops = [EspOp::new(&mut p, seq)];
        sa.seal(&mut ops, &mut ctx);
        prop_assert_eq!(ops[0].status, OpStatus::Ok);
        sa.open(&mut ops, &mut ctx);
        prop_assert_eq!(ops[0].status, OpStatus::Ok);
        prop_assert_eq!(body_of(t, &p), &body[..]);
    }
}
