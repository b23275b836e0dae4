//! ESP encapsulation and decapsulation through the real burst API, next to raw `ring` AES-GCM.
//!
//! Every case processes one burst of [`BURST`] frames per criterion iteration:
//!
//! * `encap-<transform>`: `Pipeline::process(PortId::Lan, ..)` on Ethernet + IPv4 + UDP frames
//!   whose inner IPv4 packet is 64, 512 or 1420 bytes (tunnel mode, plain ESP, no UDP encap);
//! * `decap-<transform>`: `Pipeline::process(PortId::Wan, ..)` on the ESP frames an outbound
//!   pipeline with the mirror SA produced (fresh sequence numbers for every burst: the inbound SA
//!   has a 1024-packet anti-replay window and would drop a frame seen before);
//! * `raw-seal-aes{128,256}gcm` / `raw-open-..`: `ring::aead::LessSafeKey`'s
//!   `seal_in_place_separate_tag` / `open_in_place_separate_tag` over 32 buffers of the same size
//!   as the inner packet, 8-byte AAD, the tag written after / read from behind the data. For
//!   small packets the loop first prefetches every buffer's lines, as the pipeline does for its
//!   frames, and for larger ones the next buffer's lines while it works on one, as the crypto
//!   backends do, so that cold bursts do not make the baseline look slower than the crypto is.
//!
//! Inputs are built in criterion's untimed setup (`iter_batched_ref`, `BatchSize::SmallInput`):
//! fresh plaintext copied into UMEM-like buffers (256 bytes of headroom in front of the frame,
//! tailroom behind it) for encap and raw seal, fresh ESP frames / sealed buffers for decap and
//! raw open. ESP and raw cases use the same buffer layout and the same batching, so both see the
//! same cache state. With `SmallInput` a batch is thousands of bursts, so each burst comes from
//! memory rather than cache (think: packets DMA'd into UMEM); `ESPGW_BENCH_BATCH=4` uses
//! `BatchSize::NumIterations(4)` instead, which keeps the bursts in L2 and shows the CPU cost.
//!
//! After criterion, when the headline cases ran, an **interleaved check** times raw and ESP for
//! aes128gcm16 at the target sizes back to back over fresh inputs of 32 MiB a side (built in
//! alternation, so both are equally cold), 15 times per case in alternating order, and reports
//! the median of the per-repetition ratios with their range. Criterion measures the two sides
//! of a ratio seconds apart, in which time these VMs can change speed; here they are
//! milliseconds apart.
//!
//! The custom `main` runs criterion, then reads criterion's estimates of this run
//! (`<criterion dir>/<group>/<function>/new/estimates.json`, only files written by this process)
//! and prints ESP next to raw with the ratio, plus a cross-CPU ping-pong time: these VMs swing
//! by up to 2.5x with vCPU placement, so the figures only compare within one run.

use criterion::{BatchSize, Criterion, Throughput};
use espgw_crypto::{SoftwareProvider, WorkerCtx};
use espgw_dataplane::config::{self, PortId};
use espgw_dataplane::counters::DropReason;
use espgw_dataplane::demo::udp4_frame;
use espgw_dataplane::pipeline::{Frame, Pipeline, Verdict};
use espgw_dataplane::replay::{HEADROOM, TAILROOM};
use espgw_wire::{ethernet, ipv4};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, Algorithm, LessSafeKey, Nonce, Tag, UnboundKey};
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Frames per `Pipeline::process` call (and buffers per raw iteration).
const BURST: usize = 32;
/// Inner IPv4 packet sizes (IP header + UDP header + payload).
const SIZES: [usize; 3] = [64, 512, 1420];
/// Data-plane clock: SAs are installed at `T0`, bursts run one second later.
const T0: u64 = 1_700_000_000_000_000_000;
const NOW: u64 = T0 + 1_000_000_000;
/// Size the targets apply to, and the target ratio (ESP ÷ raw) for aes128gcm16.
const TARGETS: [(usize, f64); 2] = [(64, 0.70), (1420, 0.90)];
const HEADLINE: &str = "aes128gcm16";

/// One transform under test: its name and the `[[sa]]` lines that select it.
struct Transform {
    name: &'static str,
    sa_lines: &'static str,
    /// Raw ring reference it is compared with.
    raw: RawAlg,
    /// Benchmarked at these sizes only (3DES is ~100 µs per packet with RustCrypto `des`).
    sizes: &'static [usize],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawAlg {
    Aes128Gcm,
    Aes256Gcm,
}

