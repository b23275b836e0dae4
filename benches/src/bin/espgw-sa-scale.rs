//! `espgw-sa-scale`: how the SA database scales (issue 4), every figure next to its baseline
//! measured in the same run.
//!
//! ```sh
//! cargo run --release -p espgw-benches --bin espgw-sa-scale            # full run (~1 min)
//! cargo run --release -p espgw-benches --bin espgw-sa-scale -- --quick # CI smoke run (< 10 s)
//! ```
//!
//! 1. **Installs through the ring**: the control side (this process's main thread) attaches to
//!    the segment (`Segment::attach`, sender + receiver), pushes `AddSa` records (AES-128-GCM,
//!    distinct SPIs, names and keys, half inbound and half outbound) keeping a window of
//!    unacknowledged records, and drains the `Applied`/`Rejected` answers; a second thread runs
//!    the data plane's real applier (`ringapply::Applier::with_params`, `poll` in a loop) into a
//!    real `SaDb`. Then the same with `DeleteSa` for every SA. Then installs and deletes once
//!    more into a fresh `SaDb` (the *second fill*: the allocator reuses what the first freed,
//!    as in a gateway that has been rekeying for a while, so no page is faulted in for the
//!    first time). The applier's busy time (productive `poll`s) is recorded: it is the
//!    bottleneck when it equals the phase's time. Baselines: the same records
//!    through the ring with a consumer that only decodes and answers `Applied` (ring only), and
//!    `SaDb::install` / `SaDb::remove` in one thread without the ring (parameters built
//!    beforehand, untimed).
//! 2. **Memory**: RSS (`VmRSS`) of a fresh child process before and after installing N SAs into
//!    a `SaDb` of capacity N, next to the RSS of the empty `SaDb` of that capacity; bytes per SA
//!    and what an `Sa` is made of.
//! 3. **Inbound lookups**: `SaDb::lookup_inbound` over pre-generated SPIs in batches of 32 (one
//!    epoch pin per batch) with 1,000,000 inbound SAs (random order) vs 1 SA, plus the pieces
//!    of a lookup (absent SPI: index only; `SaDb::get`: slot + SA; dependent lookups: latency),
//!    a model of other index layouts over the same SAs (staged batch, SA pointer in the bucket)
//!    and memory references (dependent and independent random loads over 16 MiB / 1 GiB); and
//!    the **whole inbound path**: bursts of 32 pre-built ESP packets (64-byte inner IPv4
//!    packets, sealed with each SA's key by `espgw-crypto`) through
//!    `Pipeline::process(PortId::Wan, ..)`, SPIs spread over the 1,000,000 SAs vs all on one SA
//!    (only `process` is timed; every packet must come out `TxLan`).
//!
//! Output: a table, then one JSON line per figure (`{"bench":"espgw-sa-scale",...}`), and the
//! share of the CPUs other processes used during the run (compare runs only when it is ~0).
//! Ring segments live in `/dev/shm/espgw-sa-scale-<pid>-<n>` and are removed at the end, on
//! error and on SIGINT/SIGTERM/SIGHUP.

use clap::{Parser, ValueEnum};
use crossbeam_epoch as epoch;
use espgw_crypto::{
    CryptoProvider, EspOp, OpStatus, SaCrypto, SaKeys, SoftwareProvider, WorkerCtx,
};
use espgw_dataplane::config::{self, PortId};
use espgw_dataplane::counters::DropReason;
use espgw_dataplane::demo::udp4_frame;
use espgw_dataplane::pipeline::{Frame, Network, Pipeline, Verdict};
use espgw_dataplane::replay::HEADROOM;
use espgw_dataplane::ringapply::{Applier, sa_params};
use espgw_dataplane::sa::{Sa, SaId, SaParams};
use espgw_dataplane::sadb::SaDb;
use espgw_ring as er;
use espgw_wire::{esp, ethernet, ip, ipv4};
use serde_json::{Value, json};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

/// First SPI; SA `i` has SPI `SPI_BASE + i`.
const SPI_BASE: u32 = 0x1000_0000;
/// SPIs that no SA has (index-only lookups) start here.
const ABSENT_SPI_BASE: u32 = 0x4000_0000;
/// Data-plane clock: SAs installed at `T0`, packets one second later (as in `benches/esp.rs`).
const T0: u64 = 1_700_000_000_000_000_000;
const NOW: u64 = T0 + 1_000_000_000;
/// Lookups and packets per batch, as the workers do.
const BATCH: usize = 32;
/// Inner IPv4 packet of the ESP packets (IP + UDP header + payload), as in `esp.rs`.
const INNER: usize = 64;
/// The SA transform: AES-128-GCM, 16-byte ICV.
const TRANSFORM: &str = "aes128gcm16";
const REPLAY_WINDOW: u32 = 1024;
/// Targets of issue 4.
const TARGET_INSTALLS: f64 = 500_000.0;
const TARGET_LOOKUP_RATIO: f64 = 0.5;
/// UMEM-like buffer per frame (a usual AF_XDP chunk).
const CHUNK: usize = 2048;
/// No answer for this long: the run has stalled.
const STALL: Duration = Duration::from_secs(60);

/// The gateway (SA local address) and its peer (SA remote address).
const GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Installs and deletes through the ring.
    Ring,
    /// RSS per SA.
    Memory,
    /// Inbound lookups and the inbound packet path.
    Lookup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mix {
    /// SA i is inbound for even i, outbound for odd i.
    Half,
    /// Every SA inbound.
    In,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Mix::Half => "half inbound / half outbound",
            Mix::In => "all inbound",
        }
    }
    fn direction(self, i: u64) -> er::Direction {
        match self {
            Mix::Half if i % 2 == 1 => er::Direction::Out,
            _ => er::Direction::In,
        }
    }
}

/// SA-database scaling figures (issue 4), each next to its same-run baseline.
#[derive(Debug, Parser)]
#[command(name = "espgw-sa-scale")]
struct Args {
    /// Small sizes, for a CI smoke run (< 10 s): 5,000 SAs through the ring, memory at 1 / 1,000
    /// / 10,000 SAs, lookups over 10,000 SAs. Explicit options still override.
    #[arg(long)]
    quick: bool,
    /// SA counts pushed through the ring (comma-separated).
    #[arg(long, value_delimiter = ',')]
    sas: Option<Vec<u64>>,
    /// SA counts for the memory figure (comma-separated).
    #[arg(long, value_delimiter = ',')]
    mem_sas: Option<Vec<u64>>,
    /// Direction mix of the memory figure (the largest count is also measured all inbound).
    #[arg(long, value_enum, default_value_t = Mix::Half)]
    mem_mix: Mix,
    /// Inbound SAs of the "many" lookup / packet case.
    #[arg(long)]
    lookup_sas: Option<u64>,
    /// Lookups per case and repetition.
    #[arg(long)]
    lookups: Option<usize>,
    /// ESP packets per case (each is decrypted once: fresh sequence numbers).
    #[arg(long)]
    packets: Option<usize>,
    /// Repetitions of each lookup case (alternating 1 SA / many SAs; median and range shown).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Records the control side keeps unacknowledged.
    #[arg(long, default_value_t = 2048)]
    window: u64,
    /// Slots of each ring (power of two).
    #[arg(long, default_value_t = 4096)]
    ring_slots: u32,
    /// Run only these parts (comma-separated; default all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Internal: measure the memory of N SAs in this (fresh) process and print one JSON line.
    #[arg(long, hide = true)]
    mem_child: Option<u64>,
}

/// The resolved parameters of a run.
#[derive(Debug, Clone)]
struct Params {
    quick: bool,
    sas: Vec<u64>,
    mem_sas: Vec<u64>,
    mem_mix: Mix,
    lookup_sas: u64,
    lookups: usize,
    packets: usize,
    reps: usize,
    window: u64,
    ring: er::RingParams,
    chase_small: usize,
    chase_large: usize,
    chase_steps: usize,
}

