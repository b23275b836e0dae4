//! Static configuration: SAs, policies, ports and next hops from a TOML file.
//!
//! Every problem is reported with the file, line and column it comes from and a reason in plain
//! words; all problems are collected, not just the first. Suspicious but legal settings
//! (overlapping policies, weak algorithms, a local address that is not one of the gateway's)
//! come back as warnings. The schema is documented in the README.
//!
//! Key material is read into strings that are zeroized once converted, and the file text itself
//! is zeroized after parsing.

use crate::antireplay::MAX_WINDOW;
use crate::nexthop::StaticNextHops;
use crate::pipeline::Network;
use crate::policy::{Action, Policy, PortRange, Prefix, Selector, Spd};
use crate::sa::{DfMode, Direction, DscpMode, EcnMode, Lifetime, Mode, SaParams, UdpEncap};
use crate::sadb::{SaDb, SadbError};
use espgw_crypto::{CipherAlg, CryptoProvider, IntegAlg, SaKeys, Transform};
use espgw_wire::ethernet::EthernetAddress;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;
use zeroize::{Zeroize, Zeroizing};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong, in words.
    pub message: String,
}

/// A configuration that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or a label such as `<embedded>`).
    pub file: PathBuf,
    /// Every problem found.
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                d.line,
                d.column,
                d.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// One gateway port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Our MAC address on the port.
    pub mac: EthernetAddress,
    /// Our addresses with their connected prefixes.
    pub addresses: Vec<(IpAddr, Prefix)>,
    /// IP MTU.
    pub mtu: u16,
    /// 802.1Q VLAN for frames we send (frames received may be tagged or not).
    pub vlan: Option<u16>,
    /// The Linux interface (live gateway only; replay needs none).
    pub interface: Option<String>,
    /// Whether `mac` and `mtu` were configured (the live gateway otherwise takes the
    /// interface's).
    pub mac_set: bool,
    /// See `mac_set`.
    pub mtu_set: bool,
}

impl PortConfig {
    /// Is `a` one of our addresses on this port?
    pub fn is_local(&self, a: &IpAddr) -> bool {
        self.addresses.iter().any(|(x, _)| x == a)
    }
}

/// The ports a frame can arrive on or leave by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortId {
    /// Towards the peers (ESP side).
    Wan,
    /// Towards the protected network (plaintext side).
    Lan,
    /// The gateway host's own stack (locally originated / terminated traffic).
    Host,
}

impl std::str::FromStr for PortId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wan" => Ok(PortId::Wan),
            "lan" => Ok(PortId::Lan),
            "host" => Ok(PortId::Host),
            _ => Err(format!("unknown port {s:?} (expected wan, lan or host)")),
        }
    }
}

/// A static route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Destination prefix.
    pub dst: Prefix,
    /// Next hop, or `None` for directly connected.
    pub via: Option<IpAddr>,
    /// Outgoing port (wan or lan).
    pub port: PortId,
}

/// The `[dataplane]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Default anti-replay window for inbound SAs that set none.
    pub replay_window: u32,
    /// SA table capacity.
    pub max_sas: usize,
    /// What happens to LAN traffic no policy matches.
    pub default_action: Action,
    /// Outer TTL / hop limit for tunnel mode.
    pub outer_ttl: u8,
    /// UDP port that carries ESP-in-UDP on the WAN side (4500).
    pub encap_port: u16,
    /// WAN port.
    pub wan: PortConfig,
    /// LAN port.
    pub lan: PortConfig,
    /// Clamp the MSS option of TCP SYNs crossing the gateway to this value (Cisco's
    /// `ip tcp adjust-mss`), or leave them alone.
    pub tcp_mss: Option<u16>,
    /// Fragment IPv4 packets without DF that do not fit their tunnel before encryption
    /// (default) instead of dropping them.
    pub prefragment: bool,
    /// `ipsec` (the gateway) or `forward` (a plain router over the same path, no IPsec: the
    /// forwarding benchmark's baseline).
    pub forward_only: bool,
    /// The live gateway's workers, queues and sockets.
    pub run: RunConfig,
}

/// How the live gateway (`espgw-dataplane run`) runs: cores, queues, AF_XDP sizing, stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// One worker per core; worker `i` serves RX/TX queue `i` of both ports.
    pub cores: Vec<usize>,
    /// Frames per receive burst.
    pub batch_size: u32,
    /// UMEM frames (2 KiB each) per worker, shared by its WAN and LAN sockets.
    pub umem_frames: u32,
    /// Entries in each AF_XDP ring (fill, completion, RX, TX); a power of two.
    pub ring_size: u32,
    /// XDP attach mode.
    pub xdp_mode: XdpMode,
    /// Unix socket serving the counters as JSON.
    pub stats_socket: std::path::PathBuf,
    /// `ring = "/dev/shm/espgw.ring"`: create the shared-memory SA ring here and apply what the
    /// control process pushes through it (`ringapply`); `None` (the default): static SAs only.
    pub ring: Option<std::path::PathBuf>,
    /// `idle_seconds`: an SA that carried no packet for this long is reported to the control
    /// process (an `Idle` event, for DPD and idle teardown); 0: never. Default 30 (strongSwan's
    /// and Cisco's usual DPD delay).
    pub idle_seconds: u64,
    /// `ring_nice`: the nice value (0-19) of the thread that applies the SA ring's commands, so
    /// that on a machine without a spare core installing SAs takes mostly the CPU time
    /// forwarding leaves. Default 19: against a worker that keeps its CPU busy it still gets
    /// ~1.5 % of it (thousands of installs a second), and all of any idle time.
    pub ring_nice: i32,
    /// `ring_core`: pin that thread to this CPU (a housekeeping core that forwards nothing);
    /// `None` (the default): the scheduler places it.
    pub ring_core: Option<usize>,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (`xdpdrv`); veth and real NICs support it.
    Native,
    /// In the generic stack (`xdpgeneric`), for drivers without XDP.
    Generic,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            cores: vec![0],
            batch_size: 64,
            umem_frames: 1024,
            ring_size: 512,
            xdp_mode: XdpMode::Native,
            stats_socket: "/run/espgw/dataplane.sock".into(),
            ring: None,
            idle_seconds: 30,
            ring_nice: 19,
            ring_core: None,
        }
    }
}

/// A policy as configured (SA by name, resolved at install).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Selector.
    pub selector: Selector,
    /// `protect` (with the SA's name), `bypass` or `discard`.
    pub action: PolicyAction,
}

/// A configured policy action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyAction {
    /// Protect with the named outbound SA.
    Protect(String),
    /// Forward in the clear.
    Bypass,
    /// Drop.
    Discard,
}

