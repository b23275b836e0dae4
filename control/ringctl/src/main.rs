//! `espgw-ringctl`: drives a data plane's SA ring by hand, for tests and benchmarks: push and
//! delete many SAs, run a tunnel between two data planes with make-before-break rekeying,
//! print events and counters, flush. Output is one JSON object per line on stdout; errors are
//! plain sentences on stderr with a non-zero exit status.

use clap::{Args, Parser, Subcommand};
use espgw_ring::{
    DfMode, Direction, DscpMode, EcnMode, EncAlg, IntegAlg, IpPrefix, Lifetimes, Mode, SaSpec,
    UdpEncap,
};
use espgw_ringctl::keys::Random;
use espgw_ringctl::{
    Client, ClientError, ClientOptions, Endpoint, Event, Health, Side, Tunnel, TunnelConfig, json,
};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ONE_CONTROL: &str = "Only one control process may attach to a segment at a time: while \
espgw-control or another espgw-ringctl is attached, this tool fails with \"another control \
process is attached to this segment\".";

#[derive(Parser, Debug)]
#[command(
    name = "espgw-ringctl",
    version,
    about = "Drive an espgw data plane through its shared-memory SA ring",
    long_about = format!("Drive an espgw data plane through its shared-memory SA ring \
(the file the data plane creates under /dev/shm, e.g. [dataplane] ring in its configuration).\n\n\
Output is one JSON object per line on stdout; errors go to stderr with a non-zero exit status. \
Key material is never printed.\n\n{ONE_CONTROL}"),
    after_help = ONE_CONTROL
)]
struct Cli {
    /// How long to wait for the data plane to create the segment.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0)]
    attach_timeout: f64,
    /// How long to wait for the data plane's answer to a command.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 5.0)]
    command_timeout: f64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install N SAs with random keys (pipelined) and print installs per second; optionally
    /// delete them again and print deletes per second.
    Push(PushArgs),
    /// Establish a tunnel between two data planes (this tool plays both IKE peers), then
    /// rekey it make-before-break on a schedule. Prints {"established": …} when the tunnel is
    /// up, one {"rekey": …} per rekey, and every event of either data plane. SIGINT/SIGTERM
    /// end it, leaving the tunnel's SAs installed.
    Tunnel(TunnelArgs),
    /// Print the data plane's events as JSON lines.
    Events(EventsArgs),
    /// Print the counters of every SA installed through the ring.
    Counters(RingArg),
    /// Remove every SA and policy installed through the ring (not the configuration file's).
    Flush(RingArg),
}

#[derive(Args, Debug)]
struct RingArg {
    /// The data plane's segment, e.g. /dev/shm/espgw-ring.
    #[arg(long, value_name = "PATH")]
    ring: PathBuf,
}

#[derive(Args, Debug)]
struct PushArgs {
    /// The data plane's segment.
    #[arg(long, value_name = "PATH")]
    ring: PathBuf,
    /// How many SAs.
    #[arg(long, value_name = "N")]
    count: u64,
    /// Most unacknowledged commands in flight.
    #[arg(long, value_name = "W", default_value_t = 1024)]
    window: usize,
    /// Delete the SAs again afterwards (and print deletes per second).
    #[arg(long)]
    delete: bool,
    /// Which SAs: in, out, or both (alternating).
    #[arg(long, value_name = "DIR", default_value = "in")]
    direction: String,
    /// Our outer address in the SAs.
    #[arg(long, value_name = "IP", default_value = "192.0.2.1")]
    local: IpAddr,
    /// The peer's outer address in the SAs.
    #[arg(long, value_name = "IP", default_value = "198.51.100.1")]
    remote: IpAddr,
    /// Encryption algorithm (aes128gcm16, aes256gcm16, aes128-cbc, …).
    #[arg(long, value_name = "ALG", default_value = "aes128gcm16")]
    enc_alg: String,
    /// Integrity algorithm for the CBC ciphers and null (hmac-sha2-256-128, …).
    #[arg(long, value_name = "ALG", default_value = "none")]
    integ_alg: String,
}