impl RawAlg {
    fn name(self) -> &'static str {
        match self {
            RawAlg::Aes128Gcm => "aes128gcm",
            RawAlg::Aes256Gcm => "aes256gcm",
        }
    }
    fn ring(self) -> &'static Algorithm {
        match self {
            RawAlg::Aes128Gcm => &AES_128_GCM,
            RawAlg::Aes256Gcm => &AES_256_GCM,
        }
    }
    fn key_len(self) -> usize {
        match self {
            RawAlg::Aes128Gcm => 16,
            RawAlg::Aes256Gcm => 32,
        }
    }
}

// Benchmark keys only, published here.
const TRANSFORMS: &[Transform] = &[
    Transform {
        name: "aes128gcm16",
        sa_lines: r#"aead = "aes128gcm16"
key = "0x00112233445566778899aabbccddeeff01020304""#,
        raw: RawAlg::Aes128Gcm,
        sizes: &SIZES,
    },
    Transform {
        name: "aes256gcm16",
        sa_lines: r#"aead = "aes256gcm16"
key = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f01020304""#,
        raw: RawAlg::Aes256Gcm,
        sizes: &SIZES,
    },
    Transform {
        name: "aes128-cbc+hmac-sha1-96",
        sa_lines: r#"cipher = "aes128-cbc"
integrity = "hmac-sha1-96"
key = "0x000102030405060708090a0b0c0d0e0f"
integrity_key = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3""#,
        raw: RawAlg::Aes128Gcm,
        sizes: &SIZES,
    },
    Transform {
        name: "aes256-cbc+hmac-sha2-256-128",
        sa_lines: r#"cipher = "aes256-cbc"
integrity = "hmac-sha2-256-128"
key = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
integrity_key = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf""#,
        raw: RawAlg::Aes128Gcm,
        sizes: &SIZES,
    },
    Transform {
        name: "null+hmac-sha1-96",
        sa_lines: r#"cipher = "null"
integrity = "hmac-sha1-96"
integrity_key = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3""#,
        raw: RawAlg::Aes128Gcm,
        sizes: &SIZES,
    },
    Transform {
        name: "3des-cbc+hmac-sha1-96",
        sa_lines: r#"cipher = "3des-cbc"
integrity = "hmac-sha1-96"
key = "0x000102030405060708090a0b0c0d0e0f1011121314151617"
integrity_key = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3""#,
        raw: RawAlg::Aes128Gcm,
        sizes: &[64],
    },
];

/// Gateway A: encrypts LAN traffic 10.1/16 → 10.2/16 towards 203.0.113.2.
fn config_out(t: &Transform) -> String {
    format!(
        r#"[dataplane]
replay_window = 1024
[dataplane.wan]
mac = "02:00:00:00:0a:01"
addresses = ["203.0.113.1/24"]
[dataplane.lan]
mac = "02:00:00:00:0a:02"
addresses = ["10.1.0.1/16"]

[[sa]]
name = "out"
direction = "out"
spi = 0x00001001
mode = "tunnel"
local = "203.0.113.1"
remote = "203.0.113.2"
{}
lifetime = {{ soft_seconds = 3600, hard_seconds = 3900 }}

[[policy]]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
action = "protect"
sa = "out"

[[neighbor]]
ip = "203.0.113.2"
mac = "02:00:00:00:0b:01"
"#,
        t.sa_lines
    )
}

/// Gateway B: the mirror inbound SA, with selectors and a 1024-packet replay window.
fn config_in(t: &Transform) -> String {
    format!(
        r#"[dataplane]
replay_window = 1024
[dataplane.wan]
mac = "02:00:00:00:0b:01"
addresses = ["203.0.113.2/24"]
[dataplane.lan]
mac = "02:00:00:00:0b:02"
addresses = ["10.2.0.1/16"]

[[sa]]
name = "in"
direction = "in"
spi = 0x00001001
mode = "tunnel"
local = "203.0.113.2"
remote = "203.0.113.1"
{}
lifetime = {{ soft_seconds = 3600, hard_seconds = 3900 }}
selectors = [{{ src = "10.1.0.0/16", dst = "10.2.0.0/16" }}]

[[neighbor]]
ip = "10.2.0.20"
mac = "02:00:00:00:0c:20"
"#,
        t.sa_lines
    )
}

/// A pipeline over its own SA database built from `text`, the way `replay` builds one.
fn pipeline(text: &str, what: &str) -> Pipeline {
    let cfg = config::parse_str(text, Path::new(what))
        .unwrap_or_else(|e| panic!("{what}: bad benchmark config: {e}"));
    let (db, net) = config::instantiate(cfg, &SoftwareProvider, T0)
        .unwrap_or_else(|e| panic!("{what}: install failed: {e}"));
    Pipeline::new(db, net, WorkerCtx::new())
}

