//! `espgw-dataplane run`: the live gateway.
//!
//! The main thread reads the configuration, completes the ports from the kernel (MAC, MTU and
//! addresses where the file leaves them out), installs the SAs and policies, starts the netlink
//! next-hop follower, attaches the XDP steering program to both ports and starts one worker per
//! configured core. Worker `i` is pinned to its core and owns queue `i` of both ports: an
//! AF_XDP socket on each, over one UMEM ([`crate::xsk`]). The main thread then only keeps
//! time: it ages the SAs, logs lifetime events and serves the counters on a unix socket, until
//! SIGINT or SIGTERM. On the way out the workers stop, the XDP programs are detached and the
//! final counters are printed.

use crate::config::{self, Config, PortConfig, PortId, XdpMode};
use crate::counters::{DropCounts, DropReason, WorkerCounters};
use crate::icmp;
use crate::netlink::{self, KernelNextHops, PortLink};
use crate::nexthop::NextHops;
use crate::pipeline::{Frame, Network, Pipeline, Verdict};
use crate::policy::Prefix;
use crate::reassembly::{Outcome, Reassembler, ReassemblyStats};
use crate::ringapply::Applier;
use crate::sadb::SaDb;
use crate::xdp::{AttachMode, PortRole, XdpPort};
use crate::xsk::{self, XskWorker};
use arrayvec::ArrayVec;
use espgw_crypto::{SoftwareProvider, WorkerCtx};
use espgw_wire::ethernet::EthernetAddress;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};
use xdpilone::xdp::XdpDesc;

/// Largest receive burst (the configuration's `batch_size` is at most this).
pub const MAX_BATCH: usize = 256;

/// What a worker reports once its sockets are open: `(port, queue, fd)` for each, or why not.
type Ready = (usize, Result<Vec<(PortId, u32, i32)>, String>);

/// Why the gateway could not start (or stopped on an error).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration file.
    #[error("{0}")]
    Config(Box<config::ConfigError>),
    /// Something the configuration needs is missing for a live run.
    #[error("{file}: {msg}")]
    Setup {
        /// The configuration file.
        file: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Installing SAs and policies.
    #[error("{file}: installing SAs: {source}")]
    Install {
        /// The configuration file.
        file: PathBuf,
        /// What failed.
        source: crate::sadb::SadbError,
    },
    /// Netlink.
    #[error("{0}")]
    Netlink(Box<netlink::NetlinkError>),
    /// The XDP program.
    #[error("{0}")]
    Xdp(Box<crate::xdp::XdpError>),
    /// AF_XDP sockets.
    #[error("{0}")]
    Xsk(Box<xsk::XskError>),
    /// A worker failed.
    #[error("worker {worker} (core {core}): {msg}")]
    Worker {
        /// Worker index.
        worker: usize,
        /// Its core.
        core: usize,
        /// What happened.
        msg: String,
    },
    /// The stats socket.
    #[error("stats socket {path}: {err}")]
    Stats {
        /// Its path.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// Signal handlers.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

macro_rules! boxed_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for RunError {
            fn from(e: $t) -> Self {
                RunError::$v(Box::new(e))
            }
        }
    )*};
}
boxed_from!(config::ConfigError => Config, netlink::NetlinkError => Netlink, crate::xdp::XdpError => Xdp, xsk::XskError => Xsk);

/// The data-plane clock: monotonic nanoseconds since the process started using it.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Next hops shared with the netlink thread.
#[derive(Debug)]
struct SharedHops(Arc<KernelNextHops>);

impl NextHops for SharedHops {
    fn resolve(&self, port: PortId, dst: IpAddr) -> Result<EthernetAddress, DropReason> {
        self.0.resolve(port, dst)
    }
    fn route(&self, dst: IpAddr) -> Result<(PortId, EthernetAddress), DropReason> {
        self.0.route(dst)
    }
}