/// A parsed, validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Data-plane settings.
    pub dataplane: DataplaneConfig,
    /// SAs to install (with keys; zeroized when dropped).
    pub sas: Vec<SaParams>,
    /// Policies in order.
    pub policies: Vec<PolicyConfig>,
    /// Static neighbours.
    pub neighbors: Vec<(IpAddr, EthernetAddress)>,
    /// Static routes.
    pub routes: Vec<RouteConfig>,
    /// Legal but suspicious settings.
    pub warnings: Vec<Diagnostic>,
}

// ---------------------------------------------------------------------------------------------
// Raw TOML shape.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    sa: Vec<Spanned<RawSa>>,
    #[serde(default)]
    policy: Vec<Spanned<RawPolicy>>,
    #[serde(default)]
    neighbor: Vec<Spanned<RawNeighbor>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    replay_window: Option<Spanned<u64>>,
    max_sas: Option<Spanned<u64>>,
    default_action: Option<Spanned<String>>,
    outer_ttl: Option<Spanned<u64>>,
    encap_port: Option<Spanned<u64>>,
    wan: Option<RawPort>,
    lan: Option<RawPort>,
    tcp_mss: Option<Spanned<u64>>,
    mode: Option<Spanned<String>>,
    fragmentation: Option<Spanned<String>>,
    cores: Option<Spanned<Vec<u64>>>,
    batch_size: Option<Spanned<u64>>,
    umem_frames: Option<Spanned<u64>>,
    ring_size: Option<Spanned<u64>>,
    xdp_mode: Option<Spanned<String>>,
    stats_socket: Option<Spanned<String>>,
    ring: Option<Spanned<String>>,
    idle_seconds: Option<Spanned<u64>>,
    ring_nice: Option<Spanned<u64>>,
    ring_core: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPort {
    interface: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    mtu: Option<Spanned<u64>>,
    vlan: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSa {
    name: Spanned<String>,
    direction: Spanned<String>,
    spi: Spanned<u64>,
    mode: Option<Spanned<String>>,
    local: Spanned<String>,
    remote: Spanned<String>,
    encap: Option<Spanned<RawEncap>>,
    aead: Option<Spanned<String>>,
    cipher: Option<Spanned<String>>,
    integrity: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    integrity_key: Option<Spanned<String>>,
    esn: Option<bool>,
    replay_window: Option<Spanned<u64>>,
    initial_seq: Option<Spanned<u64>>,
    lifetime: Option<Spanned<RawLifetime>>,
    #[serde(default)]
    selectors: Vec<Spanned<RawSelector>>,
    df: Option<Spanned<String>>,
    dscp: Option<Spanned<toml::Value>>,
    ecn: Option<Spanned<String>>,
    outer_ttl: Option<Spanned<u64>>,
    pad_align: Option<Spanned<u64>>,
}

impl Drop for RawSa {
    fn drop(&mut self) {
        for k in [&mut self.key, &mut self.integrity_key]
            .into_iter()
            .flatten()
        {
            k.get_mut().zeroize();
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncap {
    sport: Option<Spanned<u64>>,
    dport: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLifetime {
    soft_bytes: Option<u64>,
    hard_bytes: Option<u64>,
    soft_packets: Option<u64>,
    hard_packets: Option<u64>,
    soft_seconds: Option<u64>,
    hard_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    src: Option<Spanned<String>>,
    dst: Option<Spanned<String>>,
    protocol: Option<Spanned<toml::Value>>,
    sport: Option<Spanned<toml::Value>>,
    dport: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    src: Option<Spanned<String>>,
    dst: Option<Spanned<String>>,
    protocol: Option<Spanned<toml::Value>>,
    sport: Option<Spanned<toml::Value>>,
    dport: Option<Spanned<toml::Value>>,
    action: Spanned<String>,
    sa: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeighbor {
    ip: Spanned<String>,
    mac: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    dst: Spanned<String>,
    via: Option<Spanned<String>>,
    port: Spanned<String>,
}

// ---------------------------------------------------------------------------------------------

struct Ctx<'a> {
    text: &'a str,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn pos(&self, span: &Range<usize>) -> (usize, usize) {
        let start = span.start.min(self.text.len());
        let before = &self.text.as_bytes()[..start];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        let col = start
            - before
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        (line, col)
    }
    fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let (line, column) = self.pos(span);
        self.errors.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }
    fn warn(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let (line, column) = self.pos(span);
        self.warnings.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse::<IpAddr>()
        .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))
}

fn parse_prefix(s: &str) -> Result<Prefix, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<ipnet::IpNet>() {
        return Ok(Prefix::from(n));
    }
    match s.parse::<IpAddr>() {
        Ok(a) => Ok(Prefix::host(a)),
        Err(_) => Err(format!(
            "{s:?} is not an address or prefix (like 10.1.0.0/16 or 2001:db8::/32)"
        )),
    }
}

fn parse_key(s: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let t: Zeroizing<String> =
        Zeroizing::new(t.chars().filter(|c| *c != ':' && *c != '_').collect());
    let mut out = Zeroizing::new(vec![0u8; t.len() / 2]);
    if !t.len().is_multiple_of(2) {
        return Err("key has an odd number of hex digits".into());
    }
    hex::decode_to_slice(t.as_bytes(), &mut out)
        .map_err(|_| "key is not hexadecimal (expected 0x followed by hex digits)".to_string())?;
    Ok(out)
}

fn parse_protocol(v: &toml::Value) -> Result<Option<u8>, String> {
    use espgw_wire::ip::protocol as p;
    match v {
        toml::Value::Integer(n) => u8::try_from(*n).map(Some).map_err(|_| format!("protocol {n} is outside 0-255")),
        toml::Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "any" => Ok(None),
            "tcp" => Ok(Some(p::TCP)),
            "udp" => Ok(Some(p::UDP)),
            "icmp" => Ok(Some(p::ICMP)),
            "icmpv6" | "ipv6-icmp" => Ok(Some(p::ICMPV6)),
            "gre" => Ok(Some(p::GRE)),
            "esp" => Ok(Some(p::ESP)),
            "ah" => Ok(Some(p::AH)),
            "sctp" => Ok(Some(p::SCTP)),
            "ipip" | "ipv4" => Ok(Some(p::IPIP)),
            "ipv6" => Ok(Some(p::IPV6)),
            other => other
                .parse::<u8>()
                .map(Some)
                .map_err(|_| format!("unknown protocol {other:?} (any, tcp, udp, icmp, icmpv6, gre, esp, ah, sctp or a number)")),
        },
        _ => Err("protocol must be a name or a number".into()),
    }
}