/// The plaintext LAN frame with an inner IPv4 packet of `size` bytes.
fn plain_frame(size: usize) -> Vec<u8> {
    udp4_frame(
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 2, 0, 20),
        40_000,
        5001,
        size - ipv4::HEADER_LEN - 8,
        64,
    )
}

/// Buffer stride for frames of `frame_len` bytes: headroom + frame + tailroom, cache-line
/// rounded (2 KiB, a usual UMEM chunk, at 1420 B).
fn stride_for(frame_len: usize) -> usize {
    (HEADROOM + frame_len + TAILROOM).next_multiple_of(64)
}

/// A burst of UMEM-like buffers, one allocation, each chunk cache-line aligned.
#[derive(Debug)]
struct Burst {
    mem: Vec<u8>,
    base: usize,
    stride: usize,
    start: [usize; BURST],
    len: [usize; BURST],
    /// First sequence number (raw cases).
    seq: u64,
}

impl Burst {
    /// Each buffer holds `data` at `HEADROOM`.
    fn filled(stride: usize, data: &[u8]) -> Self {
        let mem = vec![0u8; BURST * stride + 64];
        let base = (64 - mem.as_ptr().addr() % 64) % 64;
        let mut b = Burst {
            mem,
            base,
            stride,
            start: [HEADROOM; BURST],
            len: [data.len(); BURST],
            seq: 0,
        };
        for i in 0..BURST {
            b.chunk(i)[HEADROOM..HEADROOM + data.len()].copy_from_slice(data);
        }
        b
    }

    fn chunk(&mut self, i: usize) -> &mut [u8] {
        let at = self.base + i * self.stride;
        &mut self.mem[at..at + self.stride]
    }

    /// The frames, as a worker would build them from its RX descriptors.
    fn frames(&mut self) -> [Frame<'_>; BURST] {
        let (start, len) = (self.start, self.len);
        let mut chunks = self.mem[self.base..].chunks_exact_mut(self.stride);
        std::array::from_fn(|i| {
            let Some(f) = chunks.next().and_then(|c| Frame::new(c, start[i], len[i])) else {
                unreachable!("a burst holds {BURST} buffers with the frame inside");
            };
            f
        })
    }

    /// Run `pipe` over the burst, recording where each frame now is; panics unless every frame
    /// got `want`.
    fn process(&mut self, pipe: &mut Pipeline, port: PortId, want: Verdict) {
        let mut v = [Verdict::Drop(DropReason::Unsupported); BURST];
        let moved: [(usize, usize); BURST] = {
            let mut frames = self.frames();
            pipe.process(port, &mut frames, &mut v, NOW);
            std::array::from_fn(|i| (frames[i].start(), frames[i].len()))
        };
        for (i, (s, l)) in moved.into_iter().enumerate() {
            self.start[i] = s;
            self.len[i] = l;
        }
        assert!(v.iter().all(|x| *x == want), "expected {want:?}, got {v:?}");
    }

    /// Move every frame back to `HEADROOM` (where the NIC puts a received frame).
    fn rebase(&mut self) {
        for i in 0..BURST {
            let (s, l) = (self.start[i], self.len[i]);
            self.chunk(i).copy_within(s..s + l, HEADROOM);
            self.start[i] = HEADROOM;
        }
    }
}

/// Fresh ESP frames: `gen` (the outbound mirror) encrypts plaintext; untimed setup for decap.
fn esp_burst(generator: &mut Pipeline, stride: usize, plain: &[u8]) -> Burst {
    let mut b = Burst::filled(stride, plain);
    b.process(generator, PortId::Lan, Verdict::TxWan);
    b.rebase();
    b
}

fn raw_key(alg: RawAlg) -> LessSafeKey {
    let key: Vec<u8> = (0..alg.key_len() as u8).collect();
    let Ok(k) = UnboundKey::new(alg.ring(), &key) else {
        unreachable!("key length matches the algorithm");
    };
    LessSafeKey::new(k)
}

const RAW_SALT: [u8; 4] = [1, 2, 3, 4];
const RAW_SPI: [u8; 4] = [0, 0, 0x10, 0x01];

/// Nonce (salt || 64-bit counter) and ESP-like 8-byte AAD (SPI || seq low) for packet `seq`.
fn raw_nonce_aad(seq: u64) -> (Nonce, Aad<[u8; 8]>) {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&RAW_SALT);
    n[4..].copy_from_slice(&seq.to_be_bytes());
    let mut a = [0u8; 8];
    a[..4].copy_from_slice(&RAW_SPI);
    a[4..].copy_from_slice(&(seq as u32).to_be_bytes());
    (Nonce::assume_unique_for_key(n), Aad::from(a))
}