/// What a worker publishes for the stats endpoint (refreshed every ~100 ms).
#[derive(Debug, Default, Clone)]
struct WorkerStats {
    core: usize,
    queue: u32,
    counters: WorkerCounters,
    sockets: Vec<serde_json::Value>,
    idle_polls: u64,
    reassembly: ReassemblyStats,
}

struct Shared {
    db: Arc<SaDb>,
    net: Arc<Network>,
    stop: Arc<AtomicBool>,
    workers: Vec<Mutex<WorkerStats>>,
    xdp: Mutex<Vec<XdpPort>>,
    hops: Arc<KernelNextHops>,
    started: Instant,
}

impl Shared {
    fn snapshot(&self) -> serde_json::Value {
        let now = now_ns();
        let mut totals = WorkerCounters::default();
        let workers: Vec<_> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let w = w.lock().map(|g| g.clone()).unwrap_or_default();
                totals.merge(&w.counters);
                serde_json::json!({
                    "worker": i,
                    "core": w.core,
                    "queue": w.queue,
                    "counters": w.counters.to_json(),
                    "sockets": w.sockets,
                    "idle_polls": w.idle_polls,
                    "reassembly": w.reassembly,
                })
            })
            .collect();
        let guard = crossbeam_epoch::pin();
        let sas: Vec<_> = self.db.iter(&guard).map(|sa| sa.to_json(now)).collect();
        let mut xdp = serde_json::Map::new();
        if let Ok(ports) = self.xdp.lock() {
            for p in ports.iter() {
                let v = match p.counters() {
                    Ok(c) => c.to_json(),
                    Err(e) => serde_json::json!({ "error": e.to_string() }),
                };
                xdp.insert(p.ifname().to_string(), v);
            }
        }
        serde_json::json!({
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "ports": {
                "wan": port_json(&self.net.wan),
                "lan": port_json(&self.net.lan),
            },
            "totals": totals.to_json(),
            "workers": workers,
            "sas": sas,
            "xdp": xdp,
            "next_hops": self.hops.stats().to_json(),
            "events_lost": self.db.events_lost(),
        })
    }
}

fn port_json(p: &PortConfig) -> serde_json::Value {
    serde_json::json!({
        "interface": p.interface,
        "mac": p.mac.to_string(),
        "mtu": p.mtu,
        "addresses": p.addresses.iter().map(|(a, n)| format!("{a}/{}", n.prefix_len())).collect::<Vec<_>>(),
    })
}

/// Fill in what the file leaves to the kernel: MAC, MTU and addresses of each port.
fn complete_port(file: &Path, name: &str, pc: &mut PortConfig) -> Result<String, RunError> {
    let Some(ifname) = pc.interface.clone() else {
        return Err(RunError::Setup {
            file: file.to_path_buf(),
            msg: format!(
                "the live gateway needs the {name} port's interface: set [dataplane.{name}] interface = \"...\""
            ),
        });
    };
    let link = netlink::link_info(&ifname)?;
    if pc.mac_set && pc.mac != link.mac {
        tracing::warn!(
            port = name,
            ifname,
            configured = %pc.mac,
            actual = %link.mac,
            "configured MAC differs from the interface's; using the interface's"
        );
    }
    pc.mac = link.mac;
    let if_mtu = u16::try_from(link.mtu).unwrap_or(u16::MAX);
    if !pc.mtu_set {
        pc.mtu = if_mtu.min(9216);
    } else if pc.mtu > if_mtu {
        tracing::warn!(
            port = name,
            ifname,
            configured = pc.mtu,
            interface = if_mtu,
            "configured MTU is above the interface's; using the interface's"
        );
        pc.mtu = if_mtu;
    }
    if pc.addresses.is_empty() {
        pc.addresses = link
            .addresses
            .iter()
            .filter(|(a, _)| !is_link_local(a))
            .map(|(a, len)| (*a, Prefix::new(*a, *len)))
            .collect();
    } else {
        for (a, _) in &pc.addresses {
            if !link.addresses.iter().any(|(x, _)| x == a) {
                tracing::warn!(port = name, ifname, address = %a, "configured address is not on the interface: the kernel will not answer ARP/ND or IKE for it");
            }
        }
    }
    if pc.addresses.is_empty() {
        return Err(RunError::Setup {
            file: file.to_path_buf(),
            msg: format!(
                "the {name} port ({ifname}) has no address: add one to the interface or to [dataplane.{name}] addresses"
            ),
        });
    }
    Ok(ifname)
}

