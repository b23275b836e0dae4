//! The XDP steering program's loader.
//!
//! One [`XdpPort`] per gateway port: it loads a fresh instance of `ebpf/xdp_steer.c` (built by
//! `build.rs` and embedded in the binary) with its own maps, writes the port's role,
//! encapsulation port and the gateway's addresses into them, and attaches it with a `bpf_link`,
//! so the kernel detaches the program when the process goes away, however it ends. The data plane
//! then puts its AF_XDP sockets into the program's XSKMAP ([`XdpPort::register_socket`]) and reads
//! the per-verdict counters ([`XdpPort::counters`]). `ebpf/README.md` describes the verdicts.
//!
//! Netlink requests (finding the interface, the program attached to it, removing a stale one)
//! are made in the network namespace of the calling thread, as is the attachment itself.

use std::{
    fmt, io,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, XskMap},
    programs::{ProgramError, Xdp, XdpMode, links::FdLink, loaded_programs},
};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tracing::{debug, warn};

/// The compiled steering program (`ebpf/xdp_steer.c`), aligned for the ELF parser.
static XDP_STEER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_steer.o"));

/// The compiled steering program, an ELF object for the BPF target (for tools and tests).
pub fn steering_object() -> &'static [u8] {
    XDP_STEER_OBJ
}

/// Names of the verdict counters, in the order of `enum counter` in `ebpf/xdp_steer.c`.
/// Exactly one of them is incremented per received frame.
pub const COUNTER_NAMES: [&str; 14] = [
    "esp",
    "esp_fragment",
    "esp_in_udp",
    "routed",
    "no_socket",
    "ike",
    "nat_keepalive",
    "udp_fragment",
    "encap_other",
    "not_local",
    "local",
    "to_kernel",
    "malformed",
    "unconfigured",
];

/// Entries of the `local_addrs` map (`ebpf/xdp_steer.c`).
pub const MAX_LOCAL_ADDRS: usize = 256;

const PROGRAM_NAME: &str = "xdp_steer";
const ROLE_WAN: u32 = 1;
const ROLE_LAN: u32 = 2;
const IKE_PORT: u16 = 500;
/// How long [`XdpPort::detach`] waits for the kernel to let go of the program.
const DETACH_TIMEOUT: Duration = Duration::from_secs(2);

// <linux/if_link.h>
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
const XDP_FLAGS_REPLACE: u32 = 1 << 4;

/// What a port is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRole {
    /// Faces the peers: ESP and ESP in UDP to `encap_port` (normally 4500) go to the data plane.
    Wan {
        /// UDP encapsulation port (RFC 3948); must not be 0 or 500.
        encap_port: u16,
    },
    /// Faces the protected networks: unicast IP not addressed to the gateway goes to the data
    /// plane.
    Lan,
}

/// How the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`); veth supports it.
    Native,
    /// In the network stack (`XDP_FLAGS_SKB_MODE`), for drivers without XDP support.
    Generic,
}

impl AttachMode {
    fn aya(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }

    fn flag(self) -> u32 {
        match self {
            Self::Native => XDP_FLAGS_DRV_MODE,
            Self::Generic => XDP_FLAGS_SKB_MODE,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// Errors of the loader; the messages are meant for an operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdpError {
    #[error("interface {ifname} not found")]
    InterfaceNotFound { ifname: String },
    #[error("invalid XDP steering configuration for {ifname}: {reason}")]
    InvalidConfig { ifname: String, reason: String },
    #[error("could not load the XDP steering object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("the XDP steering object has no {what} named {name}")]
    MissingObject {
        what: &'static str,
        name: &'static str,
    },
    #[error("the kernel refused the XDP steering program: {0}")]
    Load(#[source] Box<ProgramError>),
    #[error("XDP map {map} of {ifname}: {source}")]
    Map {
        ifname: String,
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("XDP attach to {ifname} ({mode} mode) failed: {source}{hint}")]
    Attach {
        ifname: String,
        mode: AttachMode,
        #[source]
        source: Box<ProgramError>,
        hint: &'static str,
    },
    #[error(
        "XDP attach to {ifname} did not give a bpf_link (kernel without XDP bpf_link support?): \
         refused, since the program would outlive the process"
    )]
    NoBpfLink { ifname: String },
    #[error("could not remove XDP program {prog_id} from {ifname}: {source}{hint}")]
    StaleProgram {
        ifname: String,
        prog_id: u32,
        #[source]
        source: Box<NetlinkError>,
        hint: &'static str,
    },
    #[error("queue {queue} of {ifname} is out of range (the XSKMAP has {entries} entries)")]
    QueueOutOfRange {
        ifname: String,
        queue: u32,
        entries: u32,
    },
    #[error("XDP detach from {ifname}: {reason}")]
    Detach { ifname: String, reason: String },
    #[error("netlink ({what}): {source}")]
    Netlink {
        what: String,
        #[source]
        source: Box<NetlinkError>,
    },
}

/// A failed netlink request: the errno and, when the kernel gave one, its extended-ack message.
#[derive(Debug)]
pub struct NetlinkError {
    /// The error.
    pub io: io::Error,
    /// The kernel's explanation (`NLMSGERR_ATTR_MSG`), if any.
    pub message: Option<String>,
}

impl fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(message) => write!(f, "{} ({message})", self.io),
            None => write!(f, "{}", self.io),
        }
    }
}