#[derive(Args, Debug)]
struct TunnelArgs {
    /// Gateway A's segment.
    #[arg(long, value_name = "PATH")]
    a_ring: PathBuf,
    /// Gateway B's segment.
    #[arg(long, value_name = "PATH")]
    b_ring: PathBuf,
    /// Gateway A's outer address.
    #[arg(long, value_name = "IP")]
    a_addr: IpAddr,
    /// Gateway B's outer address.
    #[arg(long, value_name = "IP")]
    b_addr: IpAddr,
    /// The subnet behind A.
    #[arg(long, value_name = "CIDR")]
    a_net: String,
    /// The subnet behind B.
    #[arg(long, value_name = "CIDR")]
    b_net: String,
    /// ESP-in-UDP with these ports (A's:B's), e.g. 4500:4500.
    #[arg(long, value_name = "SPORT:DPORT")]
    encap: Option<String>,
    /// Rekey every SECS seconds (fractions allowed); without it, no rekeys.
    #[arg(long, value_name = "SECS")]
    rekey_every: Option<f64>,
    /// Stop after SECS seconds; without it, run until SIGINT/SIGTERM.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// How long an old inbound SA stays after a rekey.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    drain_ms: u64,
    /// SA lifetime in seconds: HARD (soft = 90 %) or SOFT:HARD.
    #[arg(long, value_name = "[SOFT:]HARD")]
    lifetime_seconds: Option<String>,
    /// SA lifetime in bytes: HARD (soft = 90 %) or SOFT:HARD.
    #[arg(long, value_name = "[SOFT:]HARD")]
    lifetime_bytes: Option<String>,
    /// SA lifetime in packets: HARD (soft = 90 %) or SOFT:HARD.
    #[arg(long, value_name = "[SOFT:]HARD")]
    lifetime_packets: Option<String>,
    /// Anti-replay window of the inbound SAs.
    #[arg(long, value_name = "N", default_value_t = 128)]
    replay_window: u32,
    /// Encryption algorithm.
    #[arg(long, value_name = "ALG", default_value = "aes128gcm16")]
    enc_alg: String,
    /// Integrity algorithm (for the CBC ciphers and null).
    #[arg(long, value_name = "ALG", default_value = "none")]
    integ_alg: String,
    /// Extended sequence numbers.
    #[arg(long)]
    esn: bool,
    /// The tunnel's name (at most 12 bytes; part of every SA name).
    #[arg(long, value_name = "NAME", default_value = "t1")]
    name: String,
    /// The protect policy's id on each side.
    #[arg(long, value_name = "ID", default_value_t = 1)]
    policy_id: u32,
    /// Follow data-plane restarts: reattach, re-push everything, then rekey.
    #[arg(long)]
    watch: bool,
}

#[derive(Args, Debug)]
struct EventsArgs {
    /// The data plane's segment.
    #[arg(long, value_name = "PATH")]
    ring: PathBuf,
    /// Stop after SECS seconds; without it, run until SIGINT/SIGTERM.
    #[arg(long = "for", value_name = "SECS")]
    for_secs: Option<f64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM set [`STOP`].
fn install_signal_handlers() -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let handler = on_signal as extern "C" fn(libc::c_int);
        // SAFETY: the handler only stores to an atomic (async-signal-safe); the sigaction
        // structure is zero-initialised (a valid value for this plain C struct), then given
        // the handler and an empty mask; the old action is not asked for (null).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!(
                "cannot install a signal handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Prints one JSON line (a closed stdout is ignored).
fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("espgw-ringctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn secs(what: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("{what}: {v} is not a duration in seconds"))
}

fn run(cli: Cli) -> Result<(), String> {
    install_signal_handlers()?;
    let opts = ClientOptions {
        attach_timeout: secs("--attach-timeout", cli.attach_timeout)?,
        command_timeout: secs("--command-timeout", cli.command_timeout)?,
        ..ClientOptions::default()
    };
    match cli.cmd {
        Cmd::Push(a) => push(a, opts),
        Cmd::Tunnel(a) => tunnel(a, opts),
        Cmd::Events(a) => events(a, opts),
        Cmd::Counters(a) => {
            let mut c = attach(&a.ring, &opts)?;
            let all = c.query_counters(None).map_err(|e| e.to_string())?;
            for x in &all {
                emit(&json::counters(x, None));
            }
            emit(&json!({ "sas": all.len() }));
            Ok(())
        }
        Cmd::Flush(a) => {
            let mut c = attach(&a.ring, &opts)?;
            c.flush().map_err(|e| e.to_string())?;
            emit(&json!({ "flushed": true }));
            Ok(())
        }
    }
}

fn attach(path: &std::path::Path, opts: &ClientOptions) -> Result<Client, String> {
    Client::attach(path, opts.clone()).map_err(|e| match &e {
        ClientError::Attach(espgw_ring::SegmentError::Busy { .. }) => format!(
            "{e} (only one control process may attach at a time: is espgw-control or another espgw-ringctl running?)"
        ),
        _ => e.to_string(),
    })
}

fn enc_alg(s: &str) -> Result<EncAlg, String> {
    EncAlg::ALL
        .iter()
        .copied()
        .find(|a| a.name() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = EncAlg::ALL.iter().map(|a| a.name()).collect();
            format!(
                "unknown encryption algorithm {s:?} (one of {})",
                names.join(", ")
            )
        })
}

