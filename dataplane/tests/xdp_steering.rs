//! The XDP steering program and its loader, on veth pairs in network namespaces.
//!
//! Each test builds its own topology: namespace A (the test's sender, raw frames through an
//! AF_PACKET socket) — veth — namespace B (the gateway side, where the program is attached and
//! where the AF_XDP and UDP sockets live). The work in B runs on a thread that entered B with
//! `setns`. Namespaces are deleted by a guard, also when a test fails.
//!
//! These tests need root: `scripts/test.sh` runs them with `cargo test -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    num::NonZeroU32,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    ptr::NonNull,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use espgw_dataplane::xdp::{
    AttachMode, COUNTER_NAMES, PortRole, XdpCounters, XdpError, XdpPort, attached_program,
    steering_object,
};
use xdpilone::{IfInfo, Socket, SocketConfig, Umem, UmemConfig, User};

/// The sender is plain Python (standard library only): the project's venv if there is one.
fn python() -> &'static str {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
    if std::path::Path::new(venv).exists() {
        venv
    } else {
        "python3"
    }
}

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const BROADCAST: [u8; 6] = [0xff; 6];
const GW4: [u8; 4] = [192, 0, 2, 1];
const PEER4: [u8; 4] = [192, 0, 2, 2];
const GW6: [u8; 16] = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
const PEER6: [u8; 16] = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2]);