/// RX queues of an interface as sysfs shows them (0 if unknown).
fn rx_queues(ifname: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{ifname}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .unwrap_or(0)
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Run the gateway until SIGINT/SIGTERM (or until `stop` is set, for tests). Returns the final
/// counters.
pub fn run(
    config_path: &Path,
    stop: Option<Arc<AtomicBool>>,
) -> Result<serde_json::Value, RunError> {
    let mut cfg: Config = config::load(config_path)?;
    let file = config_path.to_path_buf();
    let wan_if = complete_port(&file, "wan", &mut cfg.dataplane.wan)?;
    let lan_if = complete_port(&file, "lan", &mut cfg.dataplane.lan)?;
    if wan_if == lan_if {
        return Err(RunError::Setup {
            file,
            msg: format!("the WAN and LAN ports are the same interface ({wan_if})"),
        });
    }
    let rc = cfg.dataplane.run.clone();
    xsk::check_memlock(rc.cores.len(), rc.umem_frames)?;
    if !cfg.routes.is_empty() {
        tracing::warn!(
            "[[route]] entries are for replay mode; the live gateway follows the kernel's routes"
        );
    }

    for ifname in [&wan_if, &lan_if] {
        let queues = rx_queues(ifname);
        if queues > rc.cores.len() {
            tracing::warn!(
                ifname = %ifname,
                queues,
                workers = rc.cores.len(),
                "the interface has more RX queues than workers: traffic on queues {}..{} is passed to the kernel (XDP counter no_socket); add cores or reduce the queues (ethtool -L {ifname} combined {})",
                rc.cores.len(),
                queues - 1,
                rc.cores.len()
            );
        }
    }
    let stop = stop.unwrap_or_default();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(RunError::Signals)?;
    }

    let db = Arc::new(SaDb::new(cfg.dataplane.max_sas));
    db.set_idle_seconds(rc.idle_seconds);
    let installed = config::install(cfg, &db, &SoftwareProvider, now_ns()).map_err(|source| {
        RunError::Install {
            file: file.clone(),
            source,
        }
    })?;
    let d = installed.dataplane;
    // The SA ring (optional): created before anything is attached, so a bad path fails early.
    let applier = match &rc.ring {
        Some(path) => Some(
            Applier::new(path, Arc::clone(&db), Arc::new(SoftwareProvider)).map_err(|e| {
                RunError::Setup {
                    file: file.clone(),
                    msg: e.to_string(),
                }
            })?,
        ),
        None => None,
    };
    let hops = KernelNextHops::start(
        &[
            PortLink {
                port: PortId::Wan,
                ifname: wan_if.clone(),
            },
            PortLink {
                port: PortId::Lan,
                ifname: lan_if.clone(),
            },
        ],
        &installed.neighbors,
    )?;
    let mut ours: Vec<IpAddr> = d.wan.addresses.iter().map(|(a, _)| *a).collect();
    ours.extend(d.lan.addresses.iter().map(|(a, _)| *a));
    let mode = match rc.xdp_mode {
        XdpMode::Native => AttachMode::Native,
        XdpMode::Generic => AttachMode::Generic,
    };
    // A plain router (`mode = "forward"`) takes every routed packet on both ports, which is
    // what the LAN role does.
    let wan_role = if d.forward_only {
        PortRole::Lan
    } else {
        PortRole::Wan {
            encap_port: d.encap_port,
        }
    };
    let wan_xdp = XdpPort::attach(&wan_if, wan_role, &ours, mode)?;
    let lan_xdp = XdpPort::attach(&lan_if, PortRole::Lan, &ours, mode)?;
    tracing::info!(wan = %wan_if, lan = %lan_if, "XDP steering attached");

    let mut net = Network::new(
        d.wan.clone(),
        d.lan.clone(),
        d.encap_port,
        Box::new(SharedHops(Arc::clone(&hops))),
    );
    net.tcp_mss = d.tcp_mss;
    net.forward_only = d.forward_only;
    net.prefragment = d.prefragment;
    let shared = Arc::new(Shared {
        db: Arc::clone(&db),
        net: Arc::new(net),
        stop: Arc::clone(&stop),
        workers: rc
            .cores
            .iter()
            .map(|_| Mutex::new(WorkerStats::default()))
            .collect(),
        xdp: Mutex::new(vec![wan_xdp, lan_xdp]),
        hops: Arc::clone(&hops),
        started: Instant::now(),
    });

    let ring_thread = match applier {
        Some(a) => Some(start_ring_thread(a, &shared, &file, &rc)?),
        None => None,
    };
    let result = run_workers(&shared, &rc, &wan_if, &lan_if, &file);
    stop.store(true, Ordering::SeqCst);
    if let Some(h) = ring_thread
        && h.join().is_err()
    {
        tracing::error!("the SA ring thread panicked");
    }
    let final_stats = shared.snapshot();
    if let Ok(mut ports) = shared.xdp.lock() {
        for p in ports.drain(..) {
            let name = p.ifname().to_string();
            if let Err(e) = p.detach() {
                tracing::warn!(ifname = %name, "detaching the XDP program: {e}");
            }
        }
    }
    hops.stop();
    result.map(|()| final_stats)
}