fn integ_alg(s: &str) -> Result<IntegAlg, String> {
    IntegAlg::ALL
        .iter()
        .copied()
        .find(|a| a.name() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = IntegAlg::ALL.iter().map(|a| a.name()).collect();
            format!(
                "unknown integrity algorithm {s:?} (one of {})",
                names.join(", ")
            )
        })
}

fn algorithms(enc: &str, integ: &str) -> Result<(EncAlg, IntegAlg), String> {
    let e = enc_alg(enc)?;
    let i = integ_alg(integ)?;
    if e.is_aead() && i != IntegAlg::None {
        return Err(format!(
            "{e} takes no integrity algorithm (--integ-alg none)"
        ));
    }
    if !e.is_aead() && i == IntegAlg::None {
        return Err(format!("{e} needs an integrity algorithm (--integ-alg)"));
    }
    Ok((e, i))
}

/// `10.1.0.0/16`.
fn cidr(what: &str, s: &str) -> Result<IpPrefix, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{what}: {s:?} is not ADDRESS/LENGTH"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{what}: {addr:?} is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{what}: {len:?} is not a prefix length"))?;
    let width = if addr.is_ipv4() { 32 } else { 128 };
    if len > width {
        return Err(format!("{what}: prefix length {len} exceeds {width}"));
    }
    Ok(IpPrefix { addr, len })
}

/// `HARD` (soft = 90 %) or `SOFT:HARD`.
fn limit(what: &str, s: Option<&str>) -> Result<(u64, u64), String> {
    let Some(s) = s else { return Ok((0, 0)) };
    let num = |x: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|_| format!("{what}: {x:?} is not a whole number"))
    };
    let (soft, hard) = match s.split_once(':') {
        Some((soft, hard)) => (num(soft)?, num(hard)?),
        None => {
            let hard = num(s)?;
            (hard - hard / 10, hard)
        }
    };
    if soft > hard && hard != 0 {
        return Err(format!(
            "{what}: the soft limit {soft} is above the hard one {hard}"
        ));
    }
    Ok((soft, hard))
}