fn parse_ports(v: &toml::Value) -> Result<PortRange, String> {
    let port = |n: i64| u16::try_from(n).map_err(|_| format!("port {n} is outside 0-65535"));
    match v {
        toml::Value::Integer(n) => {
            let p = port(*n)?;
            Ok(PortRange { lo: p, hi: p })
        }
        toml::Value::String(s) if s == "any" => Ok(PortRange::ANY),
        toml::Value::String(s) => {
            let (lo, hi) = s.split_once('-').unwrap_or((s, s));
            let lo: i64 = lo
                .trim()
                .parse()
                .map_err(|_| format!("bad port range {s:?} (use 1701 or \"1024-65535\")"))?;
            let hi: i64 = hi
                .trim()
                .parse()
                .map_err(|_| format!("bad port range {s:?} (use 1701 or \"1024-65535\")"))?;
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(format!(
                    "port range {s:?} is empty (low end above high end)"
                ));
            }
            Ok(PortRange { lo, hi })
        }
        _ => Err("ports must be a number or a \"low-high\" string".into()),
    }
}

fn selector(
    ctx: &mut Ctx<'_>,
    whole: &Range<usize>,
    src: &Option<Spanned<String>>,
    dst: &Option<Spanned<String>>,
    protocol: &Option<Spanned<toml::Value>>,
    sport: &Option<Spanned<toml::Value>>,
    dport: &Option<Spanned<toml::Value>>,
) -> Option<Selector> {
    let mut ok = true;
    let mut prefix = |ctx: &mut Ctx<'_>, f: &Option<Spanned<String>>| -> Option<Prefix> {
        let f = f.as_ref()?;
        match parse_prefix(f.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                ctx.error(&f.span(), e);
                ok = false;
                None
            }
        }
    };
    let s = prefix(ctx, src);
    let d = prefix(ctx, dst);
    let (s, d) = match (s, d) {
        (Some(s), Some(d)) => {
            if s.is_v6() != d.is_v6() {
                ctx.error(
                    whole,
                    format!("selector mixes address families: src {s} and dst {d}"),
                );
                return None;
            }
            (s, d)
        }
        (Some(s), None) => (s, Prefix::any(s.is_v6())),
        (None, Some(d)) => (Prefix::any(d.is_v6()), d),
        (None, None) => {
            if ok {
                ctx.error(whole, "a selector needs src or dst (an address or prefix); use 0.0.0.0/0 or ::/0 for any");
            }
            return None;
        }
    };
    let get = |ctx: &mut Ctx<'_>,
               v: &Option<Spanned<toml::Value>>,
               f: fn(&toml::Value) -> Result<PortRange, String>| {
        match v {
            None => Some(PortRange::ANY),
            Some(v) => match f(v.get_ref()) {
                Ok(r) => Some(r),
                Err(e) => {
                    ctx.error(&v.span(), e);
                    None
                }
            },
        }
    };
    let sp = get(ctx, sport, parse_ports)?;
    let dp = get(ctx, dport, parse_ports)?;
    let proto = match protocol {
        None => None,
        Some(v) => match parse_protocol(v.get_ref()) {
            Ok(p) => p,
            Err(e) => {
                ctx.error(&v.span(), e);
                return None;
            }
        },
    };
    if (!sp.is_any() || !dp.is_any())
        && !matches!(proto, Some(6) | Some(17) | Some(132) | Some(136))
    {
        ctx.error(
            whole,
            "ports are only meaningful with protocol tcp, udp or sctp",
        );
        return None;
    }
    ok.then_some(Selector {
        src: s,
        dst: d,
        protocol: proto,
        src_ports: sp,
        dst_ports: dp,
    })
}

fn port(ctx: &mut Ctx<'_>, raw: Option<&RawPort>, default_mac: [u8; 6]) -> PortConfig {
    let mut pc = PortConfig {
        mac: EthernetAddress(default_mac),
        addresses: Vec::new(),
        mtu: 1500,
        vlan: None,
        interface: None,
        mac_set: false,
        mtu_set: false,
    };
    let Some(raw) = raw else { return pc };
    if let Some(i) = &raw.interface {
        let name = i.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            ctx.error(
                &i.span(),
                format!(
                    "{name:?} is not a Linux interface name (1-15 characters, no '/' or spaces)"
                ),
            );
        } else {
            pc.interface = Some(name.clone());
        }
    }
    if let Some(m) = &raw.mac {
        pc.mac_set = true;
        match m.get_ref().parse::<EthernetAddress>() {
            Ok(mac) => pc.mac = mac,
            Err(_) => ctx.error(
                &m.span(),
                format!(
                    "{:?} is not a MAC address (like 02:00:00:00:00:01)",
                    m.get_ref()
                ),
            ),
        }
    }
    for a in &raw.addresses {
        let s = a.get_ref().trim();
        let parsed = match s.parse::<ipnet::IpNet>() {
            Ok(n) => Ok((n.addr(), Prefix::from(n))),
            Err(_) => parse_ip(s).map(|ip| (ip, Prefix::host(ip))),
        };
        match parsed {
            Ok(x) => pc.addresses.push(x),
            Err(e) => ctx.error(&a.span(), e),
        }
    }
    if let Some(m) = &raw.mtu {
        pc.mtu_set = true;
        match u16::try_from(*m.get_ref()) {
            Ok(v) if (576..=9216).contains(&v) => pc.mtu = v,
            _ => ctx.error(
                &m.span(),
                format!("mtu {} is outside 576-9216", m.get_ref()),
            ),
        }
    }
    if let Some(v) = &raw.vlan {
        match u16::try_from(*v.get_ref()) {
            Ok(id) if (1..=4094).contains(&id) => pc.vlan = Some(id),
            _ => ctx.error(&v.span(), format!("vlan {} is outside 1-4094", v.get_ref())),
        }
    }
    pc
}