const fn v6(s: [u16; 8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        out[2 * i] = (s[i] >> 8) as u8;
        out[2 * i + 1] = s[i] as u8;
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Topology

/// Two namespaces joined by a veth pair; deleted on drop.
struct Topology {
    ns_a: String,
    ns_b: String,
    veth_a: String,
    veth_b: String,
}

impl Topology {
    /// `tag`: one or two characters naming the test, so parallel tests never collide.
    fn new(tag: &str) -> Topology {
        let pid = std::process::id();
        let topo = Topology {
            ns_a: format!("espgw-xdp-{pid}-{tag}-a"),
            ns_b: format!("espgw-xdp-{pid}-{tag}-b"),
            veth_a: format!("xs{tag}{pid}a"),
            veth_b: format!("xs{tag}{pid}b"),
        };
        assert!(
            topo.veth_b.len() <= 15,
            "interface name {} too long",
            topo.veth_b
        );
        // From here on, the guard cleans up whatever was created.
        run("ip", &["netns", "add", &topo.ns_a]);
        run("ip", &["netns", "add", &topo.ns_b]);
        let (a, b) = (&topo.veth_a, &topo.veth_b);
        run(
            "ip",
            &[
                "-n",
                &topo.ns_a,
                "link",
                "add",
                a,
                "address",
                &mac(MAC_A),
                "type",
                "veth",
                "peer",
                "name",
                b,
                "address",
                &mac(MAC_B),
                "netns",
                &topo.ns_b,
            ],
        );
        // A is a silent sender: no IPv6 (no router solicitations, MLD or DAD) and no IPv4
        // address, so every frame the program sees is one the test sent.
        run_in(
            &topo.ns_a,
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{a}.disable_ipv6=1")],
        );
        run_in(&topo.ns_a, "ethtool", &["-K", a, "tx", "off"]);
        run("ip", &["-n", &topo.ns_a, "link", "set", a, "up"]);
        run("ip", &["-n", &topo.ns_b, "link", "set", "lo", "up"]);
        run(
            "ip",
            &["-n", &topo.ns_b, "addr", "add", "192.0.2.1/24", "dev", b],
        );
        run(
            "ip",
            &[
                "-n",
                &topo.ns_b,
                "addr",
                "add",
                "2001:db8::1/64",
                "dev",
                b,
                "nodad",
            ],
        );
        run("ip", &["-n", &topo.ns_b, "link", "set", b, "up"]);
        topo
    }

    /// Send raw Ethernet frames from A, in order.
    fn send(&self, frames: &[Vec<u8>]) {
        let script = "import socket, sys\n\
                      s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
                      s.bind((sys.argv[1], 0))\n\
                      for line in sys.stdin.read().split():\n    s.send(bytes.fromhex(line))\n";
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns_a,
                python(),
                "-c",
                script,
                &self.veth_a,
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn the sender");
        {
            let mut stdin = child.stdin.take().expect("sender stdin");
            for frame in frames {
                writeln!(stdin, "{}", hex(frame)).expect("write to the sender");
            }
        }
        let status = child.wait().expect("wait for the sender");
        assert!(status.success(), "sender failed: {status}");
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_in(ns: &str, cmd: &str, args: &[&str]) {
    let mut full = vec!["netns", "exec", ns, cmd];
    full.extend_from_slice(args);
    run("ip", &full);
}

/// Run `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let thread = s.spawn(|| {
            enter_netns(ns);
            f()
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn enter_netns(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("open the namespace");
    // SAFETY: setns with an open namespace fd; it only changes the calling thread's network
    // namespace, which nothing else in this thread depends on yet.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// An AF_XDP socket (copy mode, RX only) on queue 0

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

const FRAMES: u32 = 256;

struct Xsk {
    rx: xdpilone::RingRx,
    _fq: xdpilone::DeviceQueue,
    user: User,
    _umem: Umem,
    base: *mut u8,
    /// The UMEM area; dropped after the umem and rings above.
    _pages: Vec<Page>,
}

impl Xsk {
    fn bind(ifname: &str) -> Xsk {
        let mut pages = vec![Page([0; 4096]); FRAMES as usize];
        let base = pages.as_mut_ptr().cast::<u8>();
        let area = NonNull::slice_from_raw_parts(
            NonNull::new(base).expect("non-null"),
            pages.len() * size_of::<Page>(),
        );
        let config = UmemConfig {
            fill_size: FRAMES,
            complete_size: FRAMES,
            ..UmemConfig::default()
        };
        // SAFETY: the area is page aligned (Page is), `FRAMES` frames of `frame_size` long, and
        // outlives the umem: it is owned by the same struct and dropped after it. Nothing in this
        // process reads or writes it except through descriptors the kernel handed back.
        let umem = unsafe { Umem::new(config, area) }.expect("umem");
        let mut info = IfInfo::invalid();
        let name = std::ffi::CString::new(ifname).expect("name");
        info.from_name(&name).expect("interface");
        info.set_queue(0);
        let sock = Socket::with_shared(&info, &umem).expect("xsk socket");
        let mut fq = umem.fq_cq(&sock).expect("fill/completion rings");
        let user = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(FRAMES),
                    tx_size: None,
                    bind_flags: SocketConfig::XDP_BIND_COPY,
                },
            )
            .expect("rx ring");
        let rx = user.map_rx().expect("map rx");
        umem.bind(&user).expect("bind (copy mode)");
        {
            let mut fill = fq.fill(FRAMES);
            let frame_size = u64::from(UmemConfig::default().frame_size);
            let n = fill.insert((0..u64::from(FRAMES)).map(|i| i * frame_size));
            fill.commit();
            assert_eq!(n, FRAMES);
        }
        Xsk {
            rx,
            _fq: fq,
            user,
            _umem: umem,
            base,
            _pages: pages,
        }
    }

    fn fd(&self) -> i32 {
        self.user.as_raw_fd()
    }

    /// Everything received so far (frames are not given back: there are enough for a test).
    fn drain(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut reader = self.rx.receive(FRAMES);
        while let Some(desc) = reader.read() {
            let end = desc.addr + u64::from(desc.len);
            assert!(
                end <= u64::from(FRAMES) * 4096,
                "descriptor out of the umem"
            );
            // SAFETY: the kernel handed this descriptor back through the RX ring; the bytes
            // it names lie within the area (checked above) and the kernel does not write them
            // until the frame is put into the fill ring again, which this test never does.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.base.add(desc.addr as usize), desc.len as usize)
            };
            out.push(bytes.to_vec());
        }
        reader.release();
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet with optional tags `(tpid, tci)`.
fn eth(dst: [u8; 6], tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&MAC_A);
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 header (+ options) and payload; `frag`: the flags/fragment-offset field.
fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    frag: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    let sum = checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8], pseudo: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut sum = checksum(&[pseudo, &[0, 17], &len.to_be_bytes(), &u]);
    if sum == 0 {
        sum = 0xffff;
    }
    u[6..8].copy_from_slice(&sum.to_be_bytes());
    u
}

fn udp4(dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let pseudo = [PEER4, dst].concat();
    let l4 = udp(dport, dport, payload, &pseudo);
    eth(MAC_B, &[], 0x0800, &ipv4(PEER4, dst, 17, 0, &[], &l4))
}

fn udp6(dst: [u8; 16], dport: u16, payload: &[u8]) -> Vec<u8> {
    let pseudo = [PEER6, dst].concat();
    let l4 = udp(dport, dport, payload, &pseudo);
    eth(MAC_B, &[], 0x86dd, &ipv6(PEER6, dst, 17, &l4))
}

/// An ESP packet: SPI, sequence number, then opaque bytes.
fn esp(spi: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&spi.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..len).map(|i| (i * 7 + seq as usize) as u8));
    p
}