impl Params {
    fn from(a: &Args) -> Self {
        let q = a.quick;
        Params {
            quick: q,
            sas: a.sas.clone().unwrap_or(if q {
                vec![5_000]
            } else {
                vec![100_000, 1_000_000]
            }),
            mem_sas: a.mem_sas.clone().unwrap_or(if q {
                vec![1, 1_000, 10_000]
            } else {
                vec![1, 1_000, 100_000, 1_000_000]
            }),
            mem_mix: a.mem_mix,
            lookup_sas: a.lookup_sas.unwrap_or(if q { 10_000 } else { 1_000_000 }),
            lookups: a.lookups.unwrap_or(if q { 1 << 16 } else { 1 << 22 }),
            packets: a.packets.unwrap_or(if q { 4_096 } else { 262_144 }),
            reps: a.reps.max(1),
            window: a.window.max(1),
            ring: er::RingParams {
                to_dp_slots: a.ring_slots,
                from_dp_slots: a.ring_slots,
                ..er::RingParams::default()
            },
            chase_small: if q { 4 << 20 } else { 16 << 20 },
            chase_large: if q { 64 << 20 } else { 1 << 30 },
            chase_steps: if q { 200_000 } else { 2_000_000 },
        }
    }

    fn json(&self) -> Value {
        json!({
            "quick": self.quick,
            "ring_sas": self.sas,
            "mem_sas": self.mem_sas,
            "lookup_sas": self.lookup_sas,
            "lookups": self.lookups,
            "packets": self.packets,
            "reps": self.reps,
            "window": self.window,
            "ring_slots": self.ring.to_dp_slots,
            "record_size": self.ring.record_size,
            "transform": TRANSFORM,
            "replay_window": REPLAY_WINDOW,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory names: /dev/shm/espgw-sa-scale-<pid>-<n>, removed on drop and on signals.

static LIVE_SEGMENTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live_segments() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE_SEGMENTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A segment path owned by this process; the file is removed when this is dropped.
#[derive(Debug)]
struct ShmPath(PathBuf);

impl ShmPath {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!(
            "/dev/shm/espgw-sa-scale-{}-{n}",
            std::process::id()
        ));
        live_segments().push(p.clone());
        ShmPath(p)
    }
}

impl Drop for ShmPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        live_segments().retain(|p| *p != self.0);
    }
}