fn run_workers(
    shared: &Arc<Shared>,
    rc: &config::RunConfig,
    wan_if: &str,
    lan_if: &str,
    file: &Path,
) -> Result<(), RunError> {
    let listener = bind_stats(&rc.stats_socket)?;
    let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
    let mut handles = Vec::new();
    let mut go = Vec::new();
    for (i, &core) in rc.cores.iter().enumerate() {
        let (go_tx, go_rx) = mpsc::channel::<bool>();
        go.push(go_tx);
        let shared = Arc::clone(shared);
        let ready = ready_tx.clone();
        let (wan, lan) = (wan_if.to_string(), lan_if.to_string());
        let rc = rc.clone();
        let h = std::thread::Builder::new()
            .name(format!("espgw-worker-{i}"))
            .spawn(move || worker(i, core, &rc, &wan, &lan, &shared, ready, go_rx))
            .map_err(|e| RunError::Worker {
                worker: i,
                core,
                msg: format!("spawning the thread: {e}"),
            })?;
        handles.push((i, core, h));
    }
    drop(ready_tx);
    // Every worker opens its sockets; then they go into the XSKMAPs and traffic starts.
    let mut failure = None;
    for _ in 0..rc.cores.len() {
        match ready_rx.recv() {
            Ok((i, Ok(fds))) => {
                if let Ok(mut ports) = shared.xdp.lock() {
                    for (port, queue, fd) in fds {
                        let idx = usize::from(port == PortId::Lan);
                        if let Some(p) = ports.get_mut(idx)
                            && let Err(e) = p.register_socket(queue, fd)
                        {
                            failure.get_or_insert(RunError::Xdp(Box::new(e)));
                        }
                    }
                }
                tracing::debug!(worker = i, "sockets registered");
            }
            Ok((i, Err(msg))) => {
                failure.get_or_insert(RunError::Worker {
                    worker: i,
                    core: rc.cores.get(i).copied().unwrap_or(0),
                    msg,
                });
            }
            Err(_) => break,
        }
    }
    let ok = failure.is_none();
    for g in &go {
        let _ = g.send(ok);
    }
    if ok {
        tracing::info!(
            workers = rc.cores.len(),
            config = %file.display(),
            stats = %rc.stats_socket.display(),
            "espgw-dataplane running"
        );
        eprintln!(
            "espgw-dataplane: running with {} worker(s) on cores {:?}; stats on {}; Ctrl-C stops",
            rc.cores.len(),
            rc.cores,
            rc.stats_socket.display()
        );
        main_loop(shared, &listener, rc.ring.is_none());
    }
    shared.stop.store(true, Ordering::SeqCst);
    for (i, core, h) in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                failure.get_or_insert(RunError::Worker {
                    worker: i,
                    core,
                    msg,
                });
            }
            Err(_) => {
                failure.get_or_insert(RunError::Worker {
                    worker: i,
                    core,
                    msg: "panicked".into(),
                });
            }
        }
    }
    let _ = std::fs::remove_file(&rc.stats_socket);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn bind_stats(path: &Path) -> Result<UnixListener, RunError> {
    let err = |err| RunError::Stats {
        path: path.to_path_buf(),
        err,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::other(
                "another espgw-dataplane is serving this socket (stop it, or set stats_socket)",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    // Counters name peers and SAs: owner and group only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// `log_sa_events`: false when the SA ring's thread takes the lifetime events (it logs them).
fn main_loop(shared: &Arc<Shared>, listener: &UnixListener, log_sa_events: bool) {
    let mut last_sweep = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let body = serde_json::to_string_pretty(&shared.snapshot()).unwrap_or_default();
                let _ = s.write_all(body.as_bytes());
                let _ = s.write_all(b"\n");
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("stats socket: {e}"),
        }
        if last_sweep.elapsed() >= Duration::from_millis(200) {
            last_sweep = Instant::now();
            shared.db.sweep(now_ns());
            if log_sa_events {
                log_events(shared);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if log_sa_events {
        log_events(shared);
    }
}

fn log_events(shared: &Shared) {
    for e in shared.db.drain_events() {
        log_event(&e);
    }
    for u in shared.db.drain_unknown_spi() {
        tracing::info!(
            spi = format_args!("{:#010x}", u.spi), src = %u.src, sport = u.sport,
            "ESP for an unknown SPI (reports are rate-limited; all are counted as unknown_spi)"
        );
    }
}

fn log_event(e: &crate::sa::Event) {
    use crate::sa::EventKind;
    let ev = serde_json::to_string(e).unwrap_or_default();
    let spi = format_args!("{:#010x}", e.spi);
    match e.kind {
        EventKind::SoftExpired { .. }
        | EventKind::HardExpired { .. }
        | EventKind::SeqNearExhaustion => {
            tracing::warn!(spi = %spi, event = %ev, "SA lifetime event")
        }
        EventKind::NatMappingChanged { .. } => {
            tracing::info!(spi = %spi, event = %ev, "the peer's NAT mapping changed")
        }
        EventKind::FirstPacket | EventKind::Idle { .. } => {
            tracing::debug!(spi = %spi, event = %ev, "SA event")
        }
    }
}

// ---- SA ring (issue 4): the applier runs in its own thread, "espgw-ring". ----
//
// Not in the main loop: that loop sleeps 20 ms between rounds and its `sweep` walks every SA
// (milliseconds at a million SAs), which would cap SA installs through the ring far below the
// target; not in a worker: applying must never stall forwarding. The thread busy-polls while
// there are commands and sleeps 1 ms when there are none (install latency ≤ ~1 ms, negligible
// CPU when idle). It also takes the SA database's lifetime events (sending them to the control
// process and logging them), so the main loop stops draining them.
//
// It runs at `ring_nice` (default 19) and, with `ring_core`, on that core: on a machine with a
// housekeeping core, pin it there; without one it shares the workers' CPUs, and the nice value
// makes the scheduler give forwarding precedence, so a burst of installs (a rekey storm, a
// control process re-pushing a million SAs) slows down instead of dropping traffic.

fn start_ring_thread(
    mut applier: Applier,
    shared: &Arc<Shared>,
    file: &Path,
    rc: &config::RunConfig,
) -> Result<std::thread::JoinHandle<()>, RunError> {
    if let Some(seg) = applier.segment() {
        tracing::info!(path = %seg.path().display(), "SA ring ready");
    }
    applier.set_event_hook(Box::new(log_event));
    let shared = Arc::clone(shared);
    let (nice, core) = (rc.ring_nice, rc.ring_core);
    std::thread::Builder::new()
        .name("espgw-ring".into())
        .spawn(move || {
            if let Some(core) = core
                && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
            {
                tracing::warn!(core, "could not pin the SA ring thread to its core");
            }
            // On Linux a thread id names the thread alone for setpriority.
            let me = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(me), nice) {
                tracing::warn!(nice, "could not set the SA ring thread's nice value: {e}");
            }
            while !shared.stop.load(Ordering::Relaxed) {
                if applier.poll(now_ns()) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            applier.poll(now_ns());
        })
        .map_err(|e| RunError::Setup {
            file: file.to_path_buf(),
            msg: format!("spawning the SA ring thread: {e}"),
        })
}

/// One worker: pinned to `core`, serving queue `idx` of both ports.
#[allow(clippy::too_many_arguments)]
fn worker(
    idx: usize,
    core: usize,
    rc: &config::RunConfig,
    wan_if: &str,
    lan_if: &str,
    shared: &Shared,
    ready: mpsc::Sender<Ready>,
    go: mpsc::Receiver<bool>,
) -> Result<(), String> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        tracing::warn!(worker = idx, core, "could not pin the worker to its core");
    }
    let queue = idx as u32;
    let opened = XskWorker::open(
        &[(PortId::Wan, wan_if), (PortId::Lan, lan_if)],
        queue,
        rc.umem_frames,
        rc.ring_size,
    );
    let mut xw = match opened {
        Ok(w) => {
            let fds = w
                .sockets()
                .iter()
                .map(|s| (s.port, s.queue, s.fd()))
                .collect();
            let _ = ready.send((idx, Ok(fds)));
            w
        }
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send((idx, Err(msg.clone())));
            return Err(msg);
        }
    };
    if !go.recv().unwrap_or(false) {
        return Ok(());
    }
    let mut pipe = Pipeline::new(
        Arc::clone(&shared.db),
        Arc::clone(&shared.net),
        WorkerCtx::new(),
    );
    let batch = (rc.batch_size as usize).clamp(1, MAX_BATCH);
    let ports: Vec<PortId> = xw.sockets().iter().map(|s| s.port).collect();
    let mut descs: Vec<XdpDesc> = Vec::with_capacity(batch);
    let mut io = BurstIo::new(batch);
    let mut reasm = Reassembler::new();
    let reassemble = !shared.net.forward_only;
    let mut idle = 0u32;
    let mut idle_polls = 0u64;
    let mut last_publish = Instant::now();
    let fds: Vec<i32> = xw.sockets().iter().map(|s| s.fd()).collect();
    while !shared.stop.load(Ordering::Relaxed) {
        xw.reclaim();
        let mut got = 0;
        for (i, &port) in ports.iter().enumerate() {
            xw.refill(i);
            xw.receive(i, batch as u32, &mut descs);
            if descs.is_empty() {
                continue;
            }
            got += descs.len();
            let now = now_ns();
            let r = (reassemble && port == PortId::Wan).then_some(&mut reasm);
            io.run(&mut xw, &mut pipe, port, &descs, now, r);
            if !io.frag_jobs.is_empty() {
                io.fragment(&mut xw, &mut pipe, port, now);
            }
        }
        if got == 0 {
            xw.kick();
            idle += 1;
            if idle > 64 {
                // Nothing for a while: sleep in poll() until a socket has frames (or 10 ms pass,
                // to see the stop flag and publish counters).
                idle_polls += 1;
                poll_rx(&fds, 10);
            }
        } else {
            idle = 0;
        }
        if last_publish.elapsed() >= Duration::from_millis(100) {
            last_publish = Instant::now();
            reasm.expire(now_ns());
            io.extra
                .add(DropReason::FragmentTimeout, reasm.take_timeout_drops());
            publish(
                shared, idx, core, queue, &pipe, &xw, &io.extra, &reasm, idle_polls,
            );
        }
    }
    publish(
        shared, idx, core, queue, &pipe, &xw, &io.extra, &reasm, idle_polls,
    );
    Ok(())
}

/// A worker's per-burst scratch (allocated once) and the drops it counts beside the pipeline.
struct BurstIo {
    verdicts: Vec<Verdict>,
    /// TX descriptors per port (0 = WAN, 1 = LAN).
    out: [Vec<XdpDesc>; 2],
    /// Drops outside the pipeline: full TX rings, fragments, bad descriptors, host-bound.
    extra: DropCounts,
    /// Frames to fragment before encryption: (frame, packet start, length, largest piece).
    frag_jobs: Vec<(u64, usize, usize, u16)>,
    scratch: Vec<u8>,
}

/// Where pieces of a fragmented packet are written in their frames (the kernel's RX offset,
/// so the ESP headers fit in front as for received frames).
const PIECE_AT: u64 = 256;

impl BurstIo {
    fn new(batch: usize) -> BurstIo {
        BurstIo {
            verdicts: vec![Verdict::Drop(DropReason::Unsupported); batch.max(64)],
            out: [Vec::with_capacity(batch), Vec::with_capacity(batch)],
            extra: DropCounts::default(),
            frag_jobs: Vec::with_capacity(batch),
            scratch: Vec::with_capacity(xsk::FRAME_SIZE as usize),
        }
    }

    /// Run received frames through the pipeline and queue the results for transmission.
    fn run(
        &mut self,
        xw: &mut XskWorker,
        pipe: &mut Pipeline,
        port: PortId,
        descs: &[XdpDesc],
        now: u64,
        mut reasm: Option<&mut Reassembler>,
    ) {
        self.out[0].clear();
        self.out[1].clear();
        let mut to_free: ArrayVec<u64, MAX_BATCH> = ArrayVec::new();
        {
            let mut bufs = Vec::new();
            xw.frames_mut(descs, &mut bufs);
            let mut frames: ArrayVec<Frame<'_>, MAX_BATCH> = ArrayVec::new();
            let mut bases: ArrayVec<u64, MAX_BATCH> = ArrayVec::new();
            for (d, b) in descs.iter().zip(bufs) {
                let base = d.addr - d.addr % u64::from(xsk::FRAME_SIZE);
                let Some((buf, off, len)) = b else {
                    self.extra.add(DropReason::Malformed, 1);
                    to_free.push(base);
                    continue;
                };
                // Outer fragments of ESP are put back together before the pipeline.
                let (off, len) = match reasm.as_deref_mut() {
                    None => (off, len),
                    Some(r) => match r.push(buf, off, len, now) {
                        Outcome::NotFragment => (off, len),
                        Outcome::Complete(at, n) => (at, n),
                        Outcome::Held => {
                            to_free.push(base);
                            continue;
                        }
                        Outcome::Drop(reason) => {
                            self.extra.add(reason, 1);
                            to_free.push(base);
                            continue;
                        }
                    },
                };
                match Frame::new(buf, off, len) {
                    Some(f) => {
                        frames.push(f);
                        bases.push(base);
                    }
                    None => {
                        self.extra.add(DropReason::Malformed, 1);
                        to_free.push(base);
                    }
                }
            }
            let n = frames.len().min(self.verdicts.len());
            pipe.process(port, &mut frames[..n], &mut self.verdicts[..n], now);
            for ((f, v), base) in frames.iter().zip(&self.verdicts[..n]).zip(&bases) {
                let desc = XdpDesc {
                    addr: base + f.start() as u64,
                    len: f.len() as u32,
                    options: 0,
                };
                match v {
                    Verdict::TxWan => self.out[0].push(desc),
                    Verdict::TxLan => self.out[1].push(desc),
                    Verdict::ToHost => {
                        self.extra.add(DropReason::NoHostPath, 1);
                        to_free.push(*base);
                    }
                    Verdict::Drop(_) => to_free.push(*base),
                    Verdict::Fragment(max) => {
                        self.frag_jobs.push((*base, f.start(), f.len(), *max));
                    }
                }
            }
        }
        for a in to_free {
            xw.release(a);
        }
        for (o, list) in self.out.iter().enumerate() {
            if !list.is_empty() {
                let lost = xw.transmit(o, list) as u64;
                self.extra.add(DropReason::TxRingFull, lost);
            }
        }
    }

    /// Fragmentation before encryption: split each packet the pipeline marked into IPv4
    /// fragments in fresh frames and run those through the pipeline.
    fn fragment(&mut self, xw: &mut XskWorker, pipe: &mut Pipeline, port: PortId, now: u64) {
        let jobs = std::mem::take(&mut self.frag_jobs);
        for &(base, start, len, max) in &jobs {
            self.scratch.clear();
            if let Some(frame) = xw.frame(base)
                && let Some(pkt) = frame.get(start..start + len)
            {
                self.scratch.extend_from_slice(pkt);
            }
            xw.release(base);
            let mut pieces: ArrayVec<XdpDesc, 64> = ArrayVec::new();
            let mut lost = 0;
            let n = icmp::fragment_frame(&self.scratch, usize::from(max), |eth, h, d| {
                let Some(b) = xw.alloc() else {
                    lost += 1;
                    return;
                };
                let at = PIECE_AT as usize;
                let total = eth.len() + h.len() + d.len();
                match xw.frame(b).and_then(|f| f.get_mut(at..at + total)) {
                    Some(dst) if !pieces.is_full() => {
                        dst[..eth.len()].copy_from_slice(eth);
                        dst[eth.len()..eth.len() + h.len()].copy_from_slice(h);
                        dst[eth.len() + h.len()..].copy_from_slice(d);
                        pieces.push(XdpDesc {
                            addr: b + PIECE_AT,
                            len: total as u32,
                            options: 0,
                        });
                    }
                    _ => {
                        xw.release(b);
                        lost += 1;
                    }
                }
            });
            if n == 0 || lost > 0 {
                // All or nothing: a datagram missing a fragment is useless to the receiver.
                for p in &pieces {
                    xw.release(p.addr);
                }
                let reason = if n == 0 {
                    DropReason::MtuExceeded
                } else {
                    DropReason::NoBufferSpace
                };
                self.extra.add(reason, 1);
                continue;
            }
            self.run(xw, pipe, port, &pieces, now, None);
        }
        // Pieces are never fragmented again (each fits), so no new jobs were queued.
        self.frag_jobs = jobs;
        self.frag_jobs.clear();
    }
}

#[allow(clippy::too_many_arguments)]
fn publish(
    shared: &Shared,
    idx: usize,
    core: usize,
    queue: u32,
    pipe: &Pipeline,
    xw: &XskWorker,
    extra: &DropCounts,
    reasm: &Reassembler,
    idle_polls: u64,
) {
    // Between bursts the worker holds no frame: every one is free or in a ring.
    if !xw.frames_accounted() {
        tracing::error!(
            worker = idx,
            free = xw.free_frames(),
            "AF_XDP frame accounting is off: a frame was lost or freed twice"
        );
    }
    let mut counters = pipe.counters().clone();
    for r in DropReason::ALL {
        counters.drops.add(*r, extra.get(*r));
    }
    let sockets = xw
        .sockets()
        .iter()
        .map(|s| {
            serde_json::json!({
                "port": s.port,
                "interface": s.ifname,
                "queue": s.queue,
                "mode": if s.zero_copy { "zero-copy" } else { "copy" },
                "kernel": s.kernel_stats(),
            })
        })
        .collect();
    if let Some(slot) = shared.workers.get(idx)
        && let Ok(mut w) = slot.lock()
    {
        *w = WorkerStats {
            core,
            queue,
            counters,
            sockets,
            idle_polls,
            reassembly: reasm.stats,
        };
    }
}

fn poll_rx(fds: &[i32], timeout_ms: i32) {
    let mut p: ArrayVec<libc::pollfd, 4> = fds
        .iter()
        .take(4)
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a live array of `p.len()` pollfd structs; poll only writes their revents.
    unsafe {
        libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms);
    }
}
