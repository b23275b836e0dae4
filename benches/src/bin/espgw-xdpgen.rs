//! `espgw-xdpgen`: the traffic tools of the forwarding benchmark (`benches/fwd.sh`).
//!
//! * `tx`: an AF_XDP generator. One thread per TX queue, each with its own UMEM and socket; the
//!   UMEM is filled once with pre-built frames (cycled), then the same frames are sent again and
//!   again for a fixed time: per packet only a descriptor is written and a completion read.
//!   On veth the frames sent on TX queue `q` arrive on RX queue `q` of the peer.
//! * `sink`: attaches `benches/xdp_sink.c` to an interface (tc ingress by default, or native
//!   XDP), where it counts and drops every IPv4 frame; prints the counts when stopped
//!   (SIGINT/SIGTERM) or after `--seconds`.
//! * `pingpong`: two threads pinned to two CPUs bounce a cache line; prints the median round
//!   trip (a placement check for the noisy VMs, see `benches/README.md`).
//! * `stats`: reads the gateway's stats socket to EOF and prints it.
//!
//! The generator uses `xdpilone` directly, not `espgw_dataplane::xsk::XskWorker`: the worker
//! keeps its free list private (a sender needs to choose which frames to send), hands half of
//! the UMEM to a fill ring a TX-only socket never uses, and its `reclaim` pushes every completed
//! frame onto that free list, which only `refill` drains, so a sender would grow it without
//! bound.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::collections::VecDeque;
use std::ffi::CString;
use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use xdpilone::xdp::XdpDesc;
use xdpilone::{
    CompletionQueue, FillQueue, IfInfo, RingTx, Socket, SocketConfig, Umem, UmemConfig, User,
};

/// The compiled sink program (`benches/xdp_sink.c`), aligned for the ELF parser.
static XDP_SINK_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_sink.o"));

/// UMEM frame size.
const FRAME_SIZE: u32 = 2048;
/// Where a frame's packet starts (like the kernel's receive headroom).
const HEADROOM: u32 = 256;
/// Largest frame that fits behind the headroom.
const MAX_FRAME: usize = (FRAME_SIZE - HEADROOM) as usize;
/// `SOL_XDP` socket options (<linux/if_xdp.h>).
const SOL_XDP: libc::c_int = 283;
const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;
/// Descriptors one `sendto` may send in copy mode (Linux 6.17+; the default is 32).
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;
/// Sink classes, in the order of `enum class` in `xdp_sink.c`.
const SINK_CLASSES: [&str; 4] = ["esp", "esp_in_udp", "udp", "other_ipv4"];

#[derive(Debug, Parser)]
#[command(
    name = "espgw-xdpgen",
    about = "AF_XDP generator, XDP sink and ping-pong for the forwarding benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send pre-built frames as fast as possible for a fixed time; print JSON.
    Tx(TxArgs),
    /// Count and drop IPv4 frames arriving on an interface (XDP); print JSON when stopped.
    Sink(SinkArgs),
    /// Cross-CPU cache-line ping-pong: median round trip in ns; print JSON.
    Pingpong(PingArgs),
    /// Read a unix stream socket (the gateway's stats) to EOF and print it.
    Stats(StatsArgs),
}