fn run_config(ctx: &mut Ctx<'_>, d: &RawDataplane) -> RunConfig {
    let mut rc = RunConfig::default();
    if let Some(c) = &d.cores {
        let cores = c.get_ref();
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores.is_empty() {
            ctx.error(&c.span(), "cores is empty: list at least one CPU, like [0]");
        } else if let Some(bad) = cores.iter().find(|&&x| x >= n as u64) {
            ctx.error(
                &c.span(),
                format!(
                    "core {bad} does not exist (this machine has cores 0-{})",
                    n - 1
                ),
            );
        } else if cores.iter().collect::<std::collections::HashSet<_>>().len() != cores.len() {
            ctx.error(&c.span(), "cores lists a core twice");
        } else {
            rc.cores = cores.iter().map(|&x| x as usize).collect();
        }
    }
    if let Some(v) = &d.batch_size {
        rc.batch_size = small::<u32>(ctx, v, "batch_size", 1..=256).unwrap_or(rc.batch_size);
    }
    let pow2 = |ctx: &mut Ctx<'_>, v: &Spanned<u64>, what: &str, range| {
        let n = small::<u32>(ctx, v, what, range)?;
        if !n.is_power_of_two() {
            ctx.error(&v.span(), format!("{what} {n} must be a power of two"));
            return None;
        }
        Some(n)
    };
    if let Some(v) = &d.umem_frames {
        rc.umem_frames = pow2(ctx, v, "umem_frames", 64..=262_144).unwrap_or(rc.umem_frames);
    }
    if let Some(v) = &d.ring_size {
        rc.ring_size = pow2(ctx, v, "ring_size", 32..=16_384).unwrap_or(rc.ring_size);
    }
    if rc.ring_size.saturating_mul(2) > rc.umem_frames {
        let span = d
            .ring_size
            .as_ref()
            .or(d.umem_frames.as_ref())
            .map(|v| v.span())
            .unwrap_or(0..0);
        ctx.error(
            &span,
            format!(
                "umem_frames ({}) must be at least twice ring_size ({}): the fill rings of both ports draw from one UMEM",
                rc.umem_frames, rc.ring_size
            ),
        );
    }
    if let Some(m) = &d.xdp_mode {
        match m.get_ref().as_str() {
            "native" => rc.xdp_mode = XdpMode::Native,
            "generic" => rc.xdp_mode = XdpMode::Generic,
            other => ctx.error(
                &m.span(),
                format!("xdp_mode {other:?} must be native or generic"),
            ),
        }
    }
    if let Some(p) = &d.stats_socket {
        if p.get_ref().is_empty() {
            ctx.error(&p.span(), "stats_socket is empty");
        } else {
            rc.stats_socket = p.get_ref().into();
        }
    }
    if let Some(p) = &d.ring {
        if p.get_ref().is_empty() {
            ctx.error(
                &p.span(),
                "ring is empty: name a file, like \"/dev/shm/espgw.ring\"",
            );
        } else {
            rc.ring = Some(p.get_ref().into());
        }
    }
    if let Some(v) = &d.idle_seconds {
        rc.idle_seconds =
            small::<u64>(ctx, v, "idle_seconds", 0..=86_400).unwrap_or(rc.idle_seconds);
    }
    if let Some(v) = &d.ring_nice {
        rc.ring_nice = small::<i32>(ctx, v, "ring_nice", 0..=19).unwrap_or(rc.ring_nice);
    }
    if let Some(v) = &d.ring_core {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        rc.ring_core = small::<usize>(ctx, v, "ring_core", 0..=(n as u64 - 1));
    }
    rc
}