impl std::error::Error for NetlinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.io)
    }
}

impl From<io::Error> for NetlinkError {
    fn from(io: io::Error) -> Self {
        Self { io, message: None }
    }
}

/// Verdict counters of one port, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpCounters {
    values: Vec<(&'static str, u64)>,
}

impl XdpCounters {
    /// The counter `name` (one of [`COUNTER_NAMES`]); 0 for an unknown name.
    pub fn get(&self, name: &str) -> u64 {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }

    /// All counters, in the order of [`COUNTER_NAMES`].
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.values.iter().copied()
    }

    /// Frames seen in total (each frame increments exactly one counter).
    pub fn total(&self) -> u64 {
        self.values.iter().map(|(_, v)| v).sum()
    }

    /// `{"esp": 12, "ike": 3, ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.values
                .iter()
                .map(|(n, v)| ((*n).to_owned(), serde_json::Value::from(*v)))
                .collect(),
        )
    }
}

/// The steering program loaded for, configured for and attached to one port.
pub struct XdpPort {
    ifname: String,
    ifindex: u32,
    prog_id: u32,
    /// The attachment; dropping it detaches the program. `None` once detached.
    link: Option<FdLink>,
    xsks: XskMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    /// A netlink socket of the namespace the port lives in (the thread may move later).
    rtnl: Rtnl,
    /// Owns the program; kept after the link so that it is dropped after it.
    _ebpf: Ebpf,
}