/// Small buffers: ask for the lines of every buffer's data and tag before the loop, as the
/// pipeline does for small frames, so that the raw baseline's cache misses overlap as well as
/// ESP's do (without it, cold 64-byte raw bursts ran ~40% slower than ESP's). Large buffers are
/// left to the hardware prefetcher: asking for their first and last lines made the raw loop
/// slower, and the baseline should be the fastest raw loop, not a handicapped one.
fn raw_prefetch(b: &mut Burst, size: usize) {
    let len = size + 16;
    if len > espgw_crypto::PREFETCH_NEXT_FROM {
        return;
    }
    for i in 0..BURST {
        let region = &b.chunk(i)[HEADROOM..HEADROOM + len];
        espgw_crypto::prefetch_lines(region.as_ptr(), len);
    }
}

/// Larger buffers: ask for all of the next buffer's lines while this one is processed, as
/// the pipeline and the backends do for the next packet ([`espgw_crypto::prefetch_op`], same
/// threshold), so that the baseline gets the same help. An interleaved A/B of the raw loop
/// with and without it (1420 bytes, from memory): open 325-340 → 293-310 ns, seal 1-5 %
/// faster; the baseline should be the fastest raw loop.
fn raw_prefetch_next(b: &mut Burst, i: usize, size: usize) {
    let len = size + 16;
    if len <= espgw_crypto::PREFETCH_NEXT_FROM || i + 1 >= BURST {
        return;
    }
    espgw_crypto::prefetch_lines(b.chunk(i + 1)[HEADROOM..].as_ptr(), len);
}

/// Seal `size` bytes at `HEADROOM` in each buffer, tag right behind.
fn raw_seal(key: &LessSafeKey, b: &mut Burst, size: usize) -> usize {
    raw_prefetch(b, size);
    let mut failed = 0;
    let seq = b.seq;
    for i in 0..BURST {
        raw_prefetch_next(b, i, size);
        let region = &mut b.chunk(i)[HEADROOM..HEADROOM + size + 16];
        let (data, tag_at) = region.split_at_mut(size);
        let (nonce, aad) = raw_nonce_aad(seq + i as u64);
        match key.seal_in_place_separate_tag(nonce, aad, data) {
            Ok(tag) => tag_at.copy_from_slice(tag.as_ref()),
            Err(_) => failed += 1,
        }
    }
    failed
}

/// Verify and decrypt what [`raw_seal`] produced.
fn raw_open(key: &LessSafeKey, b: &mut Burst, size: usize) -> usize {
    raw_prefetch(b, size);
    let mut failed = 0;
    let seq = b.seq;
    for i in 0..BURST {
        raw_prefetch_next(b, i, size);
        let region = &mut b.chunk(i)[HEADROOM..HEADROOM + size + 16];
        let (data, tag_at) = region.split_at_mut(size);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(tag_at);
        let (nonce, aad) = raw_nonce_aad(seq + i as u64);
        if key
            .open_in_place_separate_tag(nonce, aad, Tag::from(tag), data, 0..)
            .is_err()
        {
            failed += 1;
        }
    }
    failed
}

/// Panics if the pipeline dropped anything (a replayed or rejected frame would make decap look
/// faster than it is).
fn assert_clean(pipe: &Pipeline, what: &str) {
    let c = pipe.counters();
    let drops: u64 = c.drops.0.iter().sum();
    assert!(
        drops == 0,
        "{what}: the pipeline dropped frames: {}",
        c.to_json()
    );
}

/// One end-to-end check per transform and size before timing: A encrypts, B decrypts, the inner
/// packet comes out intact (TTL two lower, checksum adjusted).
fn round_trip_check(a: &mut Pipeline, b: &mut Pipeline, t: &Transform, size: usize) {
    let plain = plain_frame(size);
    let stride = stride_for(plain.len());
    let mut burst = esp_burst(a, stride, &plain);
    burst.process(b, PortId::Wan, Verdict::TxLan);
    let e = ethernet::HEADER_LEN;
    for i in 0..BURST {
        let (s, l) = (burst.start[i], burst.len[i]);
        let got = &burst.chunk(i)[s..s + l];
        let ok = got.len() == plain.len()
            && got[e + 12..] == plain[e + 12..]
            && got[e..e + 8] == plain[e..e + 8]
            && got[e + 8] == plain[e + 8] - 2;
        assert!(ok, "{}: {size} B did not survive encap + decap", t.name);
    }
}