fn small<T: TryFrom<u64>>(
    ctx: &mut Ctx<'_>,
    v: &Spanned<u64>,
    what: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Option<T> {
    let n = *v.get_ref();
    if !range.contains(&n) {
        ctx.error(
            &v.span(),
            format!("{what} {n} is outside {}-{}", range.start(), range.end()),
        );
        return None;
    }
    T::try_from(n).ok()
}

/// Parse and validate a configuration text. `file` is only used in messages.
pub fn parse_str(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let mut ctx = Ctx {
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            ctx.error(&span, e.message().trim().to_string());
            return Err(ConfigError {
                file: file.to_path_buf(),
                errors: ctx.errors,
            });
        }
    };

    // [dataplane]
    let d = &raw.dataplane;
    let replay_window = d
        .replay_window
        .as_ref()
        .and_then(|v| small::<u32>(&mut ctx, v, "replay_window", 0..=u64::from(MAX_WINDOW)))
        .unwrap_or(1024);
    let max_sas = d
        .max_sas
        .as_ref()
        .and_then(|v| small::<usize>(&mut ctx, v, "max_sas", 1..=16_777_216))
        .unwrap_or(65_536);
    let outer_ttl = d
        .outer_ttl
        .as_ref()
        .and_then(|v| small::<u8>(&mut ctx, v, "outer_ttl", 1..=255))
        .unwrap_or(64);
    let encap_port = d
        .encap_port
        .as_ref()
        .and_then(|v| small::<u16>(&mut ctx, v, "encap_port", 1..=65535))
        .unwrap_or(4500);
    let default_action = match &d.default_action {
        None => Action::Discard,
        Some(a) => match a.get_ref().as_str() {
            "discard" => Action::Discard,
            "bypass" => Action::Bypass,
            other => {
                ctx.error(
                    &a.span(),
                    format!("default_action {other:?} must be discard or bypass"),
                );
                Action::Discard
            }
        },
    };
    let wan = port(&mut ctx, d.wan.as_ref(), [0x02, 0, 0, 0, 0, 0x01]);
    let lan = port(&mut ctx, d.lan.as_ref(), [0x02, 0, 0, 0, 0, 0x02]);
    let tcp_mss = d
        .tcp_mss
        .as_ref()
        .and_then(|v| small::<u16>(&mut ctx, v, "tcp_mss", 536..=9176));
    let run = run_config(&mut ctx, d);
    let prefragment = match &d.fragmentation {
        None => true,
        Some(m) => match m.get_ref().as_str() {
            "before-encryption" => true,
            "off" => false,
            other => {
                ctx.error(
                    &m.span(),
                    format!("fragmentation {other:?} must be before-encryption or off"),
                );
                true
            }
        },
    };
    let forward_only = match &d.mode {
        None => false,
        Some(m) => {
            match m.get_ref().as_str() {
                "ipsec" => false,
                "forward" => true,
                other => {
                    ctx.error(
                    &m.span(),
                    format!("mode {other:?} must be ipsec or forward (a plain router, for benchmarks)"),
                );
                    false
                }
            }
        }
    };
    let dataplane = DataplaneConfig {
        replay_window,
        max_sas,
        default_action,
        outer_ttl,
        encap_port,
        wan,
        lan,
        tcp_mss,
        prefragment,
        forward_only,
        run,
    };

    // [[sa]]
    let mut sas: Vec<SaParams> = Vec::new();
    let mut directions: HashMap<String, (Direction, Range<usize>)> = HashMap::new();
    let mut inbound_spis: HashMap<(u32, IpAddr), String> = HashMap::new();
    let mut outbound_spis: HashMap<(u32, IpAddr), String> = HashMap::new();
    for s in &raw.sa {
        let whole = s.span();
        let r = s.get_ref();
        let before = ctx.errors.len();
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() {
            ctx.error(&r.name.span(), "SA name is empty");
        }
        let direction = match r.direction.get_ref().as_str() {
            "in" => Direction::In,
            "out" => Direction::Out,
            other => {
                ctx.error(
                    &r.direction.span(),
                    format!("direction {other:?} must be in or out"),
                );
                Direction::In
            }
        };
        if let Some((_, prev)) = directions.get(&name) {
            let (line, _) = ctx.pos(prev);
            ctx.error(
                &r.name.span(),
                format!("duplicate SA name {name:?} (first defined on line {line})"),
            );
        }
        let spi = match u32::try_from(*r.spi.get_ref()) {
            Ok(v) if v >= 256 => v,
            _ => {
                ctx.error(&r.spi.span(), format!("spi {:#x} must be between 0x100 and 0xffffffff (0-255 are reserved, RFC 4303 §2.1)", r.spi.get_ref()));
                0
            }
        };
        let mode = match r.mode.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("tunnel") => Mode::Tunnel,
            Some("transport") => Mode::Transport,
            Some(other) => {
                ctx.error(
                    &r.mode.as_ref().map_or(whole.clone(), |m| m.span()),
                    format!("mode {other:?} must be tunnel or transport"),
                );
                Mode::Tunnel
            }
        };
        let local = parse_ip(r.local.get_ref())
            .map_err(|e| ctx.error(&r.local.span(), e))
            .ok();
        let remote = parse_ip(r.remote.get_ref())
            .map_err(|e| ctx.error(&r.remote.span(), e))
            .ok();
        if let (Some(l), Some(rm)) = (local, remote)
            && l.is_ipv4() != rm.is_ipv4()
        {
            ctx.error(
                &r.remote.span(),
                format!("local {l} and remote {rm} are of different address families"),
            );
        }
        if let Some(l) = local
            && !dataplane.wan.addresses.is_empty()
            && !dataplane.wan.is_local(&l)
        {
            ctx.warn(&r.local.span(), format!("local address {l} is not one of the WAN port's addresses (invalid local address: the peer's packets will not reach this SA)"));
        }
        let encap = r.encap.as_ref().map(|e| {
            let g = e.get_ref();
            let p = |ctx: &mut Ctx<'_>, v: &Option<Spanned<u64>>, what| {
                v.as_ref()
                    .map_or(Some(4500), |v| small::<u16>(ctx, v, what, 1..=65535))
            };
            UdpEncap {
                sport: p(&mut ctx, &g.sport, "encap sport").unwrap_or(4500),
                dport: p(&mut ctx, &g.dport, "encap dport").unwrap_or(4500),
            }
        });

        // Transform and keys.
        let transform = match (&r.aead, &r.cipher, &r.integrity) {
            (Some(a), None, None) => match Transform::aead_from_name(a.get_ref()) {
                Some(t) => Some(t),
                None => {
                    ctx.error(&a.span(), format!("unknown aead {:?} (aes128gcm16, aes256gcm16, aes128gcm12, aes256gcm12, aes128gcm8, aes256gcm8)", a.get_ref()));
                    None
                }
            },
            (Some(a), _, _) => {
                ctx.error(&a.span(), "aead cannot be combined with cipher or integrity (an AEAD brings its own integrity)");
                None
            }
            (None, Some(c), Some(i)) => {
                let cipher = CipherAlg::from_name(c.get_ref());
                let integ = IntegAlg::from_name(i.get_ref());
                if cipher.is_none() {
                    ctx.error(
                        &c.span(),
                        format!(
                            "unknown cipher {:?} (aes128-cbc, aes256-cbc, 3des-cbc, null)",
                            c.get_ref()
                        ),
                    );
                }
                if integ.is_none() {
                    ctx.error(&i.span(), format!("unknown integrity {:?} (hmac-sha1-96, hmac-sha2-256-128, hmac-sha2-384-192, hmac-sha2-512-256, hmac-md5-96)", i.get_ref()));
                }
                match (cipher, integ) {
                    (Some(cipher), Some(integ)) => Some(Transform::CipherAuth { cipher, integ }),
                    _ => None,
                }
            }
            (None, Some(c), None) => {
                ctx.error(
                    &c.span(),
                    "cipher needs an integrity algorithm (ESP without integrity is not supported)",
                );
                None
            }
            (None, None, Some(i)) => {
                ctx.error(
                    &i.span(),
                    "integrity without cipher: use cipher = \"null\" for integrity-only ESP",
                );
                None
            }
            (None, None, None) => {
                ctx.error(
                    &whole,
                    "SA needs aead = \"...\" or cipher = \"...\" with integrity = \"...\"",
                );
                None
            }
        };
        let mut keys = SaKeys {
            enc: Zeroizing::new(Vec::new()),
            integ: Zeroizing::new(Vec::new()),
        };
        if let Some(t) = transform {
            if let Some(w) = t.weakness() {
                ctx.warn(&whole, format!("SA {name:?} uses a weak transform: {w}"));
            }
            match (&r.key, t.enc_key_len()) {
                (None, 0) => {}
                (None, n) => ctx.error(
                    &whole,
                    format!("{} needs key = \"0x...\" ({n} bytes)", t.name()),
                ),
                (Some(k), want) => {
                    match parse_key(k.get_ref()) {
                        Err(e) => ctx.error(&k.span(), e),
                        Ok(v) if v.len() != want => {
                            let salt = if matches!(t, Transform::Aead { .. }) {
                                format!(" ({}-byte AES key followed by the 4-byte salt)", want - 4)
                            } else {
                                String::new()
                            };
                            ctx.error(&k.span(), format!("wrong key length for {}: {} bytes given, {want} expected{salt}", t.name(), v.len()));
                        }
                        Ok(v) => keys.enc = v,
                    }
                }
            }
            match (&r.integrity_key, t.integ_key_len()) {
                (None, 0) => {}
                (Some(k), 0) => ctx.error(
                    &k.span(),
                    format!(
                        "{} has no separate integrity key; remove integrity_key",
                        t.name()
                    ),
                ),
                (None, n) => ctx.error(
                    &whole,
                    format!("{} needs integrity_key = \"0x...\" ({n} bytes)", t.name()),
                ),
                (Some(k), want) => match parse_key(k.get_ref()) {
                    Err(e) => ctx.error(&k.span(), e),
                    Ok(v) if v.len() != want => ctx.error(
                        &k.span(),
                        format!(
                            "wrong integrity_key length for {}: {} bytes given, {want} expected",
                            t.name(),
                            v.len()
                        ),
                    ),
                    Ok(v) => keys.integ = v,
                },
            }
        }

        let replay = match &r.replay_window {
            None => replay_window,
            Some(v) => {
                if direction == Direction::Out {
                    ctx.warn(&v.span(), "replay_window has no effect on an outbound SA");
                }
                small::<u32>(&mut ctx, v, "replay_window", 0..=u64::from(MAX_WINDOW))
                    .unwrap_or(replay_window)
            }
        };
        let initial_seq = r.initial_seq.as_ref().map_or(0, |v| {
            let limit = if r.esn.unwrap_or(false) {
                u64::MAX
            } else {
                u64::from(u32::MAX)
            };
            if *v.get_ref() >= limit {
                ctx.error(&v.span(), "initial_seq leaves no sequence numbers to send");
            }
            *v.get_ref()
        });

        let lifetime = r.lifetime.as_ref().map_or(Lifetime::default(), |l| {
            let g = l.get_ref();
            for (soft, hard, what) in [
                (g.soft_bytes, g.hard_bytes, "bytes"),
                (g.soft_packets, g.hard_packets, "packets"),
                (g.soft_seconds, g.hard_seconds, "seconds"),
            ] {
                if let (Some(s), Some(h)) = (soft, hard)
                    && s > h
                {
                    ctx.error(
                        &l.span(),
                        format!("soft_{what} ({s}) is above hard_{what} ({h})"),
                    );
                }
            }
            Lifetime {
                soft_bytes: g.soft_bytes,
                hard_bytes: g.hard_bytes,
                soft_packets: g.soft_packets,
                hard_packets: g.hard_packets,
                soft_seconds: g.soft_seconds,
                hard_seconds: g.hard_seconds,
            }
        });
        let mut selectors = Vec::new();
        for sel in &r.selectors {
            let g = sel.get_ref();
            if let Some(x) = selector(
                &mut ctx,
                &sel.span(),
                &g.src,
                &g.dst,
                &g.protocol,
                &g.sport,
                &g.dport,
            ) {
                selectors.push(x);
            }
        }
        let df = match r.df.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
            None | Some(("copy", _)) => DfMode::Copy,
            Some(("set", _)) => DfMode::Set,
            Some(("clear", _)) => DfMode::Clear,
            Some((other, span)) => {
                ctx.error(&span, format!("df {other:?} must be copy, set or clear"));
                DfMode::Copy
            }
        };
        let dscp = match &r.dscp {
            None => DscpMode::Copy,
            Some(v) => match v.get_ref() {
                toml::Value::String(s) if s == "copy" => DscpMode::Copy,
                toml::Value::Integer(n) if (0..64).contains(n) => DscpMode::Set(*n as u8),
                _ => {
                    ctx.error(&v.span(), "dscp must be \"copy\" or a number 0-63");
                    DscpMode::Copy
                }
            },
        };
        let ecn = match r.ecn.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
            None | Some(("normal", _)) => EcnMode::Normal,
            Some(("compat", _)) => EcnMode::Compat,
            Some((other, span)) => {
                ctx.error(
                    &span,
                    format!("ecn {other:?} must be normal or compat (RFC 6040)"),
                );
                EcnMode::Normal
            }
        };
        let sa_ttl = r
            .outer_ttl
            .as_ref()
            .and_then(|v| small::<u8>(&mut ctx, v, "outer_ttl", 1..=255))
            .unwrap_or(outer_ttl);

        let pad_align = match (&r.pad_align, transform) {
            (None, _) => None,
            (Some(v), Some(t)) => {
                let n = *v.get_ref();
                let min = t.block_align() as u64;
                if !(4..=256).contains(&n) || !n.is_power_of_two() || n % min != 0 {
                    ctx.error(&v.span(), format!("pad_align {n} must be a power of two from 4 to 256 and a multiple of {min} (the {} block)", t.name()));
                }
                Some(n as usize)
            }
            (Some(_), None) => None,
        };
        // Duplicate SPIs: inbound per local address, outbound per peer.
        if let (Some(l), Some(rm)) = (local, remote) {
            let (table, key, what) = match direction {
                Direction::In => (&mut inbound_spis, (spi, l), format!("local address {l}")),
                Direction::Out => (&mut outbound_spis, (spi, rm), format!("peer {rm}")),
            };
            if spi != 0 {
                if let Some(other) = table.get(&key) {
                    let msg = format!(
                        "duplicate SPI {spi:#010x}: SA {other:?} already uses it for {what}"
                    );
                    ctx.error(&r.spi.span(), msg);
                } else {
                    table.insert(key, name.clone());
                }
            }
        }
        directions
            .entry(name.clone())
            .or_insert((direction, r.name.span()));

        if ctx.errors.len() == before
            && let (Some(local), Some(remote), Some(transform)) = (local, remote, transform)
        {
            sas.push(SaParams {
                name,
                direction,
                spi,
                mode,
                local,
                remote,
                encap,
                transform,
                keys,
                esn: r.esn.unwrap_or(false),
                replay_window: replay,
                initial_seq,
                lifetime,
                selectors,
                df,
                dscp,
                ecn,
                outer_ttl: sa_ttl,
                pad_align,
            });
        }
    }

    // [[policy]]
    let mut policies = Vec::new();
    let mut spans = Vec::new();
    for p in &raw.policy {
        let g = p.get_ref();
        let sel = selector(
            &mut ctx,
            &p.span(),
            &g.src,
            &g.dst,
            &g.protocol,
            &g.sport,
            &g.dport,
        );
        let action = match (g.action.get_ref().as_str(), &g.sa) {
            ("protect", Some(sa)) => match directions.get(sa.get_ref()) {
                None => {
                    ctx.error(&sa.span(), format!("unknown SA name {:?}", sa.get_ref()));
                    None
                }
                Some((Direction::In, _)) => {
                    ctx.error(
                        &sa.span(),
                        format!(
                            "SA {:?} is inbound; a protect policy needs an outbound SA",
                            sa.get_ref()
                        ),
                    );
                    None
                }
                Some((Direction::Out, _)) => Some(PolicyAction::Protect(sa.get_ref().clone())),
            },
            ("protect", None) => {
                ctx.error(
                    &g.action.span(),
                    "action protect needs sa = \"name of an outbound SA\"",
                );
                None
            }
            ("bypass" | "discard", Some(sa)) => {
                ctx.error(
                    &sa.span(),
                    format!("action {} takes no sa", g.action.get_ref()),
                );
                None
            }
            ("bypass", None) => Some(PolicyAction::Bypass),
            ("discard", None) => Some(PolicyAction::Discard),
            (other, _) => {
                ctx.error(
                    &g.action.span(),
                    format!("action {other:?} must be protect, bypass or discard"),
                );
                None
            }
        };
        if let (Some(selector), Some(action)) = (sel, action) {
            policies.push(PolicyConfig { selector, action });
            spans.push(p.span());
        }
    }
    // Overlap warnings (the SPD is first-match).
    let probe = Spd::new(
        policies
            .iter()
            .map(|p| Policy {
                selector: p.selector,
                action: match &p.action {
                    PolicyAction::Protect(n) => Action::Protect(crate::sa::SaId(fxhash(n))),
                    PolicyAction::Bypass => Action::Bypass,
                    PolicyAction::Discard => Action::Discard,
                },
            })
            .collect(),
        default_action,
    );
    for (i, j, hidden) in probe.overlaps() {
        let (line, _) = ctx.pos(&spans[i]);
        let msg = if hidden {
            format!(
                "policy is never used: the policy on line {line} matches all of its traffic first"
            )
        } else {
            format!(
                "policy overlaps the policy on line {line} with a different action; the earlier one wins"
            )
        };
        ctx.warn(&spans[j], msg);
    }

    // [[neighbor]], [[route]]
    let mut neighbors = Vec::new();
    for n in &raw.neighbor {
        let g = n.get_ref();
        let ip = parse_ip(g.ip.get_ref())
            .map_err(|e| ctx.error(&g.ip.span(), e))
            .ok();
        let mac = g
            .mac
            .get_ref()
            .parse::<EthernetAddress>()
            .map_err(|_| {
                ctx.error(
                    &g.mac.span(),
                    format!("{:?} is not a MAC address", g.mac.get_ref()),
                )
            })
            .ok();
        if let (Some(ip), Some(mac)) = (ip, mac) {
            neighbors.push((ip, mac));
        }
    }
    let mut routes = Vec::new();
    for rt in &raw.route {
        let g = rt.get_ref();
        let dst = parse_prefix(g.dst.get_ref())
            .map_err(|e| ctx.error(&g.dst.span(), e))
            .ok();
        let via = match &g.via {
            None => Some(None),
            Some(v) => parse_ip(v.get_ref())
                .map_err(|e| ctx.error(&v.span(), e))
                .ok()
                .map(Some),
        };
        let port = match g.port.get_ref().as_str() {
            "wan" => Some(PortId::Wan),
            "lan" => Some(PortId::Lan),
            other => {
                ctx.error(
                    &g.port.span(),
                    format!("route port {other:?} must be wan or lan"),
                );
                None
            }
        };
        if let (Some(dst), Some(via), Some(port)) = (dst, via, port) {
            routes.push(RouteConfig { dst, via, port });
        }
    }

    if !ctx.errors.is_empty() {
        return Err(ConfigError {
            file: file.to_path_buf(),
            errors: ctx.errors,
        });
    }
    Ok(Config {
        dataplane,
        sas,
        policies,
        neighbors,
        routes,
        warnings: ctx.warnings,
    })
}