#[derive(Debug, Args)]
struct TxArgs {
    /// Interface to send on.
    #[arg(long)]
    iface: String,
    /// TX queues (one thread, UMEM and socket each): queues first-queue .. first-queue+N-1.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// First queue.
    #[arg(long, default_value_t = 0)]
    first_queue: u32,
    /// Frames to send (pcap, Ethernet), cycled to fill each UMEM.
    #[arg(
        long,
        required_unless_present = "frames_hex",
        conflicts_with = "frames_hex"
    )]
    pcap: Option<PathBuf>,
    /// Frames to send, as hex strings (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    frames_hex: Vec<String>,
    /// How long to send.
    #[arg(long)]
    seconds: f64,
    /// Descriptors put on the TX ring per round.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// UMEM frames per queue (2 KiB each; all UMEMs count against `ulimit -l`).
    #[arg(long, default_value_t = 512)]
    umem_frames: u32,
    /// TX and completion ring entries (a power of two).
    #[arg(long, default_value_t = 512)]
    ring: u32,
    /// CPUs to pin the threads to: queue i's thread goes to cpus[i % len]. Empty: no pinning.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Descriptors the kernel sends per wake-up in copy mode (XDP_MAX_TX_SKB_BUDGET, 32 up to
    /// the ring size; 0 leaves the kernel's default of 32). Ignored where unsupported.
    #[arg(long, default_value_t = 0)]
    tx_budget: u32,
    /// Run the sender threads under SCHED_IDLE: they only get a CPU that nothing else wants
    /// (for a generator sharing CPUs with the gateway's workers).
    #[arg(long)]
    idle: bool,
}