fn push(a: PushArgs, opts: ClientOptions) -> Result<(), String> {
    let (enc, integ) = algorithms(&a.enc_alg, &a.integ_alg)?;
    let dirs: &[Direction] = match a.direction.as_str() {
        "in" => &[Direction::In],
        "out" => &[Direction::Out],
        "both" => &[Direction::In, Direction::Out],
        other => return Err(format!("--direction: {other:?} is not in, out or both")),
    };
    if a.local.is_ipv4() != a.remote.is_ipv4() {
        return Err("--local and --remote are of different families".into());
    }
    let mut c = attach(&a.ring, &opts)?;
    let rng = Random::new();
    let tag = rng.u32().map_err(|e| e.to_string())?;
    let mut spis = HashSet::new();
    let mut specs = Vec::with_capacity(usize::try_from(a.count).unwrap_or(0));
    for i in 0..a.count {
        let spi = rng
            .spi(|s| spis.contains(&s) || c.spi_in_use(s))
            .map_err(|e| e.to_string())?;
        spis.insert(spi);
        let k = rng.key_material(enc, integ).map_err(|e| e.to_string())?;
        let direction = dirs[(i % dirs.len() as u64) as usize];
        specs.push(SaSpec {
            generation: 0,
            spi,
            direction,
            mode: Mode::Tunnel,
            reqid: 0,
            name: format!("rc{tag:08x}-{i}"),
            local: a.local,
            remote: a.remote,
            encap: None,
            enc_alg: enc,
            integ_alg: integ,
            enc_key: k.enc_key,
            salt: k.salt,
            integ_key: k.integ_key,
            icv_len: enc
                .aead_icv_len()
                .unwrap_or(integ.icv_len())
                .try_into()
                .unwrap_or(0),
            esn: false,
            initial_seq: 0,
            replay_window: 128,
            lifetime: Lifetimes::default(),
            selectors: Vec::new(),
            df: DfMode::Copy,
            dscp: DscpMode::Copy,
            ecn: EcnMode::Normal,
            outer_ttl: 64,
        });
    }
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let r = c
        .add_sas_pipelined(specs, a.window)
        .map_err(|e| e.to_string())?;
    emit(&json!({ "installs": {
        "pushed": r.pushed, "applied": r.applied, "rejected": r.rejected,
        "seconds": r.seconds, "per_second": rate(r.applied, r.seconds),
        "window": a.window, "rejections": r.rejections,
    }}));
    let mut failed = (r.rejected > 0).then(|| {
        format!(
            "{} of {} installs were rejected (first: {})",
            r.rejected,
            r.pushed,
            r.rejections
                .first()
                .map(|(w, why)| format!("{w}: {why}"))
                .unwrap_or_default()
        )
    });
    if a.delete {
        let installed: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| c.sa(n).is_some())
            .collect();
        let d = c
            .delete_sas_pipelined(installed, a.window)
            .map_err(|e| e.to_string())?;
        emit(&json!({ "deletes": {
            "pushed": d.pushed, "applied": d.applied, "rejected": d.rejected,
            "seconds": d.seconds, "per_second": rate(d.applied, d.seconds),
            "window": a.window, "rejections": d.rejections,
        }}));
        if d.rejected > 0 && failed.is_none() {
            failed = Some(format!(
                "{} of {} deletes were rejected",
                d.rejected, d.pushed
            ));
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn rate(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

fn print_events(side: Option<Side>, c: &mut Client) -> Result<(), ClientError> {
    for e in c.drain_events()? {
        emit(&event_line(side, c, &e));
    }
    Ok(())
}

fn event_line(side: Option<Side>, c: &Client, e: &Event) -> Value {
    let name = json::event_sa(e)
        .and_then(|r| c.resolve(r))
        .map(|s| s.name.as_str());
    let mut v = json::event(e, name);
    if let (Some(side), Some(o)) = (side, v.as_object_mut()) {
        o.insert("side".into(), json!(side));
    }
    v
}

fn events(a: EventsArgs, opts: ClientOptions) -> Result<(), String> {
    let end = match a.for_secs {
        Some(s) => Some(Instant::now() + secs("--for", s)?),
        None => None,
    };
    let mut c = attach(&a.ring, &opts)?;
    while !stopping() && end.is_none_or(|e| Instant::now() < e) {
        let wait = end
            .map(|e| e.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::MAX)
            .min(Duration::from_millis(100));
        if let Some(e) = c.next_event(wait).map_err(|e| e.to_string())? {
            emit(&event_line(None, &c, &e));
        }
    }
    Ok(())
}

fn tunnel(t: TunnelArgs, opts: ClientOptions) -> Result<(), String> {
    let (enc, integ) = algorithms(&t.enc_alg, &t.integ_alg)?;
    let a_ep = Endpoint {
        addr: t.a_addr,
        net: cidr("--a-net", &t.a_net)?,
    };
    let b_ep = Endpoint {
        addr: t.b_addr,
        net: cidr("--b-net", &t.b_net)?,
    };
    let mut cfg = TunnelConfig::new(t.name.clone(), a_ep, b_ep);
    cfg.enc_alg = enc;
    cfg.integ_alg = integ;
    cfg.esn = t.esn;
    cfg.replay_window = t.replay_window;
    cfg.policy_id = t.policy_id;
    cfg.drain = Duration::from_millis(t.drain_ms);
    if let Some(e) = &t.encap {
        let (s, d) = e
            .split_once(':')
            .ok_or_else(|| format!("--encap: {e:?} is not SPORT:DPORT"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("--encap: {p:?} is not a port (1…65535)"))
        };
        cfg.encap = Some(UdpEncap {
            local_port: port(s)?,
            remote_port: port(d)?,
        });
    }
    let (ss, hs) = limit("--lifetime-seconds", t.lifetime_seconds.as_deref())?;
    let (sb, hb) = limit("--lifetime-bytes", t.lifetime_bytes.as_deref())?;
    let (sp, hp) = limit("--lifetime-packets", t.lifetime_packets.as_deref())?;
    cfg.lifetime = Lifetimes {
        soft_seconds: ss,
        hard_seconds: hs,
        soft_bytes: sb,
        hard_bytes: hb,
        soft_packets: sp,
        hard_packets: hp,
    };
    let every = match t.rekey_every {
        Some(s) if s > 0.0 => Some(secs("--rekey-every", s)?),
        Some(_) => return Err("--rekey-every must be above 0".into()),
        None => None,
    };
    let end = match t.duration {
        Some(s) => Some(Instant::now() + secs("--duration", s)?),
        None => None,
    };
    let mut tun = Tunnel::new(cfg).map_err(|e| e.to_string())?;
    let mut a = attach(&t.a_ring, &opts)?;
    let mut b = attach(&t.b_ring, &opts)?;
    let spis = tun.establish(&mut a, &mut b).map_err(|e| e.to_string())?;
    emit(&json!({ "established": {
        "tunnel": t.name, "sas": spis,
        "a_dp_generation": a.dp_generation(), "b_dp_generation": b.dp_generation(),
    }}));
    let mut next_rekey = every.map(|e| Instant::now() + e);
    let mut next_counters = Instant::now() + Duration::from_secs(1);
    let mut down = [false, false];
    let mut result = Ok(());
    while !stopping() && end.is_none_or(|e| Instant::now() < e) {
        for (i, side) in [Side::A, Side::B].into_iter().enumerate() {
            let c = if side == Side::A { &mut a } else { &mut b };
            if let Err(e) = print_events(Some(side), c)
                && !t.watch
            {
                result = Err(e.to_string());
            }
            if t.watch {
                match c.ensure_current() {
                    Ok(Health::Current) => down[i] = false,
                    Ok(Health::DataPlaneDown | Health::Waiting(_)) => {
                        if !down[i] {
                            emit(&json!({ "data_plane_down": { "side": side } }));
                        }
                        down[i] = true;
                    }
                    Ok(Health::Resynced(r)) => {
                        down[i] = false;
                        emit(&json!({ "resynced": { "side": side, "report": r } }));
                        // The re-pushed outbound SAs' sequence numbers were estimated: fresh
                        // keys now.
                        if every.is_some() || tun.rekeys() > 0 {
                            next_rekey = Some(Instant::now());
                        }
                    }
                    Err(e) => emit(&json!({ "error": e.to_string(), "side": side })),
                }
            }
        }
        if result.is_err() {
            break;
        }
        let now = Instant::now();
        match tun.poll(&mut a, &mut b, now) {
            Ok(done) => {
                for name in done {
                    emit(&json!({ "drained": { "tunnel": t.name, "sa": name } }));
                }
            }
            Err(e) if t.watch => emit(&json!({ "error": e.to_string() })),
            Err(e) => {
                result = Err(e.to_string());
                break;
            }
        }
        if next_rekey.is_some_and(|r| now >= r) && down == [false, false] {
            match tun.rekey(&mut a, &mut b) {
                Ok(r) => emit(&json!({ "rekey": r })),
                Err(e) if t.watch => emit(&json!({ "error": e.to_string() })),
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            }
            // A fixed cadence (a rekey every N s, not N s after the last one ended), unless
            // the rekey took longer than the period: then the next one is a period from now.
            next_rekey = match (next_rekey, every) {
                (Some(due), Some(e)) if due + e > Instant::now() => Some(due + e),
                _ => every.map(|e| Instant::now() + e),
            };
        }
        if t.watch && now >= next_counters && down == [false, false] {
            // Keeps the last sequence numbers fresh for a re-push after a restart.
            for c in [&mut a, &mut b] {
                if let Err(e) = c.query_counters(None) {
                    emit(&json!({ "error": e.to_string() }));
                }
            }
            next_counters = now + Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if result.is_ok() {
        // Let the last drain run out, then leave the tunnel installed.
        let until = Instant::now() + tun.config().drain;
        while !tun.draining().is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(n) = tun.finish_drain(&mut a, &mut b)
            && n > 0
        {
            emit(&json!({ "drained": { "tunnel": t.name, "count": n } }));
        }
        let _ = print_events(Some(Side::A), &mut a);
        let _ = print_events(Some(Side::B), &mut b);
        emit(
            &json!({ "stopped": { "tunnel": t.name, "rekeys": tun.rekeys(), "sas": tun.current() } }),
        );
    }
    result
}