/// Where criterion writes, found the way criterion finds it.
fn criterion_dir() -> PathBuf {
    if let Some(v) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(v);
    }
    if let Some(v) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(v).join("criterion");
    }
    let from_metadata = std::env::var_os("CARGO").and_then(|cargo| {
        let out = std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(PathBuf::from(v["target_directory"].as_str()?).join("criterion"))
    });
    from_metadata.unwrap_or_else(|| PathBuf::from("target/criterion"))
}

/// Criterion's directory-name rule for group and function ids.
fn safe(s: &str) -> String {
    s.replace(['?', '"', '/', '\\', '*', '<', '>', ':', '|', '^'], "_")
}

/// A criterion estimate of this run: median time per iteration (ns) and its 95 % interval.
#[derive(Debug, Clone, Copy)]
struct Est {
    ns: f64,
    lo: f64,
    hi: f64,
}

fn estimate(dir: &Path, group: &str, func: &str, since: SystemTime) -> Option<Est> {
    let p = dir
        .join(safe(group))
        .join(safe(func))
        .join("new")
        .join("estimates.json");
    let meta = std::fs::metadata(&p).ok()?;
    // Only numbers from this process: a file left by an earlier run does not count.
    if meta.modified().ok()? < since {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
    let m = &v["median"];
    Some(Est {
        ns: m["point_estimate"].as_f64()?,
        lo: m["confidence_interval"]["lower_bound"].as_f64()?,
        hi: m["confidence_interval"]["upper_bound"].as_f64()?,
    })
}

/// Median cross-thread round trip (ns) over `batches` × 1000 bounces of one atomic.
fn ping_pong(batches: usize) -> f64 {
    const PER_BATCH: u64 = 1000;
    let flag = Arc::new(AtomicU64::new(0));
    let peer = Arc::clone(&flag);
    let responder = std::thread::spawn(move || {
        loop {
            let v = peer.load(Ordering::Acquire);
            if v == u64::MAX {
                return;
            }
            if v % 2 == 1 {
                peer.store(v + 1, Ordering::Release);
            }
            std::hint::spin_loop();
        }
    });
    let mut per_rt = Vec::with_capacity(batches);
    let mut v = 0u64;
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..PER_BATCH {
            flag.store(v + 1, Ordering::Release);
            while flag.load(Ordering::Acquire) != v + 2 {
                std::hint::spin_loop();
            }
            v += 2;
        }
        per_rt.push(t.elapsed().as_nanos() as f64 / PER_BATCH as f64);
    }
    flag.store(u64::MAX, Ordering::Release);
    let _ = responder.join();
    per_rt.sort_by(f64::total_cmp);
    per_rt[per_rt.len() / 2]
}

/// `ESPGW_BENCH_BATCH=<n>`: `BatchSize::NumIterations(n)` instead of `SmallInput` (small
/// batches keep the inputs in cache; `SmallInput` batches are thousands of bursts, so every
/// burst comes from memory, for ESP and raw alike).
fn batch_size() -> BatchSize {
    match std::env::var("ESPGW_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) if n > 0 => BatchSize::NumIterations(n),
        _ => BatchSize::SmallInput,
    }
}

fn group_name(size: usize) -> String {
    format!("esp-{size}B")
}