#[derive(Debug, Args)]
struct SinkArgs {
    /// Interface to attach to.
    #[arg(long)]
    iface: String,
    /// Stop after this long (default: at SIGINT or SIGTERM).
    #[arg(long)]
    seconds: Option<f64>,
    /// Where to count and drop: `tc` (TCX ingress; no copy of the frame) or `xdp` (native XDP;
    /// on veth this copies every frame from a sender without XDP headroom once more).
    #[arg(long, value_parser = ["tc", "xdp"], default_value = "tc")]
    hook: String,
    /// Create this file once the program is attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PingArgs {
    /// The two CPUs.
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 1])]
    cpus: Vec<usize>,
    /// Batches of round trips (the median batch is reported).
    #[arg(long, default_value_t = 100)]
    batches: usize,
    /// Round trips per batch.
    #[arg(long, default_value_t = 1000)]
    per_batch: u64,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// Socket path.
    #[arg(long)]
    socket: PathBuf,
    /// Keep retrying the connection for this long (the gateway may still be starting).
    #[arg(long, default_value_t = 0.0)]
    wait: f64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Tx(a) => tx(&a),
        Cmd::Sink(a) => sink(&a),
        Cmd::Pingpong(a) => pingpong(&a),
        Cmd::Stats(a) => stats(&a),
    };
    match r {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("espgw-xdpgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---- tx ----

fn load_frames(a: &TxArgs) -> Result<Vec<Vec<u8>>, String> {
    let mut frames = Vec::new();
    if let Some(p) = &a.pcap {
        let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut r = pcap_file::pcap::PcapReader::new(std::io::BufReader::new(f))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        while let Some(pkt) = r.next_packet() {
            let pkt = pkt.map_err(|e| format!("{}: {e}", p.display()))?;
            frames.push(pkt.data.into_owned());
        }
    }
    for h in &a.frames_hex {
        frames.push(hex::decode(h.trim()).map_err(|e| format!("--frames-hex {h:?}: {e}"))?);
    }
    if frames.is_empty() {
        return Err("no frames to send".into());
    }
    if let Some(f) = frames.iter().find(|f| f.len() < 14 || f.len() > MAX_FRAME) {
        return Err(format!(
            "a frame of {} bytes: frames must be 14-{MAX_FRAME} bytes",
            f.len()
        ));
    }
    Ok(frames)
}

fn errno(e: xdpilone::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.get_raw().abs())
}

/// An anonymous page-aligned mapping holding one UMEM.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Area {
    fn new(len: usize) -> Result<Area, String> {
        // SAFETY: a fresh anonymous private mapping at an address the kernel chooses; checked
        // below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {} KiB: {}",
                len / 1024,
                std::io::Error::last_os_error()
            ));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or("mmap returned NULL")?;
        Ok(Area { ptr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is our mapping, readable and writable; `&mut self` makes this
        // the only reference from this process (the kernel only reads frames we hand it, and the
        // UMEM is filled before any is).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping mmap returned; the sender that uses it (rings, UMEM) is
        // dropped before it (field order of `Sender`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// One queue's sender: UMEM, socket, TX and completion rings.
struct Sender {
    // Field order is drop order: rings and sockets before the UMEM, the UMEM before its memory.
    tx: RingTx,
    comp: CompletionQueue,
    _fill: FillQueue,
    user: User,
    _umem: Umem,
    area: Area,
    zero_copy: bool,
    budget: Option<u32>,
}

impl Sender {
    fn open(iface: &str, queue: u32, a: &TxArgs) -> Result<Sender, String> {
        let len = a.umem_frames as usize * FRAME_SIZE as usize;
        let area = Area::new(len)?;
        let ring = NonZeroU32::new(a.ring).ok_or("--ring must not be 0")?;
        let cfg = UmemConfig {
            fill_size: a.ring,
            complete_size: a.ring,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        let area_ptr = NonNull::slice_from_raw_parts(area.ptr, area.len);
        // SAFETY: the area is a fresh page-aligned mapping of `len` bytes used for nothing else,
        // and outlives the UMEM (field order of `Sender`).
        let umem = unsafe { Umem::new(cfg, area_ptr) }.map_err(|e| {
            format!(
                "registering a {} KiB UMEM: {} (all AF_XDP UMEMs of this user count against \
                 ulimit -l, {} KiB here; lower --umem-frames)",
                len / 1024,
                errno(e),
                memlock_kib().map_or("unlimited".into(), |k| k.to_string())
            )
        })?;
        let fail =
            |what: &str, e: xdpilone::Errno| format!("{iface} queue {queue}: {what}: {}", errno(e));
        let name = CString::new(iface).map_err(|_| "interface name contains NUL".to_string())?;
        let mut info = IfInfo::invalid();
        info.from_name(&name)
            .map_err(|e| fail("no such interface", e))?;
        info.set_queue(queue);
        let sock = Socket::with_shared(&info, &umem).map_err(|e| fail("socket()", e))?;
        let device = umem
            .fq_cq(&sock)
            .map_err(|e| fail("fill/completion rings", e))?;
        let sc = SocketConfig {
            rx_size: None,
            tx_size: Some(ring),
            bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP,
        };
        let user = umem.rx_tx(&sock, &sc).map_err(|e| fail("TX ring", e))?;
        umem.bind(&user).map_err(|e| {
            fail(
                "bind (does the interface have that many queues? veth: numtxqueues)",
                e,
            )
        })?;
        let tx = user.map_tx().map_err(|e| fail("mapping the TX ring", e))?;
        let (fill, comp) = device.into_parts();
        let fd = user.as_raw_fd();
        let budget = if a.tx_budget == 0 {
            None
        } else {
            set_u32_opt(fd, XDP_MAX_TX_SKB_BUDGET, a.tx_budget)
                .ok()
                .map(|()| a.tx_budget)
        };
        Ok(Sender {
            tx,
            comp,
            _fill: fill,
            zero_copy: zero_copy(fd),
            budget,
            user,
            _umem: umem,
            area,
        })
    }
}

fn set_u32_opt(fd: i32, opt: libc::c_int, v: u32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<u32>()` bytes from `v`, which lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            opt,
            (&v as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn zero_copy(fd: i32) -> bool {
    let mut flags: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `flags` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_OPTIONS,
            (&mut flags as *mut u32).cast(),
            &mut len,
        )
    };
    rc == 0 && flags & XDP_OPTIONS_ZEROCOPY != 0
}

fn memlock_kib() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur / 1024)
}

fn pin(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// What one queue's thread did.
#[derive(Debug, Default)]
struct QueueResult {
    queue: u32,
    cpu: Option<usize>,
    /// Descriptors put on the TX ring before the deadline.
    submitted: u64,
    /// Of those, completed by the kernel (sent, or dropped by the driver).
    completed: u64,
    /// The sending window.
    seconds: f64,
    /// `sendto` kicks.
    kicks: u64,
    zero_copy: bool,
    budget: Option<u32>,
    kernel: serde_json::Value,
}

fn tx(a: &TxArgs) -> Result<serde_json::Value, String> {
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err("--seconds must be positive".into());
    }
    if a.queues == 0 || a.batch == 0 || a.umem_frames == 0 {
        return Err("--queues, --batch and --umem-frames must be positive".into());
    }
    if !a.ring.is_power_of_two() {
        return Err("--ring must be a power of two".into());
    }
    let frames = Arc::new(load_frames(a)?);
    let n = a.queues as usize;
    // Every thread opens its socket, then all start together.
    let barrier = Arc::new(Barrier::new(n));
    let failed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..a.queues {
        let queue = a.first_queue + i;
        let cpu = (!a.cpus.is_empty()).then(|| a.cpus[i as usize % a.cpus.len()]);
        let frames = Arc::clone(&frames);
        let barrier = Arc::clone(&barrier);
        let failed = Arc::clone(&failed);
        let args = TxArgs {
            iface: a.iface.clone(),
            pcap: None,
            frames_hex: Vec::new(),
            cpus: Vec::new(),
            ..*a
        };
        let h = std::thread::Builder::new()
            .name(format!("xdpgen-q{queue}"))
            .spawn(move || {
                let r = send_queue(&args, queue, cpu, &frames, &barrier, &failed);
                if r.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                r
            })
            .map_err(|e| format!("spawning a thread: {e}"))?;
        handles.push(h);
    }
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a sender thread panicked".into()),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let sent: u64 = results.iter().map(|r| r.completed).sum();
    let seconds = results.iter().map(|r| r.seconds).fold(0.0, f64::max);
    let len_sum: usize = frames.iter().map(Vec::len).sum();
    Ok(json!({
        "iface": a.iface,
        "sent": sent,
        "seconds": seconds,
        "pps": if seconds > 0.0 { sent as f64 / seconds } else { 0.0 },
        "frames": frames.len(),
        "mean_frame_bytes": len_sum as f64 / frames.len() as f64,
        "queues": results.iter().map(|r| json!({
            "queue": r.queue,
            "cpu": r.cpu,
            "submitted": r.submitted,
            "sent": r.completed,
            "seconds": r.seconds,
            "pps": if r.seconds > 0.0 { r.completed as f64 / r.seconds } else { 0.0 },
            "kicks": r.kicks,
            "mode": if r.zero_copy { "zero-copy" } else { "copy" },
            "tx_budget": r.budget,
            "sched_idle": a.idle,
            "kernel": r.kernel,
        })).collect::<Vec<_>>(),
    }))
}

fn send_queue(
    a: &TxArgs,
    queue: u32,
    cpu: Option<usize>,
    frames: &[Vec<u8>],
    barrier: &Barrier,
    failed: &AtomicBool,
) -> Result<QueueResult, String> {
    if let Some(c) = cpu
        && !pin(c)
    {
        eprintln!("espgw-xdpgen: could not pin queue {queue}'s thread to CPU {c}");
    }
    if a.idle {
        let p = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (0) with a valid sched_param.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) };
        if rc != 0 {
            eprintln!(
                "espgw-xdpgen: SCHED_IDLE for queue {queue}'s thread: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let opened = Sender::open(&a.iface, queue, a);
    // Wait for the others even on failure, so nobody waits forever.
    let mut s = match opened {
        Ok(s) => {
            barrier.wait();
            s
        }
        Err(e) => {
            failed.store(true, Ordering::SeqCst);
            barrier.wait();
            return Err(e);
        }
    };
    if failed.load(Ordering::SeqCst) {
        return Err(format!("queue {queue}: another queue failed"));
    }
    // Fill the UMEM once: frame i holds pre-built frame i mod n, at the headroom offset.
    let umem_frames = a.umem_frames as usize;
    let mut lens = Vec::with_capacity(umem_frames);
    {
        let mem = s.area.as_mut_slice();
        for i in 0..umem_frames {
            let f = &frames[i % frames.len()];
            let off = i * FRAME_SIZE as usize + HEADROOM as usize;
            mem[off..off + f.len()].copy_from_slice(f);
            lens.push(f.len() as u32);
        }
    }
    let mut free: VecDeque<u64> = (0..umem_frames as u64)
        .map(|i| i * u64::from(FRAME_SIZE) + u64::from(HEADROOM))
        .collect();
    let desc = |addr: u64| XdpDesc {
        addr,
        len: lens[(addr / u64::from(FRAME_SIZE)) as usize],
        options: 0,
    };
    let batch = a.batch.min(a.ring) as usize;
    let mut r = QueueResult {
        queue,
        cpu,
        zero_copy: s.zero_copy,
        budget: s.budget,
        ..QueueResult::default()
    };
    let reclaim = |s: &mut Sender, free: &mut VecDeque<u64>| -> u64 {
        let mut c = s.comp.complete(a.ring);
        let mut n = 0;
        while let Some(addr) = c.read() {
            free.push_back(addr);
            n += 1;
        }
        c.release();
        n
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    loop {
        r.completed += reclaim(&mut s, &mut free);
        if Instant::now() >= deadline {
            break;
        }
        let want = batch.min(free.len()) as u32;
        if want > 0 {
            let mut w = s.tx.transmit(want);
            let cap = w.capacity() as usize;
            let k = w.insert(free.iter().take(cap).map(|&addr| desc(addr))) as usize;
            w.commit();
            drop(w);
            free.drain(..k);
            r.submitted += k as u64;
        }
        if s.tx.needs_wakeup() {
            s.tx.wake();
            r.kicks += 1;
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    // Let what is on the ring go out (it was submitted within the window).
    let drain_end = Instant::now() + Duration::from_millis(200);
    while r.completed < r.submitted && Instant::now() < drain_end {
        if s.tx.needs_wakeup() {
            s.tx.wake();
        }
        r.completed += reclaim(&mut s, &mut free);
    }
    r.kernel = match s.user.statistics_v2() {
        Ok(st) => json!({
            "tx_invalid_descs": st.tx_invalid_descs,
            "tx_ring_empty": st.tx_ring_empty_descs,
        }),
        Err(e) => json!({ "error": errno(e).to_string() }),
    };
    Ok(r)
}

// ---- sink ----

fn sink(a: &SinkArgs) -> Result<serde_json::Value, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| format!("signal handler: {e}"))?;
    }
    let mut ebpf = Ebpf::load(XDP_SINK_OBJ).map_err(|e| format!("loading xdp_sink.o: {e}"))?;
    let counters: PerCpuArray<MapData, u64> = ebpf
        .take_map("counters")
        .ok_or("xdp_sink.o has no map `counters`")?
        .try_into()
        .map_err(|e| format!("map counters: {e}"))?;
    // Either way a link: the kernel detaches the program when this process ends, however it
    // ends (TCX needs Linux 6.6; older kernels get a netlink filter that would outlive us).
    if a.hook == "xdp" {
        let prog: &mut Xdp = ebpf
            .program_mut("xdp_sink")
            .ok_or("xdp_sink.o has no program `xdp_sink`")?
            .try_into()
            .map_err(|e| format!("program xdp_sink: {e}"))?;
        prog.load()
            .map_err(|e| format!("loading program xdp_sink: {e}"))?;
        prog.attach(&a.iface, XdpMode::Driver)
            .map_err(|e| format!("attaching xdp_sink to {}: {e}", a.iface))?;
    } else {
        let prog: &mut SchedClassifier = ebpf
            .program_mut("tc_sink")
            .ok_or("xdp_sink.o has no program `tc_sink`")?
            .try_into()
            .map_err(|e| format!("program tc_sink: {e}"))?;
        prog.load()
            .map_err(|e| format!("loading program tc_sink: {e}"))?;
        prog.attach(&a.iface, TcAttachType::Ingress)
            .map_err(|e| format!("attaching tc_sink to {} (ingress): {e}", a.iface))?;
    }
    if let Some(p) = &a.ready_file {
        std::fs::write(p, b"ready\n").map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let read = |c: &PerCpuArray<MapData, u64>| -> Result<Vec<u64>, String> {
        (0..2 * SINK_CLASSES.len() as u32)
            .map(|i| {
                c.get(&i, 0)
                    .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                    .map_err(|e| format!("reading the counters: {e}"))
            })
            .collect()
    };
    let packets = |v: &[u64]| v.iter().step_by(2).sum::<u64>();
    let start = Instant::now();
    let deadline = a.seconds.map(|s| start + Duration::from_secs_f64(s));
    // Sample every 20 ms to find the window in which frames arrived.
    let mut last = 0u64;
    let mut first_seen: Option<(Instant, u64)> = None;
    let mut last_seen: Option<(Instant, u64)> = None;
    let mut prev_t = start;
    loop {
        let now = Instant::now();
        let v = read(&counters)?;
        let p = packets(&v);
        if p > last {
            if first_seen.is_none() {
                first_seen = Some((prev_t, last));
            }
            last_seen = Some((now, p));
            last = p;
        }
        prev_t = now;
        if stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| now >= d) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = read(&counters)?;
    let mut out = serde_json::Map::new();
    out.insert("iface".into(), a.iface.clone().into());
    out.insert("packets".into(), packets(&v).into());
    for (i, name) in SINK_CLASSES.iter().enumerate() {
        out.insert(
            (*name).into(),
            json!({ "packets": v[2 * i], "bytes": v[2 * i + 1] }),
        );
    }
    let (active_s, active_pps) = match (first_seen, last_seen) {
        (Some((t0, p0)), Some((t1, p1))) if t1 > t0 => {
            let s = (t1 - t0).as_secs_f64();
            (s, (p1 - p0) as f64 / s)
        }
        _ => (0.0, 0.0),
    };
    out.insert("active_seconds".into(), active_s.into());
    out.insert("active_pps".into(), active_pps.into());
    Ok(out.into())
}

// ---- pingpong ----

fn pingpong(a: &PingArgs) -> Result<serde_json::Value, String> {
    let [c0, c1] = a.cpus[..] else {
        return Err("--cpus takes exactly two CPUs".into());
    };
    if a.batches == 0 || a.per_batch == 0 {
        return Err("--batches and --per-batch must be positive".into());
    }
    let flag = Arc::new(AtomicU64::new(0));
    let peer = Arc::clone(&flag);
    let responder = std::thread::spawn(move || {
        let pinned = pin(c1);
        loop {
            let v = peer.load(Ordering::Acquire);
            if v == u64::MAX {
                return pinned;
            }
            if v % 2 == 1 {
                peer.store(v + 1, Ordering::Release);
            }
            std::hint::spin_loop();
        }
    });
    let pinned = pin(c0);
    let mut per_rt = Vec::with_capacity(a.batches);
    let mut v = 0u64;
    for _ in 0..a.batches {
        let t = Instant::now();
        for _ in 0..a.per_batch {
            flag.store(v + 1, Ordering::Release);
            while flag.load(Ordering::Acquire) != v + 2 {
                std::hint::spin_loop();
            }
            v += 2;
        }
        per_rt.push(t.elapsed().as_nanos() as f64 / a.per_batch as f64);
    }
    flag.store(u64::MAX, Ordering::Release);
    let peer_pinned = responder.join().unwrap_or(false);
    per_rt.sort_by(f64::total_cmp);
    Ok(json!({
        "cpus": [c0, c1],
        "pinned": pinned && peer_pinned,
        "median_ns": per_rt[per_rt.len() / 2],
        "min_ns": per_rt[0],
        "max_ns": per_rt[per_rt.len() - 1],
    }))
}

// ---- stats ----

fn stats(a: &StatsArgs) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + Duration::from_secs_f64(a.wait.max(0.0));
    loop {
        match read_socket(&a.socket) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn read_socket(path: &Path) -> Result<serde_json::Value, String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&body).map_err(|e| format!("{}: not JSON: {e}", path.display()))
}
