//! Rough single-core timing; run with
//! `cargo test -p espgw-crypto --release -- --ignored --nocapture timing`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use super::{keys_for, plain_packet, sa};
use crate::{EspOp, OpStatus, Transform, WorkerCtx};

const BODY: usize = 1420;
const BURST: usize = 32;
const MIN_TIME: Duration = Duration::from_secs(2);

fn report(what: &str, body: usize, packets: u64, elapsed: Duration) {
    let ns = elapsed.as_nanos() as f64 / packets as f64;
    let gbps = (body as f64 * 8.0) / ns;
    println!("{what:<48} {ns:8.1} ns/packet  {gbps:6.2} Gbit/s ({body}-byte bodies)");
}

fn time_transform(t: Transform, label: &str) {
    let sa = sa(t, false);
    let mut ctx = WorkerCtx::from_seed([1; 32]);
    // Body (payload + padding + 2) of BODY bytes, or the block multiple just below for CBC.
    let want = BODY - BODY % t.block_align();
    let (template, body) = plain_packet(t, want - 2, 0x1234, 1);
    assert_eq!(body.len(), want);
    let mut bufs: Vec<Vec<u8>> = (0..BURST).map(|_| template.clone()).collect();
    let mut seq = 1u64;
    let start = Instant::now();
    let mut packets = 0u64;
    while start.elapsed() < MIN_TIME {
        for _ in 0..64 {
            let mut ops: [EspOp<'_>; BURST] = {
                let mut it = bufs.iter_mut();
                std::array::from_fn(|_| {
                    seq += 1;
                    EspOp::new(it.next().unwrap(), seq)
                })
            };
            sa.seal(&mut ops, &mut ctx);
            debug_assert!(ops.iter().all(|o| o.status == OpStatus::Ok));
            black_box(&ops);
            packets += BURST as u64;
        }
    }
    report(label, want, packets, start.elapsed());
}

#[test]
#[ignore = "timing; run in --release"]
fn timing_aes128gcm16_seal_vs_raw_ring() {
    let t = Transform::aead_from_name("aes128gcm16").unwrap();
    // Raw ring on the same key, same sizes, 8-byte AAD, tag written separately.
    let keys = keys_for(t, 0);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &keys.enc[..16]).unwrap());
    let mut buf = vec![0x5au8; BODY];
    let aad = [0u8; 8];
    let mut ctr = 0u64;
    let start = Instant::now();
    let mut packets = 0u64;
    while start.elapsed() < MIN_TIME {
        for _ in 0..2048 {
            ctr += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&ctr.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(n),
                    Aad::from(aad),
                    &mut buf,
                )
                .unwrap();
            black_box(tag.as_ref());
            packets += 1;
        }
    }
    report(
        "raw ring seal_in_place_separate_tag",
        BODY,
        packets,
        start.elapsed(),
    );
    time_transform(t, "SaCrypto::seal aes128gcm16 (bursts of 32)");
    time_transform(
        Transform::aead_from_name("aes128gcm12").unwrap(),
        "SaCrypto::seal aes128gcm12 (bursts of 32)",
    );
}

#[test]
#[ignore = "timing; run in --release"]
fn timing_other_transforms_seal() {
    for name in [
        "aes256gcm16",
        "aes128-cbc/hmac-sha1-96",
        "aes128-cbc/hmac-sha2-256-128",
        "aes256-cbc/hmac-sha2-512-256",
        "3des-cbc/hmac-sha1-96",
        "null/hmac-sha2-256-128",
    ] {
        let t = Transform::from_name(name).unwrap();
        time_transform(t, &format!("SaCrypto::seal {name}"));
    }
}