fn run_benches(c: &mut Criterion) {
    let batch = batch_size();
    // Outbound (A), the generator of ESP frames for decap (also A: the same SA, so sequence
    // numbers keep rising), and inbound (B), per transform.
    let mut pipes: Vec<(Pipeline, Pipeline)> = TRANSFORMS
        .iter()
        .map(|t| {
            (
                pipeline(&config_out(t), &format!("{}-out.toml", t.name)),
                pipeline(&config_in(t), &format!("{}-in.toml", t.name)),
            )
        })
        .collect();
    for &size in &SIZES {
        let plain = plain_frame(size);
        let inner = plain[ethernet::HEADER_LEN..].to_vec();
        let stride = stride_for(plain.len());
        let mut g = c.benchmark_group(group_name(size));
        g.throughput(Throughput::ElementsAndBytes {
            elements: BURST as u64,
            bytes: (BURST * size) as u64,
        });

        for alg in [RawAlg::Aes128Gcm, RawAlg::Aes256Gcm] {
            let key = raw_key(alg);
            let mut next_seq = 1u64;
            let mut failed = 0usize;
            let mut setup_failed = 0usize;
            g.bench_function(format!("raw-seal-{}", alg.name()), |bn| {
                bn.iter_batched_ref(
                    || {
                        let mut b = Burst::filled(stride, &inner);
                        b.seq = next_seq;
                        next_seq += BURST as u64;
                        b
                    },
                    |b| failed += raw_seal(&key, b, size),
                    batch,
                );
            });
            g.bench_function(format!("raw-open-{}", alg.name()), |bn| {
                bn.iter_batched_ref(
                    || {
                        let mut b = Burst::filled(stride, &inner);
                        b.seq = next_seq;
                        next_seq += BURST as u64;
                        setup_failed += raw_seal(&key, &mut b, size);
                        b
                    },
                    |b| failed += raw_open(&key, b, size),
                    batch,
                );
            });
            assert!(
                failed + setup_failed == 0,
                "raw {} failed {failed} + {setup_failed} times",
                alg.name()
            );
        }

        for (t, (out, inb)) in TRANSFORMS.iter().zip(pipes.iter_mut()) {
            if !t.sizes.contains(&size) {
                continue;
            }
            round_trip_check(out, inb, t, size);
            let mut verdicts = [Verdict::Drop(DropReason::Unsupported); BURST];
            g.bench_function(format!("encap-{}", t.name), |bn| {
                bn.iter_batched_ref(
                    || Burst::filled(stride, &plain),
                    |b| {
                        let mut frames = b.frames();
                        out.process(PortId::Lan, &mut frames, &mut verdicts, NOW);
                        black_box(&verdicts);
                    },
                    batch,
                );
            });
            assert_clean(out, t.name);
            g.bench_function(format!("decap-{}", t.name), |bn| {
                bn.iter_batched_ref(
                    || esp_burst(out, stride, &plain),
                    |b| {
                        let mut frames = b.frames();
                        inb.process(PortId::Wan, &mut frames, &mut verdicts, NOW);
                        black_box(&verdicts);
                    },
                    batch,
                );
            });
            assert_clean(inb, t.name);
        }
        g.finish();
    }
}

/// One row of the summary.
#[derive(Debug)]
struct Row {
    transform: &'static str,
    size: usize,
    dir: &'static str,
    raw: RawAlg,
    esp: Est,
    raw_est: Est,
}

impl Row {
    fn ratio(&self) -> f64 {
        // Same bytes per iteration on both sides: throughput ratio = time ratio inverted.
        self.raw_est.ns / self.esp.ns
    }
    fn verdict(&self) -> &'static str {
        if self.transform != HEADLINE {
            return "";
        }
        match TARGETS.iter().find(|(s, _)| *s == self.size) {
            Some((_, t)) if self.ratio() >= *t => "PASS",
            Some(_) => "BELOW-TARGET",
            None => "(no target)",
        }
    }
}

fn gbps(size: usize, ns: f64) -> f64 {
    (BURST * size * 8) as f64 / ns
}

fn mpps(ns: f64) -> f64 {
    BURST as f64 * 1e3 / ns
}