fn icmp_echo4(dst: [u8; 4]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.extend_from_slice(b"espgw-xdp-test");
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    eth(MAC_B, &[], 0x0800, &ipv4(PEER4, dst, 1, 0, &[], &icmp))
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&PEER4);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target);
    eth(BROADCAST, &[], 0x0806, &arp)
}

// ---------------------------------------------------------------------------------------------
// Counters

/// Wait until the program has seen `total` frames, then check every counter: the ones named in
/// `expected`, all others zero.
fn expect_counters(port: &XdpPort, total: u64, expected: &[(&str, u64)]) -> XdpCounters {
    let deadline = Instant::now() + Duration::from_secs(5);
    let counters = loop {
        let counters = port.counters().expect("counters");
        if counters.total() >= total || Instant::now() > deadline {
            break counters;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let want: BTreeMap<&str, u64> = COUNTER_NAMES
        .iter()
        .map(|n| {
            (
                *n,
                expected.iter().find(|(e, _)| e == n).map_or(0, |(_, v)| *v),
            )
        })
        .collect();
    let got: BTreeMap<&str, u64> = counters.iter().collect();
    assert_eq!(got, want, "counters {}", counters.to_json());
    counters
}

fn recv_all(socket: &UdpSocket) -> Vec<(IpAddr, Vec<u8>)> {
    socket.set_nonblocking(true).expect("nonblocking");
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        let ip = match from.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        out.push((ip, buf[..n].to_vec()));
    }
    out
}

fn local_addrs() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(Ipv4Addr::from(GW4)),
        IpAddr::V6(Ipv6Addr::from(GW6)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn wan_steering() {
    let topo = Topology::new("w");
    in_netns(&topo.ns_b, || {
        let ike = UdpSocket::bind("[::]:500").expect("bind 500");
        let natt = UdpSocket::bind("[::]:4500").expect("bind 4500");
        let mut port = XdpPort::attach(
            &topo.veth_b,
            PortRole::Wan { encap_port: 4500 },
            &local_addrs(),
            AttachMode::Native,
        )
        .expect("attach");
        assert_eq!(
            attached_program(&topo.veth_b).expect("query"),
            Some(port.program_id())
        );

        // No socket registered yet: ESP goes to the kernel.
        let early = eth(
            MAC_B,
            &[],
            0x0800,
            &ipv4(PEER4, GW4, 50, 0, &[], &esp(0x100, 1, 32)),
        );
        topo.send(&[early]);
        expect_counters(&port, 1, &[("no_socket", 1)]);

        let mut xsk = Xsk::bind(&topo.veth_b);
        port.register_socket(0, xsk.fd()).expect("register");

        let ike_v4 = [&[0u8; 8][..], &[0x11; 8], b"ike sa init v4"].concat();
        let ike_v6 = [&[0u8; 8][..], &[0x22; 8], b"ike sa init v6"].concat();
        let ike_natt = [&[0u8; 4][..], &[0x33; 8], &[0; 8], b"ike over 4500"].concat();

        // Frames for the socket, in the order sent.
        let esp_v4 = eth(
            MAC_B,
            &[],
            0x0800,
            &ipv4(PEER4, GW4, 50, 0, &[], &esp(0x101, 1, 48)),
        );
        let esp_v6 = eth(
            MAC_B,
            &[],
            0x86dd,
            &ipv6(PEER6, GW6, 50, &esp(0x102, 1, 48)),
        );
        let esp_v4_opts = eth(
            MAC_B,
            &[],
            0x0800,
            // Router alert option (4 bytes): IHL 6.
            &ipv4(PEER4, GW4, 50, 0, &[0x94, 4, 0, 0], &esp(0x103, 1, 40)),
        );
        let esp_v4_vlan = eth(
            MAC_B,
            &[(0x8100, 100)],
            0x0800,
            &ipv4(PEER4, GW4, 50, 0, &[], &esp(0x104, 1, 40)),
        );
        let esp_v6_qinq = eth(
            MAC_B,
            &[(0x88a8, 200)],
            0x86dd,
            &ipv6(PEER6, GW6, 50, &esp(0x105, 1, 40)),
        );
        // Hop-by-hop (8 bytes: PadN) then destination options (16 bytes) then ESP.
        let ext = [
            &[60u8, 0, 1, 4, 0, 0, 0, 0][..],
            &[50u8, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &esp(0x106, 1, 40),
        ]
        .concat();
        let esp_v6_ext = eth(MAC_B, &[], 0x86dd, &ipv6(PEER6, GW6, 0, &ext));
        let esp_udp_v4 = udp4(GW4, 4500, &esp(0x107, 1, 64));
        let esp_udp_v6 = udp6(GW6, 4500, &esp(0x108, 1, 64));
        // Outer fragments: IPv4 with MF, and IPv6 with a fragment header (offset 0, M=1).
        let frag_v4 = eth(
            MAC_B,
            &[],
            0x0800,
            &ipv4(PEER4, GW4, 50, 0x2000, &[], &esp(0x109, 1, 64)),
        );
        let frag6 = [&[50u8, 0, 0, 1, 0, 0, 0, 7][..], &esp(0x10a, 1, 64)].concat();
        let frag_v6 = eth(MAC_B, &[], 0x86dd, &ipv6(PEER6, GW6, 44, &frag6));
        // A non-first IPv4 fragment of ESP (offset 1480 bytes).
        let frag_v4_later = eth(
            MAC_B,
            &[],
            0x0800,
            &ipv4(PEER4, GW4, 50, 185, &[], &[0xab; 40]),
        );

        let to_socket = vec![
            esp_v4,
            esp_v6,
            esp_v4_opts,
            esp_v4_vlan,
            esp_v6_qinq,
            esp_v6_ext,
            esp_udp_v4,
            esp_udp_v6,
            frag_v4,
            frag_v6,
            frag_v4_later,
        ];

        // Frames for the kernel (or dropped), interleaved.
        let mut frames = Vec::new();
        let mut socket_frames = to_socket.iter();
        let mut next_socket = || socket_frames.next().cloned().expect("socket frame");
        frames.push(next_socket());
        frames.push(udp4(GW4, 500, &ike_v4)); // ike
        frames.push(next_socket());
        frames.push(udp6(GW6, 500, &ike_v6)); // ike
        frames.push(next_socket());
        frames.push(udp4(GW4, 4500, &[0xff])); // nat_keepalive, before the IKE on 4500
        frames.push(next_socket());
        frames.push(udp4(GW4, 4500, &ike_natt)); // ike (non-ESP marker)
        frames.push(next_socket());
        frames.push(icmp_echo4(GW4)); // to_kernel
        frames.push(next_socket());
        frames.push(arp_request(GW4)); // to_kernel
        frames.push(next_socket());
        frames.push(udp4(GW4, 4500, &[1, 2, 3, 4, 5])); // encap_other
        frames.push(next_socket());
        frames.push(udp6(GW6, 4500, &[0xff, 0xff])); // encap_other
        frames.push(next_socket());
        // ESP and ESP in UDP to an address that is not the gateway's: not_local.
        frames.push(eth(
            MAC_B,
            &[],
            0x0800,
            &ipv4(PEER4, [198, 51, 100, 7], 50, 0, &[], &esp(0x200, 1, 32)),
        ));
        frames.push(udp4([198, 51, 100, 7], 4500, &esp(0x201, 1, 32)));
        frames.push(next_socket());
        // A first fragment of a UDP datagram: udp_fragment.
        let big_udp = udp(500, 500, &[0u8; 64], &[PEER4, GW4].concat());
        frames.push(eth(
            MAC_B,
            &[],
            0x0800,
            &ipv4(PEER4, GW4, 17, 0x2000, &[], &big_udp),
        ));
        frames.push(next_socket());
        // Malformed: IHL 3; an IPv4 header cut short; a VLAN tag cut short.
        let mut bad_ihl = ipv4(PEER4, GW4, 50, 0, &[], &esp(0x300, 1, 16));
        bad_ihl[0] = 0x43;
        frames.push(eth(MAC_B, &[], 0x0800, &bad_ihl));
        frames.push(eth(MAC_B, &[], 0x0800, &[0x45, 0, 0, 40, 0, 0]));
        frames.push(eth(MAC_B, &[], 0x8100, &[0]));
        // ESP in UDP whose UDP header is cut short: malformed.
        let cut = ipv4(PEER4, GW4, 17, 0, &[], &[0x11, 0x94, 0x11]);
        frames.push(eth(MAC_B, &[], 0x0800, &cut));
        assert!(
            socket_frames.next().is_none(),
            "every socket frame was sent"
        );
        let total = 1 + frames.len() as u64;

        topo.send(&frames);
        expect_counters(
            &port,
            total,
            &[
                ("no_socket", 1),
                ("esp", 6),
                ("esp_in_udp", 2),
                ("esp_fragment", 3),
                ("ike", 3),
                ("nat_keepalive", 1),
                ("to_kernel", 2),
                ("encap_other", 2),
                ("not_local", 2),
                ("udp_fragment", 1),
                ("malformed", 4),
            ],
        );

        // The socket got exactly the ESP frames, byte for byte and in order.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut received = Vec::new();
        while received.len() < to_socket.len() && Instant::now() < deadline {
            received.extend(xsk.drain());
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        received.extend(xsk.drain());
        assert_eq!(
            received.len(),
            to_socket.len(),
            "frames on the AF_XDP socket"
        );
        for (i, (got, want)) in received.iter().zip(&to_socket).enumerate() {
            assert_eq!(hex(got), hex(want), "socket frame {i}");
        }

        // The kernel got the IKE datagrams, and not the keepalive.
        let got_ike = recv_all(&ike);
        assert_eq!(
            got_ike,
            vec![
                (IpAddr::V4(Ipv4Addr::from(PEER4)), ike_v4.clone()),
                (IpAddr::V6(Ipv6Addr::from(PEER6)), ike_v6.clone()),
            ]
        );
        let got_natt = recv_all(&natt);
        assert_eq!(
            got_natt.first(),
            Some(&(IpAddr::V4(Ipv4Addr::from(PEER4)), ike_natt.clone())),
            "the keepalive must not reach the kernel"
        );
        // The datagrams the program passed as encap_other reach the kernel too.
        assert_eq!(got_natt.len(), 3, "{got_natt:?}");

        port.detach().expect("detach");
        assert_eq!(attached_program(&topo.veth_b).expect("query"), None);
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn lan_steering() {
    let topo = Topology::new("l");
    in_netns(&topo.ns_b, || {
        // Generic mode here, native in the WAN test.
        let mut port = XdpPort::attach(
            &topo.veth_b,
            PortRole::Lan,
            &local_addrs(),
            AttachMode::Generic,
        )
        .expect("attach");
        let mut xsk = Xsk::bind(&topo.veth_b);
        port.register_socket(0, xsk.fd()).expect("register");
        let echo = UdpSocket::bind("[::]:7").expect("bind 7");

        let routed_v4 = icmp_echo4([203, 0, 113, 5]);
        let routed_v6 = udp6(v6([0x2001, 0xdb8, 5, 0, 0, 0, 0, 5]), 53, b"query");
        let routed_v4_vlan = eth(
            MAC_B,
            &[(0x8100, 7)],
            0x0800,
            &ipv4(PEER4, [198, 51, 100, 9], 6, 0, &[], &[0; 20]),
        );
        let to_socket = vec![routed_v4.clone(), routed_v6.clone(), routed_v4_vlan.clone()];

        let mcast_mac = [0x01, 0x00, 0x5e, 0, 0, 5];
        let frames = vec![
            routed_v4,
            udp4(GW4, 7, b"to the gateway v4"), // local
            udp6(GW6, 7, b"to the gateway v6"), // local
            icmp_echo4(GW4),                    // local
            arp_request(GW4),                   // to_kernel
            routed_v6,
            eth(
                mcast_mac,
                &[],
                0x0800,
                &ipv4(PEER4, [224, 0, 0, 5], 89, 0, &[], &[0; 20]),
            ),
            eth(
                BROADCAST,
                &[],
                0x0800,
                &ipv4(PEER4, [255; 4], 17, 0, &[], &[0; 8]),
            ),
            // Unicast MAC but a multicast, link-local, broadcast or loopback IP destination.
            udp6(v6([0xff02, 0, 0, 0, 0, 0, 0, 1]), 9, b"x"),
            udp6(v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]), 9, b"x"),
            udp4([255; 4], 9, b"x"),
            udp4([127, 0, 0, 1], 9, b"x"),
            udp4([169, 254, 1, 1], 9, b"x"),
            routed_v4_vlan,
            eth(MAC_B, &[], 0x0800, &[0x45]), // malformed
        ];
        topo.send(&frames);
        expect_counters(
            &port,
            frames.len() as u64,
            &[
                ("routed", 3),
                ("local", 3),
                ("to_kernel", 8),
                ("malformed", 1),
            ],
        );

        let deadline = Instant::now() + Duration::from_secs(5);
        let mut received = Vec::new();
        while received.len() < to_socket.len() && Instant::now() < deadline {
            received.extend(xsk.drain());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            received.len(),
            to_socket.len(),
            "frames on the AF_XDP socket"
        );
        for (i, (got, want)) in received.iter().zip(&to_socket).enumerate() {
            assert_eq!(hex(got), hex(want), "socket frame {i}");
        }
        let got = recv_all(&echo);
        assert_eq!(
            got,
            vec![
                (
                    IpAddr::V4(Ipv4Addr::from(PEER4)),
                    b"to the gateway v4".to_vec()
                ),
                (
                    IpAddr::V6(Ipv6Addr::from(PEER6)),
                    b"to the gateway v6".to_vec()
                ),
            ]
        );
        drop(port);
        assert_eq!(attached_program(&topo.veth_b).expect("query"), None);
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn detach_and_stale_programs() {
    let topo = Topology::new("d");
    let object = std::env::temp_dir().join(format!("espgw-xdp-{}.o", std::process::id()));
    std::fs::write(&object, steering_object()).expect("write the object");
    let object_path = object.to_str().expect("utf-8 path").to_owned();
    let _remove = RemoveOnDrop(object.clone());

    in_netns(&topo.ns_b, || {
        let ifname = topo.veth_b.as_str();
        let wan = PortRole::Wan { encap_port: 4500 };

        // Drop detaches.
        let port =
            XdpPort::attach(ifname, wan, &local_addrs(), AttachMode::Native).expect("attach");
        assert_eq!(
            attached_program(ifname).expect("query"),
            Some(port.program_id())
        );
        drop(port);
        assert_eq!(attached_program(ifname).expect("query"), None);

        // A second attach while one is live fails and leaves the first alone.
        let port =
            XdpPort::attach(ifname, wan, &local_addrs(), AttachMode::Native).expect("attach");
        let err = XdpPort::attach(ifname, wan, &local_addrs(), AttachMode::Native)
            .expect_err("second attach");
        let message = err.to_string();
        assert!(
            matches!(err, XdpError::StaleProgram { prog_id, .. } if prog_id == port.program_id()),
            "{message}"
        );
        assert!(message.contains("held by a bpf_link"), "{message}");
        assert_eq!(
            attached_program(ifname).expect("query"),
            Some(port.program_id())
        );
        port.detach().expect("detach");
        assert_eq!(attached_program(ifname).expect("query"), None);

        // Programs left by iproute2 (netlink attachments), in both modes, are replaced, with a
        // warning naming the interface and the old program.
        let log = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let log = Arc::clone(&log);
            move || LogWriter(Arc::clone(&log))
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        let _log_guard = tracing::subscriber::set_default(subscriber);
        for (stale_mode, mode) in [
            ("xdpgeneric", AttachMode::Native),
            ("xdpdrv", AttachMode::Native),
            ("xdpdrv", AttachMode::Generic),
        ] {
            let out = Command::new("ip")
                .args([
                    "link",
                    "set",
                    "dev",
                    ifname,
                    stale_mode,
                    "obj",
                    &object_path,
                    "sec",
                    "xdp",
                ])
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stale = attached_program(ifname)
                .expect("query")
                .expect("stale program");
            let port = XdpPort::attach(ifname, wan, &local_addrs(), mode).expect("replace");
            assert_ne!(port.program_id(), stale);
            let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
            assert!(
                text.contains("WARN")
                    && text.contains(&format!(
                        "replaced an XDP program left on {ifname} (id {stale}"
                    )),
                "{text}"
            );
            assert_eq!(
                attached_program(ifname).expect("query"),
                Some(port.program_id())
            );
            drop(port);
            assert_eq!(
                attached_program(ifname).expect("query"),
                None,
                "{stale_mode}"
            );
        }
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn killed_process_leaves_no_program() {
    // The child: attach, report, wait to be killed.
    if let Ok(target) = std::env::var("ESPGW_XDP_TEST_CHILD") {
        let (ns, ifname) = target.split_once(':').expect("ns:ifname");
        enter_netns(ns);
        let port = XdpPort::attach(ifname, PortRole::Lan, &local_addrs(), AttachMode::Native)
            .expect("attach in the child");
        println!("ATTACHED {}", port.program_id());
        io::stdout().flush().expect("flush");
        std::thread::sleep(Duration::from_secs(120));
        panic!("the child was not killed");
    }

    let topo = Topology::new("k");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "killed_process_leaves_no_program",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "ESPGW_XDP_TEST_CHILD",
            format!("{}:{}", topo.ns_b, topo.veth_b),
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let mut lines = BufReader::new(child.stdout.take().expect("child stdout")).lines();
    let child_prog = loop {
        match lines.next() {
            Some(Ok(line)) => {
                // libtest prints "test NAME ... " in front, on the same line.
                if let Some((_, id)) = line.split_once("ATTACHED ") {
                    break id.trim().parse::<u32>().expect("program id");
                }
            }
            _ => {
                let _ = child.kill();
                panic!("the child exited before attaching: {:?}", child.wait());
            }
        }
    };
    in_netns(&topo.ns_b, || {
        assert_eq!(
            attached_program(&topo.veth_b).expect("query"),
            Some(child_prog)
        );
    });
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    in_netns(&topo.ns_b, || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let attached = attached_program(&topo.veth_b).expect("query");
            if attached.is_none() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "program {attached:?} outlived its process"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

/// Error paths that need neither root nor a namespace.
#[test]
fn attach_errors() {
    let err = XdpPort::attach("espgw-nosuch0", PortRole::Lan, &[], AttachMode::Native)
        .expect_err("no such interface");
    assert_eq!(err.to_string(), "interface espgw-nosuch0 not found");
    let err = XdpPort::attach(
        "lo",
        PortRole::Wan { encap_port: 500 },
        &[],
        AttachMode::Native,
    )
    .expect_err("encap port 500");
    assert!(matches!(err, XdpError::InvalidConfig { .. }), "{err}");
}

/// The loader's handle must be able to move to the thread that owns the port, and its error
/// must be cheap to return.
#[test]
fn port_is_send_and_error_is_small() {
    fn send<T: Send>() {}
    send::<XdpPort>();
    // Small enough to be returned by value everywhere (clippy's result_large_err).
    assert!(size_of::<XdpError>() <= 64, "{}", size_of::<XdpError>());
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