impl fmt::Debug for XdpPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpPort")
            .field("ifname", &self.ifname)
            .field("ifindex", &self.ifindex)
            .field("prog_id", &self.prog_id)
            .field("attached", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl XdpPort {
    /// Load a fresh instance, configure it, attach it to `ifname`. A program left behind on the
    /// interface (by a crashed earlier run that used a netlink attach, or by `ip link set ...
    /// xdp`) is replaced, with a warning naming the interface and the old program id. A program
    /// held by a live `bpf_link` (another running gateway) is not touched: that is an error.
    pub fn attach(
        ifname: &str,
        role: PortRole,
        local_addrs: &[IpAddr],
        mode: AttachMode,
    ) -> Result<XdpPort, XdpError> {
        let invalid = |reason: String| XdpError::InvalidConfig {
            ifname: ifname.to_owned(),
            reason,
        };
        let (role_value, encap_port) = match role {
            PortRole::Wan { encap_port: 0 } => {
                return Err(invalid("the UDP encapsulation port must not be 0".into()));
            }
            PortRole::Wan {
                encap_port: IKE_PORT,
            } => {
                return Err(invalid(
                    "the UDP encapsulation port must not be 500 (IKE)".into(),
                ));
            }
            PortRole::Wan { encap_port } => (ROLE_WAN, encap_port),
            PortRole::Lan => (ROLE_LAN, 0),
        };
        if local_addrs.len() > MAX_LOCAL_ADDRS {
            return Err(invalid(format!(
                "{} local addresses, at most {MAX_LOCAL_ADDRS}",
                local_addrs.len()
            )));
        }

        let mut rtnl = Rtnl::open().map_err(|source| XdpError::Netlink {
            what: "opening a route socket".into(),
            source: Box::new(source),
        })?;
        let link = rtnl.get_link(ifname)?;

        let mut ebpf = Ebpf::load(XDP_STEER_OBJ).map_err(|e| XdpError::Object(Box::new(e)))?;
        let map_err = |map: &'static str| {
            move |source| XdpError::Map {
                ifname: ifname.to_owned(),
                map,
                source: Box::new(source),
            }
        };
        let mut config: Array<MapData, [u8; 8]> = take_map(&mut ebpf, "config")?
            .try_into()
            .map_err(map_err("config"))?;
        let mut addrs: HashMap<MapData, [u8; 16], u8> = take_map(&mut ebpf, "local_addrs")?
            .try_into()
            .map_err(map_err("local_addrs"))?;
        let xsks: XskMap<MapData> = take_map(&mut ebpf, "xsks")?
            .try_into()
            .map_err(map_err("xsks"))?;
        let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, "counters")?
            .try_into()
            .map_err(map_err("counters"))?;
        if counters.len() as usize != COUNTER_NAMES.len() {
            return Err(invalid(format!(
                "the program has {} counters, the loader knows {}: rebuild both",
                counters.len(),
                COUNTER_NAMES.len()
            )));
        }

        for addr in local_addrs {
            addrs
                .insert(addr_key(*addr), 1, 0)
                .map_err(map_err("local_addrs"))?;
        }
        // struct steer_config { u32 role; u16 encap_port; u16 reserved; }, native byte order.
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&role_value.to_ne_bytes());
        value[4..6].copy_from_slice(&encap_port.to_ne_bytes());
        config.set(0, value, 0).map_err(map_err("config"))?;

        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(XdpError::MissingObject {
                what: "program",
                name: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(load_err)?;
        program.load().map_err(load_err)?;
        let prog_id = program.info().map_err(load_err)?.id();

        // Only now that our program is loaded (the verifier has accepted it) is the interface
        // touched.
        for (flag, old_id) in link.programs() {
            let old_name = program_name(old_id);
            rtnl.remove_xdp(link.index, flag, old_id)
                .map_err(|source| stale_error(ifname, old_id, source))?;
            warn!(
                interface = ifname,
                old_program_id = old_id,
                old_program = %old_name,
                "replaced an XDP program left on {ifname} (id {old_id}, {old_name})"
            );
        }

        let attach_err = |source: ProgramError| {
            let hint = match &source {
                ProgramError::SyscallError(e)
                    if matches!(e.io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)) =>
                {
                    ": is another XDP program attached?"
                }
                ProgramError::SyscallError(e)
                    if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    ": does the driver support native XDP? (try generic mode)"
                }
                _ => "",
            };
            XdpError::Attach {
                ifname: ifname.to_owned(),
                mode,
                source: Box::new(source),
                hint,
            }
        };
        let link_id = program
            .attach_to_if_index(link.index, mode.aya())
            .map_err(attach_err)?;
        let xdp_link = program.take_link(link_id).map_err(attach_err)?;
        let Ok(fd_link) = FdLink::try_from(xdp_link) else {
            // aya fell back to a netlink attachment, which survives the process: undo it.
            if let Err(e) = rtnl.remove_xdp(link.index, mode.flag(), prog_id) {
                warn!(
                    interface = ifname,
                    "could not undo a netlink XDP attachment: {e}"
                );
            }
            return Err(XdpError::NoBpfLink {
                ifname: ifname.to_owned(),
            });
        };
        debug!(
            interface = ifname,
            ifindex = link.index,
            program_id = prog_id,
            %mode,
            "XDP steering program attached"
        );

        Ok(XdpPort {
            ifname: ifname.to_owned(),
            ifindex: link.index,
            prog_id,
            link: Some(fd_link),
            xsks,
            counters,
            rtnl,
            _ebpf: ebpf,
        })
    }

    /// The interface's name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The interface's index (in its network namespace).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The kernel's id of this instance of the program.
    pub fn program_id(&self) -> u32 {
        self.prog_id
    }

    /// Put an AF_XDP socket (its raw fd) into the XSKMAP at `queue`: frames steered to the data
    /// plane that arrive on RX queue `queue` go to it. The socket must be bound to this interface
    /// and queue; the fd must stay open while it is registered.
    pub fn register_socket(&mut self, queue: u32, fd: RawFd) -> Result<(), XdpError> {
        let entries = self.xsks.len();
        if queue >= entries {
            return Err(XdpError::QueueOutOfRange {
                ifname: self.ifname.clone(),
                queue,
                entries,
            });
        }
        self.xsks.set(queue, fd, 0).map_err(|source| XdpError::Map {
            ifname: self.ifname.clone(),
            map: "xsks",
            source: Box::new(source),
        })
    }

    /// Verdict counters summed over CPUs, by name (see [`COUNTER_NAMES`]).
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        let mut values = Vec::with_capacity(COUNTER_NAMES.len());
        for (index, name) in (0u32..).zip(COUNTER_NAMES) {
            let per_cpu = self
                .counters
                .get(&index, 0)
                .map_err(|source| XdpError::Map {
                    ifname: self.ifname.clone(),
                    map: "counters",
                    source: Box::new(source),
                })?;
            values.push((name, per_cpu.iter().copied().fold(0u64, u64::wrapping_add)));
        }
        Ok(XdpCounters { values })
    }

    /// Detach now (also done on drop, which logs instead of returning errors).
    pub fn detach(mut self) -> Result<(), XdpError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), XdpError> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        // Closing the link's last fd detaches the program. A child process forked at that moment
        // holds a copy of the fd until it execs (the fd is close-on-exec), so the program may
        // stay attached for a moment: wait for it to go.
        drop(link);
        let detach_err = |reason: String| XdpError::Detach {
            ifname: self.ifname.clone(),
            reason,
        };
        let deadline = Instant::now() + DETACH_TIMEOUT;
        loop {
            match self.rtnl.get_link_by_index(self.ifindex) {
                // The interface is gone, and the program with it.
                Err(e) if e.io.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                Err(e) => return Err(detach_err(format!("could not check the interface: {e}"))),
                Ok(link) if link.programs().any(|(_, id)| id == self.prog_id) => {
                    if Instant::now() >= deadline {
                        return Err(detach_err(format!(
                            "program {} is still attached after {DETACH_TIMEOUT:?} (does a \
                             forked child process hold the link's fd?)",
                            self.prog_id
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(_) => {
                    debug!(interface = %self.ifname, "XDP steering program detached");
                    return Ok(());
                }
            }
        }
    }
}

impl Drop for XdpPort {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            warn!(interface = %self.ifname, "{e}");
        }
    }
}

/// Id of the XDP program attached to `ifname` (in the calling thread's network namespace), if
/// any. With programs in several modes, the first of driver, generic, hardware.
pub fn attached_program(ifname: &str) -> Result<Option<u32>, XdpError> {
    let mut rtnl = Rtnl::open().map_err(|source| XdpError::Netlink {
        what: "opening a route socket".into(),
        source: Box::new(source),
    })?;
    Ok(rtnl.get_link(ifname)?.programs().next().map(|(_, id)| id))
}

/// Key of `local_addrs`: IPv6 as is, IPv4 v4-mapped (`::ffff:a.b.c.d`).
fn addr_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn load_err(e: ProgramError) -> XdpError {
    XdpError::Load(Box::new(e))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, XdpError> {
    ebpf.take_map(name)
        .ok_or(XdpError::MissingObject { what: "map", name })
}

fn stale_error(ifname: &str, prog_id: u32, source: NetlinkError) -> XdpError {
    let hint = if source.io.raw_os_error() == Some(libc::EBUSY) {
        ": it is held by a bpf_link of a running process (another espgw-dataplane?)"
    } else {
        ""
    };
    XdpError::StaleProgram {
        ifname: ifname.to_owned(),
        prog_id,
        source: Box::new(source),
        hint,
    }
}

/// The name of a loaded program, for log messages.
fn program_name(id: u32) -> String {
    loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// What RTM_GETLINK told us about an interface.
#[derive(Debug)]
struct LinkState {
    index: u32,
    /// `(mode flag, program id)` for each attached XDP program.
    xdp: Vec<(u32, u32)>,
}

impl LinkState {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut xdp = Vec::new();
        for attr in &msg.attributes {
            if let LinkAttribute::Xdp(nlas) = attr {
                for nla in nlas {
                    match nla {
                        LinkXdp::DrvProgId(id) if *id != 0 => xdp.push((XDP_FLAGS_DRV_MODE, *id)),
                        LinkXdp::SkbProgId(id) if *id != 0 => xdp.push((XDP_FLAGS_SKB_MODE, *id)),
                        LinkXdp::HwProgId(id) if *id != 0 => xdp.push((XDP_FLAGS_HW_MODE, *id)),
                        _ => {}
                    }
                }
            }
        }
        xdp.sort_unstable_by_key(|(flag, _)| match *flag {
            XDP_FLAGS_DRV_MODE => 0,
            XDP_FLAGS_SKB_MODE => 1,
            _ => 2,
        });
        Self {
            index: msg.header.index,
            xdp,
        }
    }

    fn programs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.xdp.iter().copied()
    }
}

/// A minimal rtnetlink client: one request at a time, replies matched by sequence number.
struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Best effort: the kernel's explanations make better error messages.
        let _ = socket.set_ext_ack(true);
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn get_link(&mut self, ifname: &str) -> Result<LinkState, XdpError> {
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::IfName(ifname.to_owned()));
        self.request_link(msg).map_err(|source| {
            if source.io.raw_os_error() == Some(libc::ENODEV) {
                XdpError::InterfaceNotFound {
                    ifname: ifname.to_owned(),
                }
            } else {
                XdpError::Netlink {
                    what: format!("looking up interface {ifname}"),
                    source: Box::new(source),
                }
            }
        })
    }

    fn get_link_by_index(&mut self, index: u32) -> Result<LinkState, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request_link(msg)
    }

    fn request_link(&mut self, msg: LinkMessage) -> Result<LinkState, NetlinkError> {
        match self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST)? {
            Some(RouteNetlinkMessage::NewLink(link)) => Ok(LinkState::from_message(&link)),
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "no RTM_NEWLINK reply").into()),
        }
    }

    /// Remove the program `prog_id` attached in mode `flag`, and only that one.
    fn remove_xdp(&mut self, index: u32, flag: u32, prog_id: u32) -> Result<(), NetlinkError> {
        // XDP_FLAGS_REPLACE with the expected program's fd: if another program was attached in
        // the meantime, it is left alone.
        let old = loaded_programs()
            .flatten()
            .find(|p| p.id() == prog_id)
            .and_then(|p| p.fd().ok());
        let Some(old) = old else {
            // Gone already (its bpf_link's process exited).
            return Ok(());
        };
        let old_fd = old.as_fd().as_raw_fd();
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Xdp(vec![
            LinkXdp::Fd(-1),
            LinkXdp::Flags(flag | XDP_FLAGS_REPLACE),
            LinkXdp::ExpectedFd(old_fd as u32),
        ]));
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK)?;
        Ok(())
    }

    /// Send one request; return the first reply message, or `None` for a plain ACK.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Option<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;

        loop {
            let len = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset + 16 <= len {
                let Some(msg_len) = self
                    .buf
                    .get(offset..offset + 4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
                else {
                    break;
                };
                let msg_len = msg_len as usize;
                let end = offset + msg_len;
                if msg_len < 16 || end > len {
                    break;
                }
                let bytes = &self.buf[offset..end];
                offset = (end + 3) & !3;
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(NetlinkError {
                            io: e.to_io(),
                            message: extack_message(reply.header.flags, &e.header),
                        });
                    }
                    NetlinkPayload::Error(_) => return Ok(None),
                    NetlinkPayload::InnerMessage(inner) => return Ok(Some(inner)),
                    _ => {}
                }
            }
        }
    }
}

/// The `NLMSGERR_ATTR_MSG` string of an error message's payload (after the error code: the
/// request, capped to its header or not, then the extended-ack attributes).
fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let request_len = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?) as usize
    };
    let mut attrs = payload.get((request_len + 3) & !3..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &attrs[4..len];
            let text = text.split(|&b| b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}