fn summarize(since: SystemTime, pp: (f64, f64), paired: &[Paired]) {
    let dir = criterion_dir();
    let mut rows = Vec::new();
    for &size in &SIZES {
        let g = group_name(size);
        for t in TRANSFORMS.iter().filter(|t| t.sizes.contains(&size)) {
            for (dir_name, raw_fn) in [("encap", "seal"), ("decap", "open")] {
                let esp = estimate(&dir, &g, &format!("{dir_name}-{}", t.name), since);
                let raw = estimate(&dir, &g, &format!("raw-{raw_fn}-{}", t.raw.name()), since);
                if let (Some(esp), Some(raw_est)) = (esp, raw) {
                    rows.push(Row {
                        transform: t.name,
                        size,
                        dir: dir_name,
                        raw: t.raw,
                        esp,
                        raw_est,
                    });
                }
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nespgw ESP vs raw ring AES-GCM, burst {BURST}, tunnel mode, plain ESP (criterion median per burst; ratio = ESP inner bytes/s ÷ raw bytes sealed/s)"
    );
    let _ = writeln!(
        out,
        "cross-CPU ping-pong round trip (median): {:.0} ns before, {:.0} ns after",
        pp.0, pp.1
    );
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "no estimates from this run in {} (test/list mode or filtered out): nothing to compare",
            dir.display()
        );
        print!("{out}");
        return;
    }
    let _ = writeln!(
        out,
        "{:<30} {:>5} {:<5} {:>8} {:>8} {:>9} {:<12} {:>8} {:>6}  target",
        "transform",
        "size",
        "dir",
        "ESP Mpps",
        "ESP Gb/s",
        "ns/pkt",
        "raw ref",
        "raw Gb/s",
        "ratio"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<30} {:>5} {:<5} {:>8.3} {:>8.2} {:>9.1} {:<12} {:>8.2} {:>6.3}  {}",
            r.transform,
            r.size,
            r.dir,
            mpps(r.esp.ns),
            gbps(r.size, r.esp.ns),
            r.esp.ns / BURST as f64,
            format!(
                "{}-{}",
                r.raw.name(),
                if r.dir == "encap" { "seal" } else { "open" }
            ),
            gbps(r.size, r.raw_est.ns),
            r.ratio(),
            r.verdict(),
        );
    }
    if !paired.is_empty() {
        let _ = writeln!(
            out,
            "\ninterleaved, {HEADLINE} ({PAIRED_REPS} repetitions, each times raw and ESP over fresh inputs of {} MiB a side back to back; ratio = raw time ÷ ESP time)",
            PAIRED_BYTES >> 20
        );
        let _ = writeln!(
            out,
            "{:>5} {:<5} {:>12} {:>12} {:>7} {:>15}  target",
            "size", "dir", "ESP ns/pkt", "raw ns/pkt", "ratio", "ratio range"
        );
        for p in paired {
            let (lo, hi) = p
                .ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(*r), b.max(*r)));
            let target = TARGETS.iter().find(|(s, _)| *s == p.size).map(|t| t.1);
            let ratio = median(&p.ratios);
            let _ = writeln!(
                out,
                "{:>5} {:<5} {:>12.1} {:>12.1} {:>7.3} {:>7.3}–{:<7.3}  {}",
                p.size,
                p.dir,
                median(&p.esp_ns_per_pkt),
                median(&p.raw_ns_per_pkt),
                ratio,
                lo,
                hi,
                match target {
                    Some(t) if ratio >= t => "PASS",
                    Some(_) => "BELOW-TARGET",
                    None => "",
                }
            );
        }
    }
    print!("{out}");
    let paired_json: Vec<serde_json::Value> = paired
        .iter()
        .map(|p| {
            serde_json::json!({
                "transform": HEADLINE, "size": p.size, "dir": p.dir,
                "ratio_median": median(&p.ratios), "ratios": p.ratios,
                "esp_ns_per_pkt_median": median(&p.esp_ns_per_pkt),
                "raw_ns_per_pkt_median": median(&p.raw_ns_per_pkt),
            })
        })
        .collect();
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "transform": r.transform, "size": r.size, "dir": r.dir,
                "esp_ns_per_burst": r.esp.ns, "esp_ci": [r.esp.lo, r.esp.hi],
                "raw": r.raw.name(), "raw_ns_per_burst": r.raw_est.ns,
                "raw_ci": [r.raw_est.lo, r.raw_est.hi],
                "esp_mpps": mpps(r.esp.ns), "esp_gbps": gbps(r.size, r.esp.ns),
                "raw_gbps": gbps(r.size, r.raw_est.ns), "ratio": r.ratio(),
                "target": r.verdict(),
            })
        })
        .collect();
    let summary = serde_json::json!({
        "burst": BURST,
        "ping_pong_ns": [pp.0, pp.1],
        "rows": json,
        "paired": paired_json,
    });
    let path = dir.join("espgw-summary.json");
    match std::fs::write(&path, summary.to_string()) {
        Ok(()) => println!("(also written to {})", path.display()),
        Err(e) => println!("(could not write {}: {e})", path.display()),
    }
}

/// Bytes of buffers each side of an interleaved repetition uses: far more than the caches, so
/// that every burst comes from memory, as with criterion's `SmallInput` batches.
const PAIRED_BYTES: usize = 32 << 20;
/// Interleaved repetitions per case.
const PAIRED_REPS: usize = 15;