/// A stable number for an SA name, only used to compare policy actions for overlap warnings.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Read, parse and validate a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) => {
            return Err(ConfigError {
                file: path.to_path_buf(),
                errors: vec![Diagnostic {
                    line: 0,
                    column: 0,
                    message: format!("cannot read: {e}"),
                }],
            });
        }
    };
    parse_str(&text, path)
}

/// What installing a configuration produced.
#[derive(Debug)]
pub struct Installed {
    /// Data-plane settings.
    pub dataplane: DataplaneConfig,
    /// Static neighbours.
    pub neighbors: Vec<(IpAddr, EthernetAddress)>,
    /// Static routes.
    pub routes: Vec<RouteConfig>,
}

/// What a pipeline runs on, made from a configuration: a fresh SA database with the SAs and
/// policies installed (at `now_ns` on the data-plane clock), and the network (ports, ESP-in-UDP
/// port, static next hops).
pub fn instantiate(
    config: Config,
    provider: &dyn CryptoProvider,
    now_ns: u64,
) -> Result<(Arc<SaDb>, Arc<Network>), SadbError> {
    let db = Arc::new(SaDb::new(config.dataplane.max_sas));
    let inst = install(config, &db, provider, now_ns)?;
    let next_hops = StaticNextHops::new(
        &inst.routes,
        &inst.neighbors,
        &inst.dataplane.wan,
        &inst.dataplane.lan,
    );
    let d = inst.dataplane;
    let mut net = Network::new(d.wan, d.lan, d.encap_port, Box::new(next_hops));
    net.tcp_mss = d.tcp_mss;
    net.forward_only = d.forward_only;
    net.prefragment = d.prefragment;
    Ok((db, Arc::new(net)))
}