/// On SIGINT/SIGTERM/SIGHUP: remove the segments, then exit.
fn cleanup_on_signals() -> Res<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("cleanup".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                for p in live_segments().iter() {
                    let _ = std::fs::remove_file(p);
                }
                eprintln!("espgw-sa-scale: signal {sig}, segments removed");
                std::process::exit(128 + sig);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SAs.

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// A random permutation of `0..n`.
fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut r = Rng(seed);
    for i in (1..n).rev() {
        let j = r.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// AES-128 key (16 bytes) followed by the GCM salt (4 bytes) of SA `i` (benchmark keys).
fn key_material(i: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&splitmix(i ^ 0xA5A5_0000_0000).to_le_bytes());
    k[8..16].copy_from_slice(&splitmix(i ^ 0x5A5A_0000_0000_0000).to_le_bytes());
    k[16..].copy_from_slice(&splitmix(i.wrapping_mul(3)).to_le_bytes()[..4]);
    k
}

fn spi_of(i: u64) -> u32 {
    SPI_BASE.wrapping_add(i as u32)
}

/// SA `i` as the control process sends it: AES-128-GCM (16-byte ICV), its own SPI, name and
/// key, tunnel mode, 1024-packet replay window (used when inbound), lifetimes in seconds,
/// one traffic selector 10.1.0.0/16 → 10.2.0.0/16.
fn sa_spec(i: u64, direction: er::Direction) -> er::SaSpec {
    let k = key_material(i);
    let prefix = |a: [u8; 4]| er::IpPrefix {
        addr: IpAddr::V4(Ipv4Addr::from(a)),
        len: 16,
    };
    er::SaSpec {
        generation: i + 1,
        spi: spi_of(i),
        direction,
        mode: er::Mode::Tunnel,
        reqid: i as u32,
        name: format!("sa-{i}"),
        local: IpAddr::V4(GW),
        remote: IpAddr::V4(PEER),
        encap: None,
        enc_alg: er::EncAlg::Aes128Gcm16,
        integ_alg: er::IntegAlg::None,
        enc_key: er::Key::new(&k[..16]).unwrap_or_default(),
        salt: er::Key::new(&k[16..]).unwrap_or_default(),
        integ_key: er::Key::empty(),
        icv_len: 16,
        esn: false,
        initial_seq: 0,
        replay_window: REPLAY_WINDOW,
        lifetime: er::Lifetimes {
            soft_seconds: 3300,
            hard_seconds: 3600,
            ..er::Lifetimes::default()
        },
        selectors: vec![er::Selector {
            src: prefix([10, 1, 0, 0]),
            dst: prefix([10, 2, 0, 0]),
            protocol: 0,
            src_ports: er::PortRange::ANY,
            dst_ports: er::PortRange::ANY,
        }],
        df: er::DfMode::Copy,
        dscp: er::DscpMode::Copy,
        ecn: er::EcnMode::Normal,
        outer_ttl: 64,
    }
}

/// SA `i` as `SaDb::install` takes it (converted the way the applier converts a record).
fn params_of(i: u64, direction: er::Direction) -> Res<SaParams> {
    sa_params(&sa_spec(i, direction))
}

fn install(db: &SaDb, i: u64, direction: er::Direction) -> Res<SaId> {
    db.install(params_of(i, direction)?, &SoftwareProvider, T0)
        .map_err(|e| format!("install of SA {i}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Measurements helpers.

/// Resident set size of this process, from `/proc/self/status` (`VmRSS`).
fn rss_bytes() -> Res<u64> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no VmRSS in /proc/self/status".into())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// Spin briefly, then yield: the machine has 2 vCPUs and other jobs may want one.
fn backoff(idle: &mut u32) {
    *idle = idle.saturating_add(1);
    if *idle < 256 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// One printed figure.
#[derive(Debug)]
struct Figure {
    id: String,
    what: String,
    value: f64,
    unit: &'static str,
    /// (min, max) over the repetitions of this run, when repeated.
    spread: Option<(f64, f64)>,
    baselines: Vec<(String, f64)>,
    /// value ÷ the first baseline, when that is the comparison that matters.
    ratio: Option<f64>,
    target: Option<String>,
    met: Option<bool>,
    extra: Value,
}

impl Figure {
    fn new(id: impl Into<String>, what: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Figure {
            id: id.into(),
            what: what.into(),
            value,
            unit,
            spread: None,
            baselines: Vec::new(),
            ratio: None,
            target: None,
            met: None,
            extra: Value::Null,
        }
    }
    fn baseline(mut self, name: impl Into<String>, v: f64) -> Self {
        self.baselines.push((name.into(), v));
        self
    }
}

fn fmt_num(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        "/s" | "lookups/s" | "packets/s" | "installs/s" | "deletes/s" => {
            if v >= 1e6 {
                format!("{:.2} M{unit}", v / 1e6)
            } else {
                format!("{:.0} k{unit}", v / 1e3)
            }
        }
        "bytes" | "B" => {
            if v >= 10.0 * 1024.0 * 1024.0 {
                format!("{:.1} MiB", v / 1024.0 / 1024.0)
            } else {
                format!("{v:.0} B")
            }
        }
        "ns" => format!("{v:.1} ns"),
        _ => format!("{v:.3} {unit}"),
    }
}

fn print_figures(figs: &[Figure], params: &Params) {
    println!();
    println!("## Figures");
    println!();
    println!("| figure | value | same-run baseline(s) | ratio | target | status |");
    println!("|---|---:|---|---:|---|---|");
    for f in figs {
        let mut v = fmt_num(f.value, f.unit);
        if let Some((lo, hi)) = f.spread {
            v = format!("{v} ({}–{})", fmt_num(lo, f.unit), fmt_num(hi, f.unit));
        }
        let b = f
            .baselines
            .iter()
            .map(|(n, x)| format!("{n}: {}", fmt_num(*x, f.unit)))
            .collect::<Vec<_>>()
            .join("; ");
        let r = f.ratio.map(|r| format!("{r:.3}")).unwrap_or_default();
        let st = match f.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        println!(
            "| {} | {v} | {b} | {r} | {} | {st} |",
            f.what,
            f.target.clone().unwrap_or_default()
        );
    }
    println!();
    for f in figs {
        let line = json!({
            "bench": "espgw-sa-scale",
            "figure": f.id,
            "what": f.what,
            "value": f.value,
            "unit": f.unit,
            "spread": f.spread.map(|(a, b)| json!([a, b])),
            "baselines": f.baselines.iter().map(|(n, x)| json!({"name": n, "value": x})).collect::<Vec<_>>(),
            "ratio": f.ratio,
            "target": f.target,
            "met": f.met,
            "extra": f.extra,
            "params": params.json(),
        });
        println!("{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Installs through the ring.

enum DataPlane {
    /// Decode and answer `Applied`, nothing else.
    RingOnly,
    /// The real applier into this database.
    Applier(Arc<SaDb>),
}

#[derive(Debug, Default)]
struct PhaseResult {
    secs: f64,
    /// Wall time the data plane's thread spent in productive `poll`s during the phase.
    dp_busy_secs: f64,
    rejected: u64,
    first_rejection: Option<String>,
}

/// Pushes `n` records made by `make`, keeping at most `window` unanswered; returns when every
/// one is answered.
fn push_all(
    tx: &mut er::Producer,
    rx: &mut er::Consumer,
    n: u64,
    window: u64,
    make: impl Fn(u64) -> er::Record,
) -> Res<PhaseResult> {
    let start = Instant::now();
    let mut res = PhaseResult::default();
    let (mut pushed, mut answered) = (0u64, 0u64);
    let mut held: Option<er::Record> = None;
    let mut last_progress = Instant::now();
    let mut idle = 0u32;
    while answered < n {
        let mut progress = false;
        while let Some(r) = rx.try_pop().map_err(|e| format!("answers: {e}"))? {
            match r.record {
                Ok(er::Record::Applied { .. }) => answered += 1,
                Ok(er::Record::Rejected { reason, .. }) => {
                    answered += 1;
                    res.rejected += 1;
                    res.first_rejection.get_or_insert(reason);
                }
                Ok(_) => {} // lifetime events: none expected
                Err(e) => return Err(format!("bad answer: {e}")),
            }
            progress = true;
        }
        while pushed < n && pushed - answered < window {
            let rec = match held.take() {
                Some(r) => r,
                None => make(pushed),
            };
            match tx.try_push(&rec) {
                Ok(_) => {
                    pushed += 1;
                    progress = true;
                }
                Err(er::PushError::Full) => {
                    held = Some(rec);
                    break;
                }
                Err(e) => return Err(format!("push: {e}")),
            }
        }
        if progress {
            idle = 0;
            last_progress = Instant::now();
        } else {
            if last_progress.elapsed() > STALL {
                return Err(format!(
                    "stalled: {pushed} pushed, {answered} answered of {n}"
                ));
            }
            backoff(&mut idle);
        }
    }
    res.secs = start.elapsed().as_secs_f64();
    Ok(res)
}

/// The data plane's thread for [`ring_run`].
fn data_plane_thread(
    path: PathBuf,
    params: er::RingParams,
    dp: DataPlane,
    stop: Arc<AtomicBool>,
    busy_ns: Arc<AtomicU64>,
    ready: mpsc::Sender<Res<()>>,
) -> Res<u64> {
    let mut idle = 0u32;
    match dp {
        DataPlane::RingOnly => {
            let seg = match er::Segment::create(&path, params) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return Err(e.to_string());
                }
            };
            let mut cmds = seg.receiver().map_err(|e| e.to_string())?;
            let mut answers = seg.sender().map_err(|e| e.to_string())?;
            let _ = ready.send(Ok(()));
            let mut handled = 0u64;
            loop {
                let answer = match cmds.peek().map_err(|e| e.to_string())? {
                    Some(p) => {
                        let seq = p.seq();
                        let a = match p.record() {
                            Ok(r) => {
                                black_box(r);
                                er::Record::Applied { seq }
                            }
                            Err(e) => er::Record::rejected(seq, e),
                        };
                        p.commit();
                        Some(a)
                    }
                    None => None,
                };
                match answer {
                    Some(a) => {
                        handled += 1;
                        idle = 0;
                        loop {
                            match answers.try_push(&a) {
                                Ok(_) => break,
                                Err(er::PushError::Full) if !stop.load(Ordering::Acquire) => {
                                    std::hint::spin_loop()
                                }
                                Err(e) => return Err(format!("answer: {e}")),
                            }
                        }
                    }
                    None if stop.load(Ordering::Acquire) => return Ok(handled),
                    None => backoff(&mut idle),
                }
            }
        }
        DataPlane::Applier(db) => {
            let provider: Arc<dyn CryptoProvider> = Arc::new(SoftwareProvider);
            let mut applier = match Applier::with_params(&path, params, db, provider) {
                Ok(a) => a,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return Err(e.to_string());
                }
            };
            let _ = ready.send(Ok(()));
            let clock = Instant::now();
            let mut handled = 0u64;
            loop {
                let t = clock.elapsed();
                let h = applier.poll(T0 + t.as_nanos() as u64);
                if h > 0 {
                    busy_ns.fetch_add((clock.elapsed() - t).as_nanos() as u64, Ordering::Relaxed);
                    handled += h as u64;
                    idle = 0;
                } else if stop.load(Ordering::Acquire) {
                    if applier.events_lost() > 0 {
                        return Err(format!("{} events lost", applier.events_lost()));
                    }
                    return Ok(handled);
                } else {
                    backoff(&mut idle);
                }
            }
        }
    }
}

#[derive(Debug)]
struct RingRun {
    install: PhaseResult,
    delete: PhaseResult,
}

/// `n` AddSa then `n` DeleteSa through a fresh segment, the data plane on its own thread.
fn ring_run(n: u64, p: &Params, dp: DataPlane) -> Res<RingRun> {
    let shm = ShmPath::new();
    let db = match &dp {
        DataPlane::Applier(db) => Some(Arc::clone(db)),
        DataPlane::RingOnly => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = {
        let (path, params, stop, busy) =
            (shm.0.clone(), p.ring, Arc::clone(&stop), Arc::clone(&busy));
        std::thread::Builder::new()
            .name("sa-scale-dp".into())
            .spawn(move || data_plane_thread(path, params, dp, stop, busy, ready_tx))
            .map_err(|e| e.to_string())?
    };
    let control = || -> Res<RingRun> {
        ready_rx
            .recv_timeout(STALL)
            .map_err(|e| format!("data plane did not start: {e}"))??;
        let seg = er::Segment::attach(&shm.0).map_err(|e| e.to_string())?;
        let mut tx = seg.sender().map_err(|e| e.to_string())?;
        let mut rx = seg.receiver().map_err(|e| e.to_string())?;
        let mix = Mix::Half;
        let mut install = push_all(&mut tx, &mut rx, n, p.window, |i| {
            er::Record::AddSa(Box::new(sa_spec(i, mix.direction(i))))
        })?;
        let busy_install = busy.load(Ordering::Relaxed);
        install.dp_busy_secs = busy_install as f64 / 1e9;
        if let Some(db) = &db
            && db.len() as u64 != n
        {
            return Err(format!("{} SAs installed, expected {n}", db.len()));
        }
        let mut delete = push_all(&mut tx, &mut rx, n, p.window, |i| {
            er::Record::DeleteSa(er::SaRef {
                direction: mix.direction(i),
                spi: spi_of(i),
                generation: i + 1,
            })
        })?;
        delete.dp_busy_secs = (busy.load(Ordering::Relaxed) - busy_install) as f64 / 1e9;
        if let Some(db) = &db
            && !db.is_empty()
        {
            return Err(format!("{} SAs left after the deletes", db.len()));
        }
        Ok(RingRun { install, delete })
    };
    let result = control();
    stop.store(true, Ordering::Release);
    let dp_result = thread
        .join()
        .map_err(|_| "data-plane thread panicked".to_string())?;
    let run = result?;
    dp_result?;
    for ph in [&run.install, &run.delete] {
        if ph.rejected > 0 {
            return Err(format!(
                "{} records rejected, first: {}",
                ph.rejected,
                ph.first_rejection.clone().unwrap_or_default()
            ));
        }
    }
    Ok(run)
}

/// `SaDb::install` then `SaDb::remove` of `n` SAs in this thread (parameters built untimed).
fn direct_run(n: u64) -> Res<(f64, f64)> {
    let db = SaDb::new(n as usize);
    let params = (0..n)
        .map(|i| params_of(i, Mix::Half.direction(i)))
        .collect::<Res<Vec<_>>>()?;
    let mut ids = Vec::with_capacity(n as usize);
    let t = Instant::now();
    for p in params {
        ids.push(
            db.install(p, &SoftwareProvider, T0)
                .map_err(|e| e.to_string())?,
        );
    }
    let install = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for id in ids {
        db.remove(id).map_err(|e| e.to_string())?;
    }
    let remove = t.elapsed().as_secs_f64();
    Ok((n as f64 / install, n as f64 / remove))
}

fn ring_part(p: &Params, figs: &mut Vec<Figure>) -> Res<()> {
    for &n in &p.sas {
        println!("ring: {n} SAs ...");
        let base = ring_run(n, p, DataPlane::RingOnly)?;
        let db = Arc::new(SaDb::new(n as usize));
        let real = ring_run(n, p, DataPlane::Applier(Arc::clone(&db)))?;
        drop(db);
        // Again, into a fresh SaDb: the allocator now hands out memory the first run freed,
        // as it does for a gateway that has been rekeying for a while.
        let db = Arc::new(SaDb::new(n as usize));
        let again = ring_run(n, p, DataPlane::Applier(Arc::clone(&db)))?;
        drop(db);
        let (direct_install, direct_remove) = direct_run(n)?;
        let rate = |ph: &PhaseResult| n as f64 / ph.secs;
        // The first fill, then the second (memory reused), each against the same baselines.
        for (id, what, run) in [
            ("ring_installs", "first fill (applier + SaDb)", &real),
            ("ring_reinstalls", "second fill (memory reused)", &again),
        ] {
            let inst = rate(&run.install);
            let mut f = Figure::new(
                format!("{id}_{n}"),
                format!("SA installs through the ring, {n} SAs, {what}"),
                inst,
                "installs/s",
            )
            .baseline("ring only (decode + Applied)", rate(&base.install))
            .baseline("direct SaDb::install, 1 thread", direct_install);
            f.target = Some("≥ 500 k/s".into());
            f.met = Some(inst >= TARGET_INSTALLS);
            f.ratio = Some(inst / rate(&base.install));
            f.extra = json!({"sas": n, "mix": Mix::Half.name(), "window": p.window,
                "secs": run.install.secs, "ring_only_secs": base.install.secs,
                "applier_busy_secs": run.install.dp_busy_secs});
            figs.push(f);
        }
        let del = rate(&real.delete);
        let mut f = Figure::new(
            format!("ring_deletes_{n}"),
            format!("SA deletes through the ring, {n} SAs"),
            del,
            "deletes/s",
        )
        .baseline("ring only (decode + Applied)", rate(&base.delete))
        .baseline("direct SaDb::remove, 1 thread", direct_remove);
        f.ratio = Some(del / rate(&base.delete));
        f.extra = json!({"sas": n, "secs": real.delete.secs,
            "applier_busy_secs": real.delete.dp_busy_secs});
        figs.push(f);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Memory.

/// In a fresh process: RSS before, with the empty `SaDb`, after installing `n` SAs.
fn mem_child(n: u64, mix: Mix) -> Res<()> {
    let rss_start = rss_bytes()?;
    let db = SaDb::new(n.max(1) as usize);
    let rss_empty = rss_bytes()?;
    let mut first_in = None;
    let mut first_out = None;
    for i in 0..n {
        let d = mix.direction(i);
        let id = install(&db, i, d)?;
        match d {
            er::Direction::In => first_in = first_in.or(Some(id)),
            er::Direction::Out => first_out = first_out.or(Some(id)),
        }
    }
    let rss_full = rss_bytes()?;
    let guard = epoch::pin();
    let parts = |id: Option<SaId>| -> Value {
        match id.and_then(|id| db.get(id, &guard)) {
            None => Value::Null,
            Some(sa) => json!({
                "crypto_heap": std::mem::size_of_val(&*sa.crypto),
                "replay_bitmap_heap": sa.replay.bitmap_bytes(),
                "name_heap": sa.name.capacity(),
                "selectors_heap": sa.selectors.capacity()
                    * std::mem::size_of::<espgw_dataplane::policy::Selector>(),
            }),
        }
    };
    let line = json!({
        "n": n,
        "mix": mix.name(),
        "rss_start": rss_start,
        "rss_empty": rss_empty,
        "rss_full": rss_full,
        "in": parts(first_in),
        "out": parts(first_out),
    });
    drop(guard);
    println!("{line}");
    Ok(())
}

fn run_mem_child(n: u64, mix: Mix) -> Res<Value> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mix_arg = match mix {
        Mix::Half => "half",
        Mix::In => "in",
    };
    let out = std::process::Command::new(exe)
        .args(["--mem-child", &n.to_string(), "--mem-mix", mix_arg])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "memory child for {n} SAs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("memory child output {line:?}: {e}"))
}

/// Sizes that do not need a live SA.
fn static_sizes() -> Value {
    use espgw_dataplane::antireplay::ReplayWindow;
    use espgw_dataplane::policy::Selector;
    use espgw_dataplane::sa::SaCounters;
    json!({
        "Sa": std::mem::size_of::<Sa>(),
        "Sa_align": std::mem::align_of::<Sa>(),
        "apart_padding": 2 * espgw_dataplane::sa::APART,
        "SaCounters": std::mem::size_of::<SaCounters>(),
        "drop_array": std::mem::size_of::<espgw_dataplane::counters::DropReasonArray>(),
        "drop_reasons": DropReason::COUNT,
        "ReplayWindow (inline)": std::mem::size_of::<ReplayWindow>(),
        "Selector": std::mem::size_of::<Selector>(),
        "Box<dyn SaCrypto>": std::mem::size_of::<Box<dyn SaCrypto>>(),
        "ring LessSafeKey": std::mem::size_of::<ring::aead::LessSafeKey>(),
        "SaParams": std::mem::size_of::<SaParams>(),
    })
}

fn memory_part(p: &Params, figs: &mut Vec<Figure>) -> Res<Value> {
    let mut runs: Vec<(u64, Mix)> = p.mem_sas.iter().map(|&n| (n, p.mem_mix)).collect();
    if let Some(&max) = p.mem_sas.iter().max()
        && p.mem_mix != Mix::In
    {
        runs.push((max, Mix::In));
    }
    let mut detail = Vec::new();
    for (n, mix) in runs {
        println!("memory: {n} SAs ({}) in a child process ...", mix.name());
        let v = run_mem_child(n, mix)?;
        let get = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as f64;
        let empty = get("rss_empty") - get("rss_start");
        let added = get("rss_full") - get("rss_empty");
        let per_sa = added / n.max(1) as f64;
        let mut f = Figure::new(
            format!(
                "mem_per_sa_{n}_{}",
                if mix == Mix::In { "in" } else { "half" }
            ),
            format!("RSS per SA, {n} SAs ({}), SaDb capacity {n}", mix.name()),
            per_sa,
            "B",
        )
        .baseline("RSS of the empty SaDb", empty)
        .baseline("RSS added by the SAs", added)
        .baseline("RSS before the SaDb", get("rss_start"));
        f.extra = v.clone();
        figs.push(f);
        detail.push(v);
    }
    Ok(json!({"static": static_sizes(), "children": detail}))
}

// ---------------------------------------------------------------------------------------------
// 3. Lookups and the inbound packet path.

/// Network of the receiving gateway (as `config_in` in `esp.rs`), with an empty SA database
/// of `capacity`.
fn receiver(capacity: u64) -> Res<(Arc<SaDb>, Arc<Network>)> {
    let text = format!(
        r#"[dataplane]
replay_window = {REPLAY_WINDOW}
max_sas = {capacity}
[dataplane.wan]
mac = "02:00:00:00:0b:01"
addresses = ["203.0.113.2/24"]
[dataplane.lan]
mac = "02:00:00:00:0b:02"
addresses = ["10.2.0.1/16"]

[[neighbor]]
ip = "10.2.0.20"
mac = "02:00:00:00:0c:20"
"#
    );
    let cfg = config::parse_str(&text, Path::new("sa-scale.toml")).map_err(|e| e.to_string())?;
    config::instantiate(cfg, &SoftwareProvider, T0).map_err(|e| e.to_string())
}

/// Times `lookup_inbound` over `spis` in batches of 32, one pin per batch; ns per lookup and
/// how many found nothing.
fn time_lookups(db: &SaDb, spis: &[u32]) -> (f64, usize) {
    let dst = IpAddr::V4(GW);
    let mut acc = 0u64;
    let mut missing = 0usize;
    let t = Instant::now();
    for chunk in spis.chunks(BATCH) {
        let guard = epoch::pin();
        for &spi in chunk {
            match db.lookup_inbound(spi, dst, &guard) {
                Some(sa) => acc = acc.wrapping_add(sa.id.0),
                None => missing += 1,
            }
        }
    }
    black_box(acc);
    (t.elapsed().as_nanos() as f64 / spis.len() as f64, missing)
}

/// Each lookup's SPI depends on the SA the previous one returned (`spi ^ (top bit of the SA's
/// slot generation)`, always `spi` since generations here are small, but neither the compiler
/// nor the CPU knows; not `sa.spi`, which the compiler knows equals the argument): the misses
/// of one lookup cannot overlap with the next one's, so this is the latency.
fn time_dependent_lookups(db: &SaDb, spis: &[u32]) -> Res<f64> {
    let dst = IpAddr::V4(GW);
    let mut dep = 0u32;
    let t = Instant::now();
    for chunk in spis.chunks(BATCH) {
        let guard = epoch::pin();
        for &spi in chunk {
            dep = db
                .lookup_inbound(spi ^ dep, dst, &guard)
                .ok_or("dependent lookup failed")?
                .id
                .generation()
                & 0x8000_0000;
        }
    }
    black_box(dep);
    Ok(t.elapsed().as_nanos() as f64 / spis.len() as f64)
}

/// `SaDb::get` (slot pointer + SA) over `ids` in batches of 32.
fn time_gets(db: &SaDb, ids: &[SaId]) -> f64 {
    let mut acc = 0u64;
    let t = Instant::now();
    for chunk in ids.chunks(BATCH) {
        let guard = epoch::pin();
        for &id in chunk {
            if let Some(sa) = db.get(id, &guard) {
                acc = acc.wrapping_add(u64::from(sa.spi));
            }
        }
    }
    black_box(acc);
    t.elapsed().as_nanos() as f64 / ids.len() as f64
}

/// A model of the SPI index (not the `SaDb` code: the same hash, load factor and bucket
/// encoding, over the same `Sa` objects) to estimate what other lookup schemes would give.
struct IndexModel<'g> {
    /// `(spi << 32) | (slot + 1)`, 0 = empty, as in `SaDb`.
    buckets: Vec<u64>,
    /// The SA pointer next to the SPI (the "pointer in the bucket" variant).
    pairs: Vec<(u32, Option<&'g Sa>)>,
    slots: Vec<&'g Sa>,
    mask: usize,
}

impl<'g> IndexModel<'g> {
    fn home(&self, spi: u32) -> usize {
        ((u64::from(spi).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize) & self.mask
    }

    fn new(db: &SaDb, ids: &[SaId], guard: &'g epoch::Guard) -> Res<Self> {
        let n = (ids.len().max(8) * 2).next_power_of_two();
        let mut m = IndexModel {
            buckets: vec![0; n],
            pairs: vec![(0, None); n],
            slots: Vec::with_capacity(ids.len()),
            mask: n - 1,
        };
        for (slot, id) in ids.iter().enumerate() {
            let sa = db.get(*id, guard).ok_or("SA vanished")?;
            m.slots.push(sa);
            let mut h = m.home(sa.spi);
            while m.buckets[h] != 0 {
                h = (h + 1) & m.mask;
            }
            m.buckets[h] = (u64::from(sa.spi) << 32) | (slot as u64 + 1);
            m.pairs[h] = (sa.spi, Some(sa));
        }
        Ok(m)
    }

    /// One lookup after the other, as `SaDb::lookup_inbound` does.
    fn find(&self, spi: u32) -> Option<&'g Sa> {
        let mut h = self.home(spi);
        loop {
            let e = self.buckets[h];
            if e == 0 {
                return None;
            }
            if (e >> 32) as u32 == spi {
                let sa = self.slots[((e & 0xFFFF_FFFF) - 1) as usize];
                if sa.spi == spi {
                    return Some(sa);
                }
            }
            h = (h + 1) & self.mask;
        }
    }

    /// A batch in stages: every bucket of the batch is loaded before any is examined, then
    /// every slot pointer, then every SA, so that the misses of one stage overlap.
    fn find_batch(&self, spis: &[u32], out: &mut [Option<&'g Sa>; BATCH]) {
        let mut e = [0u64; BATCH];
        for (j, &spi) in spis.iter().enumerate() {
            e[j] = self.buckets[self.home(spi)];
        }
        let mut slot = [usize::MAX; BATCH];
        for (j, &spi) in spis.iter().enumerate() {
            if (e[j] >> 32) as u32 == spi && e[j] != 0 {
                slot[j] = ((e[j] & 0xFFFF_FFFF) - 1) as usize;
            } else if e[j] != 0 {
                // Not in its home bucket: probe on (the line is cached now).
                let mut h = (self.home(spi) + 1) & self.mask;
                while self.buckets[h] != 0 {
                    if (self.buckets[h] >> 32) as u32 == spi {
                        slot[j] = ((self.buckets[h] & 0xFFFF_FFFF) - 1) as usize;
                        break;
                    }
                    h = (h + 1) & self.mask;
                }
            }
        }
        for j in 0..spis.len() {
            out[j] = self.slots.get(slot[j]).copied();
        }
        for (j, &spi) in spis.iter().enumerate() {
            if out[j].is_some_and(|sa| sa.spi != spi) {
                out[j] = None;
            }
        }
    }

    /// Staged, with the SA pointer in the bucket (one dependent hop less).
    fn find_batch_pairs(&self, spis: &[u32], out: &mut [Option<&'g Sa>; BATCH]) {
        for (j, &spi) in spis.iter().enumerate() {
            let mut h = self.home(spi);
            out[j] = None;
            loop {
                let (s, p) = self.pairs[h];
                if p.is_none() {
                    break;
                }
                if s == spi {
                    out[j] = p;
                    break;
                }
                h = (h + 1) & self.mask;
            }
        }
        for (j, &spi) in spis.iter().enumerate() {
            if out[j].is_some_and(|sa| sa.spi != spi) {
                out[j] = None;
            }
        }
    }
}

/// ns per lookup for the model's three schemes: one by one, staged, staged with pointers.
fn time_model(m: &IndexModel<'_>, spis: &[u32]) -> Res<[f64; 3]> {
    let mut r = [0.0; 3];
    let mut acc = 0u64;
    let t = Instant::now();
    for &spi in spis {
        acc = acc.wrapping_add(m.find(spi).ok_or("model: not found")?.id.0);
    }
    r[0] = t.elapsed().as_nanos() as f64 / spis.len() as f64;
    let mut out = [None; BATCH];
    for (k, f) in [IndexModel::find_batch, IndexModel::find_batch_pairs]
        .into_iter()
        .enumerate()
    {
        let t = Instant::now();
        for chunk in spis.chunks(BATCH) {
            f(m, chunk, &mut out);
            for sa in &out[..chunk.len()] {
                acc = acc.wrapping_add(sa.ok_or("model: not found")?.id.0);
            }
        }
        r[k + 1] = t.elapsed().as_nanos() as f64 / spis.len() as f64;
    }
    black_box(acc);
    Ok(r)
}

/// Dependent loads over a random cycle through `bytes` of memory, one load per 64-byte line:
/// ns per load (memory latency at that working-set size, TLB misses included).
fn chase_ns(bytes: usize, steps: usize, seed: u64) -> f64 {
    let lines = (bytes / 64).max(2);
    let order = permutation(lines, seed);
    let mut mem = vec![0u64; lines * 8];
    for w in 0..lines {
        let from = order[w] as usize;
        let to = order[(w + 1) % lines] as usize;
        mem[from * 8] = to as u64;
    }
    let mut at = order[0] as usize;
    let t = Instant::now();
    for _ in 0..steps {
        at = mem[at * 8] as usize;
    }
    black_box(at);
    t.elapsed().as_nanos() as f64 / steps as f64
}

/// Independent loads of random lines in `bytes` of memory (indices generated beforehand and
/// read sequentially): ns per load when the CPU may overlap the misses.
fn gather_ns(bytes: usize, steps: usize, seed: u64) -> f64 {
    let lines = (bytes / 64).max(2);
    let mem = vec![1u64; lines * 8];
    let mut r = Rng(seed);
    let idx: Vec<u32> = (0..steps).map(|_| r.below(lines as u64) as u32).collect();
    let mut acc = 0u64;
    let t = Instant::now();
    for &i in &idx {
        acc = acc.wrapping_add(mem[i as usize * 8]);
    }
    black_box(acc);
    t.elapsed().as_nanos() as f64 / steps as f64
}

/// Ethernet + IPv4 + ESP (SA `i`, sequence number `seq`) carrying the 64-byte inner packet,
/// sealed with SA `i`'s keys by the crypto the data plane itself uses.
fn esp_frame(
    out: &mut [u8],
    i: u64,
    seq: u64,
    crypto: &dyn SaCrypto,
    ctx: &mut WorkerCtx,
    inner: &[u8],
) -> Res<()> {
    let pad = esp::pad_len(inner.len(), 16);
    let esp_len = 8 + 8 + inner.len() + pad + 2 + 16;
    let e = ethernet::HEADER_LEN;
    let i4 = e + ipv4::HEADER_LEN;
    if out.len() != i4 + esp_len {
        return Err("frame length".into());
    }
    let gw_mac = ethernet::EthernetAddress([2, 0, 0, 0, 0x0b, 1]);
    let peer_mac = ethernet::EthernetAddress([2, 0, 0, 0, 0x0a, 1]);
    ethernet::emit_header(out, gw_mac, peer_mac, None, ethernet::ethertype::IPV4)
        .map_err(|e| format!("{e:?}"))?;
    let h = ipv4::Ipv4Header {
        src: PEER,
        dst: GW,
        protocol: ip::protocol::ESP,
        ttl: 64,
        dscp: 0,
        ecn: 0,
        dont_frag: false,
        ident: seq as u16,
        payload_len: esp_len as u16,
    };
    ipv4::emit_header(&mut out[e..], &h).map_err(|e| format!("{e:?}"))?;
    let body = &mut out[i4..];
    body[..4].copy_from_slice(&spi_of(i).to_be_bytes());
    body[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
    body[16..16 + inner.len()].copy_from_slice(inner);
    esp::write_trailer(&mut body[16 + inner.len()..], pad, ip::protocol::IPIP)
        .map_err(|e| format!("{e:?}"))?;
    let mut ops = [EspOp::new(body, seq)];
    crypto.seal(&mut ops, ctx);
    if ops[0].status != OpStatus::Ok {
        return Err(format!("seal: {:?}", ops[0].status));
    }
    Ok(())
}

/// Pre-built ESP frames, `stride` apart.
#[derive(Debug)]
struct Packets {
    mem: Vec<u8>,
    len: usize,
    count: usize,
}

const STORE_STRIDE: usize = 192;

/// `count` frames; frame `k` on SA `sa_of(k)`, sequence numbers counting up per SA.
fn build_packets(count: usize, sas: u64, sa_of: impl Fn(usize) -> u64) -> Res<Packets> {
    let plain = udp4_frame(
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 2, 0, 20),
        40_000,
        5001,
        INNER - ipv4::HEADER_LEN - 8,
        64,
    );
    let inner = &plain[ethernet::HEADER_LEN..];
    let len = ethernet::HEADER_LEN
        + ipv4::HEADER_LEN
        + 16
        + inner.len()
        + esp::pad_len(inner.len(), 16)
        + 2
        + 16;
    let mut mem = vec![0u8; count * STORE_STRIDE];
    let mut seqs = vec![0u32; sas as usize];
    let mut ctx = WorkerCtx::new();
    let t = espgw_crypto::Transform::Aead {
        alg: espgw_crypto::AeadAlg::Aes128Gcm,
        icv_len: 16,
    };
    let mut cached: Option<(u64, Box<dyn SaCrypto>)> = None;
    for k in 0..count {
        let i = sa_of(k);
        let seq = {
            let s = &mut seqs[i as usize];
            *s += 1;
            u64::from(*s)
        };
        if cached.as_ref().is_none_or(|(c, _)| *c != i) {
            let keys = SaKeys::new(&key_material(i), &[]);
            let c = SoftwareProvider
                .new_sa(t, &keys, false)
                .map_err(|e| e.to_string())?;
            cached = Some((i, c));
        }
        let Some((_, crypto)) = cached.as_ref() else {
            unreachable!("set above");
        };
        esp_frame(
            &mut mem[k * STORE_STRIDE..k * STORE_STRIDE + len],
            i,
            seq,
            crypto.as_ref(),
            &mut ctx,
            inner,
        )?;
    }
    Ok(Packets { mem, len, count })
}

/// 32 UMEM-like buffers, cache-line aligned.
#[derive(Debug)]
struct BurstBuf {
    mem: Vec<u8>,
    base: usize,
}

impl BurstBuf {
    fn new() -> Self {
        let mem = vec![0u8; BATCH * CHUNK + 64];
        let base = (64 - mem.as_ptr().addr() % 64) % 64;
        BurstBuf { mem, base }
    }
}

#[derive(Debug, Default)]
struct PathResult {
    nanos: u128,
    packets: usize,
    forwarded: usize,
    first_other: Option<String>,
}

/// Runs packets `from..to` of `pk` through `pipe` in bursts of 32; only `process` is timed.
fn run_packets(
    pipe: &mut Pipeline,
    pk: &Packets,
    from: usize,
    to: usize,
    buf: &mut BurstBuf,
    r: &mut PathResult,
) -> Res<()> {
    let mut k = from;
    while k < to {
        let n = BATCH.min(to - k);
        let mem = &mut buf.mem[buf.base..];
        for j in 0..n {
            let src = &pk.mem[(k + j) * STORE_STRIDE..][..pk.len];
            mem[j * CHUNK + HEADROOM..][..pk.len].copy_from_slice(src);
        }
        let mut frames = mem
            .chunks_exact_mut(CHUNK)
            .take(n)
            .map(|c| Frame::new(c, HEADROOM, pk.len))
            .collect::<Option<Vec<_>>>()
            .ok_or("frame does not fit its buffer")?;
        let mut v = [Verdict::Drop(DropReason::Unsupported); BATCH];
        let t = Instant::now();
        pipe.process(PortId::Wan, &mut frames, &mut v[..n], NOW);
        r.nanos += t.elapsed().as_nanos();
        r.packets += n;
        for x in &v[..n] {
            if *x == Verdict::TxLan {
                r.forwarded += 1;
            } else if r.first_other.is_none() {
                r.first_other = Some(format!("{x:?}"));
            }
        }
        k += n;
    }
    Ok(())
}

fn lookup_part(p: &Params, figs: &mut Vec<Figure>) -> Res<Value> {
    let m = p.lookup_sas;
    println!("lookup: installing {m} inbound SAs (and 1 in a second database) ...");
    let (db_many, net_many) = receiver(m)?;
    let (db_one, net_one) = receiver(m)?;
    let t = Instant::now();
    let mut ids = Vec::with_capacity(m as usize);
    for i in 0..m {
        ids.push(install(&db_many, i, er::Direction::In)?);
    }
    let install_secs = t.elapsed().as_secs_f64();
    install(&db_one, 0, er::Direction::In)?;

    // SPIs: all installed SAs in random order, repeated up to `lookups`.
    let perm = permutation(m as usize, 7);
    let many: Vec<u32> = (0..p.lookups)
        .map(|k| spi_of(u64::from(perm[k % perm.len()])))
        .collect();
    let one: Vec<u32> = vec![spi_of(0); p.lookups];
    let mut rng = Rng(99);
    let absent: Vec<u32> = (0..p.lookups)
        .map(|_| ABSENT_SPI_BASE + rng.below(1 << 28) as u32)
        .collect();
    let ids_rand: Vec<SaId> = (0..p.lookups)
        .map(|k| ids[perm[k % perm.len()] as usize])
        .collect();
    let ids_one: Vec<SaId> = vec![ids[0]; p.lookups];

    let (mut r_one, mut r_many, mut r_absent_many, mut r_absent_one) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut r_get_many, mut r_get_one, mut r_dep_many, mut r_dep_one) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..p.reps {
        println!("lookup: repetition {} of {} ...", rep + 1, p.reps);
        let (ns, miss) = time_lookups(&db_one, &one);
        if miss != 0 {
            return Err(format!("{miss} lookups of the single SA failed"));
        }
        r_one.push(ns);
        let (ns, miss) = time_lookups(&db_many, &many);
        if miss != 0 {
            return Err(format!("{miss} lookups among {m} SAs failed"));
        }
        r_many.push(ns);
        let (ns, found) = time_lookups(&db_many, &absent);
        if found != absent.len() {
            return Err("an absent SPI was found".into());
        }
        r_absent_many.push(ns);
        r_absent_one.push(time_lookups(&db_one, &absent).0);
        r_get_one.push(time_gets(&db_many, &ids_one));
        r_get_many.push(time_gets(&db_many, &ids_rand));
        r_dep_one.push(time_dependent_lookups(&db_one, &one)?);
        r_dep_many.push(time_dependent_lookups(&db_many, &many)?);
    }
    let rate = |ns: &[f64]| -> Vec<f64> { ns.iter().map(|x| 1e9 / x).collect() };
    let (one_rates, many_rates) = (rate(&r_one), rate(&r_many));
    let ratios: Vec<f64> = many_rates
        .iter()
        .zip(&one_rates)
        .map(|(a, b)| a / b)
        .collect();
    let ratio = median(&ratios);
    let mut f = Figure::new(
        "lookup_rate",
        format!("lookup_inbound, {m} inbound SAs, random SPIs, batches of 32"),
        median(&many_rates),
        "lookups/s",
    )
    .baseline("1 SA", median(&one_rates));
    f.spread = Some(range(&many_rates));
    f.ratio = Some(ratio);
    f.target = Some("ratio ≥ 0.5".into());
    f.met = Some(ratio >= TARGET_LOOKUP_RATIO);
    f.extra = json!({"sas": m, "lookups": p.lookups, "reps": p.reps,
        "ratio_per_rep": ratios, "one_sa_range": range(&one_rates),
        "install_secs_all_inbound": install_secs,
        "direct_installs_per_s_all_inbound": m as f64 / install_secs});
    figs.push(f);

    // The pieces.
    let piece = |id: &str, what: String, v: &[f64], base_name: &str, b: &[f64]| {
        let mut f = Figure::new(id, what, median(v), "ns").baseline(base_name, median(b));
        f.spread = Some(range(v));
        f.ratio = Some(median(v) / median(b));
        f
    };
    figs.push(piece(
        "lookup_ns",
        format!("ns per lookup_inbound, {m} SAs (independent lookups)"),
        &r_many,
        "1 SA",
        &r_one,
    ));
    figs.push(piece(
        "lookup_dependent_ns",
        format!("ns per dependent lookup_inbound (no overlap), {m} SAs"),
        &r_dep_many,
        "1 SA",
        &r_dep_one,
    ));
    figs.push(piece(
        "lookup_absent_ns",
        format!("ns per lookup of an absent SPI (index bucket only), index of {m} SAs"),
        &r_absent_many,
        "same SPIs, index with 1 SA (same capacity)",
        &r_absent_one,
    ));
    figs.push(piece(
        "get_ns",
        format!("ns per SaDb::get (slot pointer + SA, no index), random of {m} SAs"),
        &r_get_many,
        "always the same SA",
        &r_get_one,
    ));
    println!("lookup: index model ...");
    {
        let guard = epoch::pin();
        let model = IndexModel::new(&db_many, &ids, &guard)?;
        let one_model = IndexModel::new(&db_many, &ids[..1], &guard)?;
        let (mut mm, mut m1) = (Vec::new(), Vec::new());
        for _ in 0..p.reps {
            m1.push(time_model(&one_model, &one)?);
            mm.push(time_model(&model, &many)?);
        }
        let col = |v: &[[f64; 3]], k: usize| v.iter().map(|x| x[k]).collect::<Vec<f64>>();
        for (k, id, what) in [
            (0, "model_naive_ns", "one by one, as lookup_inbound"),
            (
                1,
                "model_staged_ns",
                "staged per batch of 32: buckets, then slots, then SAs",
            ),
            (
                2,
                "model_staged_ptr_ns",
                "staged, SA pointer stored in the bucket",
            ),
        ] {
            let (a, b) = (col(&mm, k), col(&m1, k));
            let mut f = Figure::new(
                id,
                format!("model index (same hash/load/SAs), {m} SAs: ns per lookup, {what}"),
                median(&a),
                "ns",
            )
            .baseline("same scheme, 1 SA", median(&b))
            .baseline("lookup_inbound, 1 SA", median(&r_one));
            f.spread = Some(range(&a));
            f.ratio = Some(median(&r_one) / median(&a));
            f.extra = json!({"ratio_is": "rate of this scheme at many SAs / rate of lookup_inbound at 1 SA"});
            figs.push(f);
        }
    }
    println!("lookup: pointer chase reference ...");
    let small = chase_ns(p.chase_small, p.chase_steps, 3);
    let large = chase_ns(p.chase_large, p.chase_steps, 5);
    let mut f = Figure::new(
        "chase_large_ns",
        format!(
            "dependent load, random lines over {} MiB (memory latency)",
            p.chase_large >> 20
        ),
        large,
        "ns",
    )
    .baseline(format!("over {} MiB", p.chase_small >> 20), small);
    f.ratio = Some(large / small);
    figs.push(f);
    let gather = gather_ns(p.chase_large, p.chase_steps, 11);
    let mut f = Figure::new(
        "gather_large_ns",
        format!(
            "independent load, random lines over {} MiB (misses may overlap)",
            p.chase_large >> 20
        ),
        gather,
        "ns",
    )
    .baseline("dependent (above)", large);
    f.ratio = Some(gather / large);
    figs.push(f);

    // The whole inbound path.
    let count = p.packets.div_ceil(BATCH) * BATCH;
    println!("packets: building 2 × {count} ESP packets ...");
    let pk_many = build_packets(count, m, |k| u64::from(perm[k % perm.len()]))?;
    let pk_one = build_packets(count, m, |_| 0)?;
    let mut pipe_many = Pipeline::new(Arc::clone(&db_many), net_many, WorkerCtx::new());
    let mut pipe_one = Pipeline::new(Arc::clone(&db_one), net_one, WorkerCtx::new());
    let mut buf = BurstBuf::new();
    let (mut res_many, mut res_one) = (PathResult::default(), PathResult::default());
    // Alternate quarters, so that both cases see the same machine.
    let parts = 4;
    let per = (count / BATCH).div_ceil(parts) * BATCH;
    let (mut q_one, mut q_many) = (Vec::new(), Vec::new());
    for q in 0..parts {
        let (from, to) = ((q * per).min(count), ((q + 1) * per).min(count));
        if from == to {
            continue;
        }
        let (n0, p0) = (res_one.nanos, res_one.packets);
        run_packets(&mut pipe_one, &pk_one, from, to, &mut buf, &mut res_one)?;
        q_one.push((res_one.packets - p0) as f64 * 1e9 / (res_one.nanos - n0) as f64);
        let (n0, p0) = (res_many.nanos, res_many.packets);
        run_packets(&mut pipe_many, &pk_many, from, to, &mut buf, &mut res_many)?;
        q_many.push((res_many.packets - p0) as f64 * 1e9 / (res_many.nanos - n0) as f64);
    }
    for (name, r) in [("1 SA", &res_one), ("many SAs", &res_many)] {
        if r.forwarded != r.packets {
            return Err(format!(
                "packet path ({name}): {} of {} packets forwarded, first other verdict {}",
                r.forwarded,
                r.packets,
                r.first_other.clone().unwrap_or_default()
            ));
        }
    }
    let pps = |r: &PathResult| r.packets as f64 * 1e9 / r.nanos as f64;
    let ratio = pps(&res_many) / pps(&res_one);
    let mut f = Figure::new(
        "packet_rate",
        format!("inbound ESP path (decap, 64 B inner, bursts of 32), SPIs over {m} SAs"),
        pps(&res_many),
        "packets/s",
    )
    .baseline("all on 1 SA", pps(&res_one));
    f.spread = Some(range(&q_many));
    f.ratio = Some(ratio);
    f.target = Some("ratio ≥ 0.5".into());
    f.met = Some(ratio >= TARGET_LOOKUP_RATIO);
    f.extra = json!({"packets": count, "ns_per_packet": 1e9 / pps(&res_many),
        "ns_per_packet_one_sa": 1e9 / pps(&res_one), "quarters_pps": q_many,
        "quarters_pps_one_sa": q_one, "frame_len": pk_many.len, "sas": m,
        "stored": pk_many.count});
    figs.push(f);
    Ok(json!({"install_secs": install_secs}))
}

// ---------------------------------------------------------------------------------------------

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cache = |idx: u32| {
        std::fs::read_to_string(format!(
            "/sys/devices/system/cpu/cpu0/cache/index{idx}/size"
        ))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "l1d": cache(0), "l2": cache(2), "l3": cache(3),
        "thp": std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .map(|s| s.trim().to_string()).unwrap_or_default(),
    })
}

fn run(args: Args) -> Res<()> {
    if let Some(n) = args.mem_child {
        return mem_child(n, args.mem_mix);
    }
    cleanup_on_signals()?;
    let p = Params::from(&args);
    let all = args.only.is_empty();
    let wants = |x: Part| all || args.only.contains(&x);
    println!("# espgw-sa-scale");
    println!();
    println!("machine: {}", machine());
    println!(
        "parameters: SAs AES-128-GCM (16-byte ICV), tunnel, one selector, distinct SPI/name/key each; \
         replay window {REPLAY_WINDOW} (inbound); ring: {} SAs ({}), window {} unacknowledged, \
         {} slots of {} B each way; memory: {:?} SAs ({}; the largest also all inbound), SaDb \
         capacity = N; lookups: {} inbound SAs vs 1, {} lookups × {} reps, batches of {BATCH}; \
         packets: {} per case, inner IPv4 {INNER} B{}",
        format_list(&p.sas),
        Mix::Half.name(),
        p.window,
        p.ring.to_dp_slots,
        p.ring.record_size,
        p.mem_sas,
        p.mem_mix.name(),
        p.lookup_sas,
        p.lookups,
        p.reps,
        p.packets,
        if p.quick { " (--quick)" } else { "" }
    );
    let t = Instant::now();
    let ticks0 = cpu_ticks();
    let mut figs = Vec::new();
    let mut detail = serde_json::Map::new();
    if wants(Part::Ring) {
        ring_part(&p, &mut figs)?;
    }
    if wants(Part::Memory) {
        detail.insert("memory".into(), memory_part(&p, &mut figs)?);
    }
    if wants(Part::Lookup) {
        detail.insert("lookup".into(), lookup_part(&p, &mut figs)?);
    }
    print_figures(&figs, &p);
    if let Some(m) = detail.get("memory") {
        println!(
            "{}",
            json!({"bench": "espgw-sa-scale", "figure": "memory_detail", "detail": m})
        );
        print_memory_breakdown(m);
    }
    println!();
    let secs = t.elapsed().as_secs_f64();
    if let (Some((b0, m0)), Some((b1, m1))) = (ticks0, cpu_ticks()) {
        // USER_HZ is 100 on Linux.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let other = (b1 - b0).saturating_sub(m1 - m0) as f64 / 100.0;
        println!(
            "other processes used {:.0} % of the {cpus} CPUs during the run ({other:.1} CPU-seconds); \
             compare runs only when this is near 0",
            100.0 * other / (secs * cpus)
        );
        println!(
            "{}",
            json!({"bench": "espgw-sa-scale", "figure": "other_cpu_share",
                "value": other / (secs * cpus), "secs": secs})
        );
    }
    println!("total time {secs:.1} s");
    Ok(())
}

/// Busy CPU ticks of the whole machine and of this process (with its waited-for children).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy = cpu.iter().take(8).sum::<u64>() - cpu.get(3)? - cpu.get(4)?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<u64> = me
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((busy, f.iter().sum()))
}

fn format_list(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// What an inbound SA is made of, from the sizes and one live SA.
fn print_memory_breakdown(m: &Value) {
    let s = &m["static"];
    let g = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    println!();
    println!("## What an SA is made of (bytes)");
    println!();
    println!("| part | inbound | outbound |");
    println!("|---|---:|---:|");
    let child = m["children"]
        .as_array()
        .and_then(|c| c.iter().find(|v| !v["in"].is_null() && !v["out"].is_null()));
    let (i, o) = match child {
        Some(c) => (c["in"].clone(), c["out"].clone()),
        None => (Value::Null, Value::Null),
    };
    let rows = [
        ("`Sa` inline (Box, align 16)", g(s, "Sa"), g(s, "Sa")),
        (
            "  of which counters (`SaCounters`)",
            g(s, "SaCounters"),
            g(s, "SaCounters"),
        ),
        (
            "    of which the drop-reason array",
            g(s, "drop_array"),
            g(s, "drop_array"),
        ),
        (
            "  of which padding around the sequence counter and the counters",
            g(s, "apart_padding"),
            g(s, "apart_padding"),
        ),
        (
            "crypto context (heap, `size_of_val`)",
            g(&i, "crypto_heap"),
            g(&o, "crypto_heap"),
        ),
        (
            "  of which ring's `LessSafeKey`",
            g(s, "ring LessSafeKey"),
            g(s, "ring LessSafeKey"),
        ),
        (
            "replay bitmap (heap)",
            g(&i, "replay_bitmap_heap"),
            g(&o, "replay_bitmap_heap"),
        ),
        (
            "selectors (heap)",
            g(&i, "selectors_heap"),
            g(&o, "selectors_heap"),
        ),
        ("name (heap)", g(&i, "name_heap"), g(&o, "name_heap")),
    ];
    for (n, a, b) in rows {
        println!("| {n} | {a} | {b} |");
    }
    let sum = |v: &Value| {
        g(s, "Sa")
            + g(v, "crypto_heap")
            + g(v, "replay_bitmap_heap")
            + g(v, "selectors_heap")
            + g(v, "name_heap")
    };
    println!("| **sum of the objects** | {} | {} |", sum(&i), sum(&o));
    println!();
    println!(
        "(the rest of the RSS per SA: malloc headers and alignment, the SaDb writer's name and SPI maps, and their growth slack)"
    );
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("espgw-sa-scale: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