/// One interleaved case: the ratio (raw time ÷ ESP time) of each repetition.
#[derive(Debug)]
struct Paired {
    size: usize,
    dir: &'static str,
    ratios: Vec<f64>,
    esp_ns_per_pkt: Vec<f64>,
    raw_ns_per_pkt: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Interleaved measurement of the headline transform at the target sizes: each repetition
/// builds fresh inputs for both sides (untimed), then times a run of raw bursts and a run of ESP
/// bursts over them back to back, in alternating order. Both sides of a ratio are measured
/// within milliseconds of each other, so a VM that changes speed between criterion's cases
/// (seconds apart) does not move it.
fn paired_ratios() -> Vec<Paired> {
    let Some(t) = TRANSFORMS.iter().find(|t| t.name == HEADLINE) else {
        return Vec::new();
    };
    let mut out = pipeline(&config_out(t), "paired-out.toml");
    let mut inb = pipeline(&config_in(t), "paired-in.toml");
    let key = raw_key(t.raw);
    let mut seq = 1u64;
    let mut results = Vec::new();
    for (size, _) in TARGETS {
        let plain = plain_frame(size);
        let inner = plain[ethernet::HEADER_LEN..].to_vec();
        let stride = stride_for(plain.len());
        let bursts = (PAIRED_BYTES / (stride * BURST)).max(8);
        for dir in ["encap", "decap"] {
            let mut p = Paired {
                size,
                dir,
                ratios: Vec::new(),
                esp_ns_per_pkt: Vec::new(),
                raw_ns_per_pkt: Vec::new(),
            };
            for rep in 0..PAIRED_REPS {
                // Built in alternation, so that both sides' inputs are equally old (equally
                // far out of the caches) when the timing starts.
                let mut raw_in = Vec::with_capacity(bursts);
                let mut esp_in = Vec::with_capacity(bursts);
                for _ in 0..bursts {
                    let mut b = Burst::filled(stride, &inner);
                    b.seq = seq;
                    seq += BURST as u64;
                    if dir == "decap" {
                        assert_eq!(raw_seal(&key, &mut b, size), 0, "raw seal failed");
                    }
                    raw_in.push(b);
                    esp_in.push(match dir {
                        "encap" => Burst::filled(stride, &plain),
                        _ => esp_burst(&mut out, stride, &plain),
                    });
                }
                let mut verdicts = [Verdict::Drop(DropReason::Unsupported); BURST];
                let mut failed = 0;
                let mut time_raw = |bs: &mut Vec<Burst>| {
                    let t0 = Instant::now();
                    for b in bs.iter_mut() {
                        failed += match dir {
                            "encap" => raw_seal(&key, b, size),
                            _ => raw_open(&key, b, size),
                        };
                    }
                    t0.elapsed().as_nanos() as f64
                };
                let mut time_esp = |bs: &mut Vec<Burst>| {
                    let t0 = Instant::now();
                    for b in bs.iter_mut() {
                        let mut frames = b.frames();
                        match dir {
                            "encap" => out.process(PortId::Lan, &mut frames, &mut verdicts, NOW),
                            _ => inb.process(PortId::Wan, &mut frames, &mut verdicts, NOW),
                        }
                        black_box(&verdicts);
                    }
                    t0.elapsed().as_nanos() as f64
                };
                let (raw_ns, esp_ns) = if rep % 2 == 0 {
                    let r = time_raw(&mut raw_in);
                    (r, time_esp(&mut esp_in))
                } else {
                    let e = time_esp(&mut esp_in);
                    (time_raw(&mut raw_in), e)
                };
                assert_eq!(failed, 0, "raw {dir} failed");
                let pkts = (bursts * BURST) as f64;
                p.ratios.push(raw_ns / esp_ns);
                p.esp_ns_per_pkt.push(esp_ns / pkts);
                p.raw_ns_per_pkt.push(raw_ns / pkts);
            }
            assert_clean(&out, "paired encap");
            assert_clean(&inb, "paired decap");
            results.push(p);
        }
    }
    results
}

fn main() {
    let since = SystemTime::now();
    let args: Vec<String> = std::env::args().collect();
    let has = |a: &str| args.iter().any(|x| x == a);
    // Criterion's rule: without --bench (cargo test --benches) or with --test, run each once.
    let quick = has("--test") || !has("--bench") || has("--list");
    let rounds = if quick { 10 } else { 100 };
    // Under a profiler (`--profile-time`) the spinning threads would only blur the profile.
    let profiling = args.iter().any(|a| a.starts_with("--profile-time"));
    let pp = |rounds| {
        if profiling {
            f64::NAN
        } else {
            ping_pong(rounds)
        }
    };
    let pp_before = pp(rounds);
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .nresamples(20_000)
        .without_plots()
        .configure_from_args();
    run_benches(&mut c);
    c.final_summary();
    // The interleaved check: not in test mode, nor under a profiler, nor when the filter left
    // out the headline cases (`cargo bench --bench esp -- <filter>` times only what it names).
    let headline_ran = |dir: &Path| {
        TARGETS.iter().any(|(size, _)| {
            estimate(dir, &group_name(*size), &format!("encap-{HEADLINE}"), since).is_some()
        })
    };
    let paired = if quick || profiling || !headline_ran(&criterion_dir()) {
        Vec::new()
    } else {
        println!("interleaved raw/ESP repetitions ({PAIRED_REPS} per case) ...");
        paired_ratios()
    };
    let pp_after = pp(rounds);
    summarize(since, (pp_before, pp_after), &paired);
}