/// Install the configuration's SAs and SPD into `db` (SA names resolved to handles).
pub fn install(
    config: Config,
    db: &SaDb,
    provider: &dyn CryptoProvider,
    now_ns: u64,
) -> Result<Installed, SadbError> {
    let Config {
        dataplane,
        sas,
        policies,
        neighbors,
        routes,
        warnings,
    } = config;
    for w in &warnings {
        tracing::warn!(line = w.line, "{}", w.message);
    }
    for sa in sas {
        db.install(sa, provider, now_ns)?;
    }
    let mut spd_policies = Vec::with_capacity(policies.len());
    for p in policies {
        let action = match p.action {
            PolicyAction::Protect(name) => match db.id_by_name(&name) {
                Some(id) => Action::Protect(id),
                None => return Err(SadbError::DuplicateName(name)),
            },
            PolicyAction::Bypass => Action::Bypass,
            PolicyAction::Discard => Action::Discard,
        };
        spd_policies.push(Policy {
            selector: p.selector,
            action,
        });
    }
    db.set_spd(Spd::new(spd_policies, dataplane.default_action));
    Ok(Installed {
        dataplane,
        neighbors,
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
replay_window = 1024
[dataplane.wan]
mac = "02:00:00:00:00:01"
addresses = ["203.0.113.1/24"]

[[sa]]
name = "branch-out"
direction = "out"
spi = 0x00001001
mode = "tunnel"
local = "203.0.113.1"
remote = "198.51.100.7"
encap = { sport = 4500, dport = 4500 }
aead = "aes128gcm16"
key = "0x000102030405060708090a0b0c0d0e0f10111213"
esn = false
lifetime = { soft_bytes = 4_000_000_000, hard_bytes = 4_608_000_000, soft_seconds = 100, hard_seconds = 120 }

[[sa]]
name = "branch-in"
direction = "in"
spi = 0x00002001
local = "203.0.113.1"
remote = "198.51.100.7"
cipher = "aes128-cbc"
integrity = "hmac-sha1-96"
key = "0x000102030405060708090a0b0c0d0e0f"
integrity_key = "0x000102030405060708090a0b0c0d0e0f10111213"
replay_window = 4096
selectors = [{ src = "10.2.0.0/16", dst = "10.1.0.0/16", protocol = "any" }]

[[policy]]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
protocol = "any"
action = "protect"
sa = "branch-out"

[[neighbor]]
ip = "198.51.100.7"
mac = "02:00:00:00:00:02"
"#;

    fn errs(text: &str) -> Vec<String> {
        match parse_str(text, Path::new("t.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn good_config_parses() {
        let c = parse_str(GOOD, Path::new("good.toml")).unwrap();
        assert_eq!(c.sas.len(), 2);
        assert_eq!(c.sas[0].spi, 0x1001);
        assert_eq!(
            c.sas[0].encap,
            Some(UdpEncap {
                sport: 4500,
                dport: 4500
            })
        );
        assert_eq!(c.sas[0].lifetime.hard_seconds, Some(120));
        assert_eq!(c.sas[1].replay_window, 4096);
        assert_eq!(c.sas[1].keys.integ.len(), 20);
        assert_eq!(c.policies.len(), 1);
        assert_eq!(c.neighbors.len(), 1);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn wrong_key_length_names_file_line_and_reason() {
        let bad = GOOD.replace(
            "0x000102030405060708090a0b0c0d0e0f10111213\"\nesn",
            "0x000102030405060708090a0b0c0d0e0f\"\nesn",
        );
        let e = errs(&bad);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "t.toml:17:7: wrong key length for aes128gcm16: 16 bytes given, 20 expected"
            ),
            "{}",
            e[0]
        );
        assert!(e[0].contains("4-byte salt"));
    }

    #[test]
    fn duplicate_spi_and_unknown_sa_name() {
        let bad = GOOD
            .replace("0x00002001", "0x00001001")
            .replace("direction = \"out\"", "direction = \"in\"");
        let e = errs(&bad);
        assert!(
            e.iter().any(|l| l.contains("duplicate SPI 0x00001001")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.contains("is inbound; a protect policy needs an outbound SA")),
            "{e:?}"
        );
        let bad = GOOD.replace("sa = \"branch-out\"", "sa = \"nope\"");
        let e = errs(&bad);
        assert!(
            e.iter()
                .any(|l| l.contains("t.toml:39:") && l.contains("unknown SA name \"nope\"")),
            "{e:?}"
        );
    }

    #[test]
    fn syntax_and_unknown_fields_are_located() {
        let e = errs("[dataplane]\nreplay_windw = 5\n");
        assert!(
            e[0].starts_with("t.toml:2:1: unknown field `replay_windw`"),
            "{e:?}"
        );
        let e = errs("[[sa]]\nname = \"x\"\nspi = \n");
        assert!(e[0].starts_with("t.toml:3:"), "{e:?}");
    }

    #[test]
    fn overlapping_policies_warn() {
        let text = format!(
            "{GOOD}\n[[policy]]\nsrc = \"10.1.2.0/24\"\ndst = \"10.2.0.0/16\"\naction = \"bypass\"\n[[policy]]\nsrc = \"10.0.0.0/8\"\ndst = \"10.2.0.0/16\"\naction = \"discard\"\n"
        );
        let c = parse_str(&text, Path::new("t.toml")).unwrap();
        // Line 45 is hidden by line 34; line 49 overlaps both earlier policies with another action.
        let w: Vec<_> = c
            .warnings
            .iter()
            .map(|d| (d.line, d.message.as_str()))
            .collect();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w[0].0 == 45 && w[0].1.contains("never used") && w[0].1.contains("line 34"),
            "{w:?}"
        );
        assert!(
            w[1].0 == 49 && w[1].1.contains("overlaps the policy on line 34"),
            "{w:?}"
        );
        assert!(
            w[2].0 == 49 && w[2].1.contains("overlaps the policy on line 45"),
            "{w:?}"
        );
    }

    #[test]
    fn many_errors_are_all_reported() {
        let text = r#"
[[sa]]
name = "a"
direction = "sideways"
spi = 5
local = "203.0.113.300"
remote = "2001:db8::1"
cipher = "aes128-cbc"
key = "0x00"
"#;
        let e = errs(text);
        assert!(
            e.iter().any(|l| l.contains("direction \"sideways\"")),
            "{e:?}"
        );
        assert!(e.iter().any(|l| l.contains("reserved")), "{e:?}");
        assert!(
            e.iter().any(|l| l.contains("not an IPv4 or IPv6 address")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.contains("needs an integrity algorithm")),
            "{e:?}"
        );
    }

    #[test]
    fn weak_transform_and_foreign_local_warn() {
        let text = GOOD
            .replace("cipher = \"aes128-cbc\"", "cipher = \"3des-cbc\"")
            .replace(
                "key = \"0x000102030405060708090a0b0c0d0e0f\"\n",
                "key = \"0x000102030405060708090a0b0c0d0e0f1011121314151617\"\n",
            )
            .replace(
                "local = \"203.0.113.1\"\nremote = \"198.51.100.7\"\ncipher",
                "local = \"203.0.113.9\"\nremote = \"198.51.100.7\"\ncipher",
            );
        let c = parse_str(&text, Path::new("t.toml")).unwrap();
        let w: Vec<_> = c.warnings.iter().map(|d| d.message.as_str()).collect();
        assert!(w.iter().any(|m| m.contains("weak transform")), "{w:?}");
        assert!(
            w.iter().any(|m| m.contains("invalid local address")),
            "{w:?}"
        );
    }

    #[test]
    fn ring_thread_priority_and_core() {
        let c = parse_str(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!(c.dataplane.run.ring_nice, 19, "default: forwarding first");
        assert_eq!(c.dataplane.run.ring_core, None);
        let text = GOOD.replace(
            "replay_window = 1024\n",
            "replay_window = 1024\nring_nice = 5\nring_core = 0\n",
        );
        let c = parse_str(&text, Path::new("t.toml")).unwrap();
        assert_eq!(c.dataplane.run.ring_nice, 5);
        assert_eq!(c.dataplane.run.ring_core, Some(0));
        let e = errs(&GOOD.replace(
            "replay_window = 1024\n",
            "replay_window = 1024\nring_nice = 20\n",
        ));
        assert!(
            e.iter()
                .any(|l| l.contains("t.toml:4") && l.contains("ring_nice 20 is outside 0-19")),
            "{e:?}"
        );
        let e = errs(&GOOD.replace(
            "replay_window = 1024\n",
            "replay_window = 1024\nring_core = 4096\n",
        ));
        assert!(
            e.iter().any(|l| l.contains("ring_core 4096 is outside")),
            "{e:?}"
        );
    }
}
