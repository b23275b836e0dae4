//! `KernelNextHops` against a real kernel: routes and neighbours set up with `ip` in a network
//! namespace of its own, the code under test run inside it from a thread that entered it with
//! `setns` (the netlink thread it starts inherits the namespace).
//!
//! Each test builds a gateway namespace (ports `wan0` and `lan0`) and a peer namespace holding
//! the other ends of the veth pairs (`wan1`, `lan1`); a guard deletes both, also when a test
//! fails. Addresses are documentation ranges (RFC 5737, RFC 3849) and 10/8.
//!
//! These tests need root: `scripts/test.sh` runs them with `cargo test -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use espgw_dataplane::config::PortId::{self, Host, Lan, Wan};
use espgw_dataplane::counters::DropReason::{NoNeighbor, NoRoute};
use espgw_dataplane::netlink::{KernelNextHops, NetlinkError, PortLink, link_info};
use espgw_dataplane::nexthop::NextHops;
use espgw_wire::ethernet::EthernetAddress;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const GW_WAN_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0x0a, 0x01]);
const PEER_WAN_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0x0b, 0x01]);
const M1: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x01]);
const M2: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x02]);
const M3: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x03]);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac(m: EthernetAddress) -> String {
    m.0.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn run(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The gateway namespace and the peer namespace, deleted on drop.
struct Topology {
    gw: String,
    peer: String,
}

impl Topology {
    /// `wan0` 203.0.113.1/24, 2001:db8:1::1/64 — `wan1` (peer) 203.0.113.2/24, 2001:db8:1::2/64;
    /// `lan0` 10.0.0.1/24 — `lan1` (peer, no address). All up, no DAD.
    fn new(tag: &str) -> Topology {
        let pid = std::process::id();
        let t = Topology {
            gw: format!("espgw-nl-{pid}-{tag}-gw"),
            peer: format!("espgw-nl-{pid}-{tag}-pe"),
        };
        for ns in t.names() {
            run(&["netns", "add", ns]);
            // No duplicate address detection: link-local addresses usable at once (the kernel
            // sends no neighbour solicitation while its link-local address is tentative).
            for conf in ["all", "default"] {
                let out = Command::new("ip")
                    .args(["netns", "exec", ns, "sysctl", "-qw"])
                    .arg(format!("net.ipv6.conf.{conf}.accept_dad=0"))
                    .output()
                    .expect("run sysctl");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        t.gw(&format!(
            "link add wan0 address {} type veth peer name wan1 address {} netns {}",
            mac(GW_WAN_MAC),
            mac(PEER_WAN_MAC),
            t.peer
        ));
        t.gw(&format!(
            "link add lan0 type veth peer name lan1 netns {}",
            t.peer
        ));
        for (ns, dev) in [
            (&t.gw, "wan0"),
            (&t.gw, "lan0"),
            (&t.peer, "wan1"),
            (&t.peer, "lan1"),
        ] {
            run_ns(ns, &format!("link set {dev} up"));
        }
        t.gw("addr add 203.0.113.1/24 dev wan0");
        t.gw("addr add 2001:db8:1::1/64 dev wan0 nodad");
        t.gw("addr add 10.0.0.1/24 dev lan0");
        t.peer("addr add 203.0.113.2/24 dev wan1");
        t.peer("addr add 2001:db8:1::2/64 dev wan1 nodad");
        t
    }

    fn gw(&self, cmd: &str) -> String {
        run_ns(&self.gw, cmd)
    }

    fn peer(&self, cmd: &str) -> String {
        run_ns(&self.peer, cmd)
    }

    fn names(&self) -> [&str; 2] {
        [&self.gw, &self.peer]
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.gw, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn run_ns(ns: &str, cmd: &str) -> String {
    let mut args = vec!["-n", ns];
    args.extend(cmd.split_whitespace());
    run(&args)
}

/// Runs `f` on a thread that has entered namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}")).expect("open the namespace");
            // SAFETY: setns with an open network-namespace fd; it changes only this thread's
            // network namespace, and the fd outlives the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", io::Error::last_os_error());
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

fn ports() -> Vec<PortLink> {
    vec![
        PortLink {
            port: Wan,
            ifname: "wan0".into(),
        },
        PortLink {
            port: Lan,
            ifname: "lan0".into(),
        },
    ]
}

fn start(statics: &[(IpAddr, EthernetAddress)]) -> Arc<KernelNextHops> {
    KernelNextHops::start(&ports(), statics).expect("start KernelNextHops")
}

/// Polls `f` every 10 ms until it returns `Some` or `timeout` has passed.
fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some((v, t0.elapsed()));
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn resolves_to(
    nh: &KernelNextHops,
    port: PortId,
    dst: IpAddr,
    want: EthernetAddress,
    timeout: Duration,
) -> Duration {
    match wait_for(timeout, || {
        (nh.resolve(port, dst) == Ok(want)).then_some(())
    }) {
        Some((_, t)) => t,
        None => panic!(
            "resolve({port:?}, {dst}) is {:?}, not {want:?}, after {timeout:?}; {:?}",
            nh.resolve(port, dst),
            nh.stats()
        ),
    }
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn connected_and_gateway_routes_via_permanent_neighbours() {
    let t = Topology::new("rt");
    t.gw(&format!(
        "neigh add 203.0.113.2 lladdr {} dev wan0 nud permanent",
        mac(M1)
    ));
    t.gw("route add 198.51.100.0/24 via 203.0.113.254 dev wan0");
    t.gw(&format!(
        "neigh add 203.0.113.254 lladdr {} dev wan0 nud permanent",
        mac(M2)
    ));
    t.gw("route add default via 10.0.0.254 dev lan0");
    t.gw(&format!(
        "neigh add 10.0.0.254 lladdr {} dev lan0 nud permanent",
        mac(M3)
    ));
    in_netns(&t.gw, || {
        let nh = start(&[]);
        // Connected.
        assert_eq!(nh.resolve(Wan, ip("203.0.113.2")), Ok(M1));
        assert_eq!(nh.route(ip("203.0.113.2")), Ok((Wan, M1)));
        // Via a gateway.
        assert_eq!(nh.resolve(Wan, ip("198.51.100.7")), Ok(M2));
        assert_eq!(nh.route(ip("198.51.100.7")), Ok((Wan, M2)));
        // The default route is out of the LAN.
        assert_eq!(nh.route(ip("192.0.2.1")), Ok((Lan, M3)));
        assert_eq!(nh.resolve(Lan, ip("192.0.2.1")), Ok(M3));
        assert_eq!(nh.resolve(Lan, ip("198.51.100.7")), Ok(M3));
        // No route out of the WAN to it, and the host is no port.
        assert_eq!(nh.resolve(Wan, ip("192.0.2.1")), Err(NoRoute));
        assert_eq!(nh.resolve(Host, ip("203.0.113.2")), Err(NoRoute));
        let s = nh.stats();
        assert!(
            s.rebuilds >= 1 && s.routes >= 4 && s.neighbors >= 3,
            "{s:?}"
        );
        assert!(nh.is_running());
        nh.stop();
        assert!(!nh.is_running());
        // Lookups keep working on the last snapshot.
        assert_eq!(nh.resolve(Wan, ip("203.0.113.2")), Ok(M1));
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn ipv6_routes_and_neighbours() {
    let t = Topology::new("v6");
    t.gw(&format!(
        "neigh add 2001:db8:1::2 lladdr {} dev wan0 nud permanent",
        mac(M1)
    ));
    t.gw("route add 2001:db8:99::/48 via fe80::99 dev wan0");
    t.gw(&format!(
        "neigh add fe80::99 lladdr {} dev wan0 nud permanent",
        mac(M2)
    ));
    t.gw("addr add 2001:db8:2::1/64 dev lan0 nodad");
    t.gw("route add default via 2001:db8:2::fe dev lan0");
    t.gw(&format!(
        "neigh add 2001:db8:2::fe lladdr {} dev lan0 nud permanent",
        mac(M3)
    ));
    in_netns(&t.gw, || {
        let nh = start(&[]);
        assert_eq!(nh.resolve(Wan, ip("2001:db8:1::2")), Ok(M1));
        assert_eq!(nh.resolve(Wan, ip("2001:db8:99:1::1")), Ok(M2));
        assert_eq!(nh.route(ip("2001:db8:99:1::1")), Ok((Wan, M2)));
        assert_eq!(nh.resolve(Lan, ip("2001:db8:99:1::1")), Ok(M3));
        assert_eq!(nh.route(ip("2001:db8:77::1")), Ok((Lan, M3)));
        assert_eq!(nh.resolve(Wan, ip("2001:db8:77::1")), Err(NoRoute));
        // IPv4 has no default route.
        assert_eq!(nh.route(ip("192.0.2.1")), Err(NoRoute));
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn no_route_and_reject_routes() {
    let t = Topology::new("nr");
    t.gw("route add default via 203.0.113.254 dev wan0");
    t.gw(&format!(
        "neigh add 203.0.113.254 lladdr {} dev wan0 nud permanent",
        mac(M1)
    ));
    t.gw("route add blackhole 198.51.100.0/24");
    t.gw("route add unreachable 2001:db8:66::/48");
    in_netns(&t.gw, || {
        let nh = start(&[]);
        assert_eq!(nh.route(ip("192.0.2.1")), Ok((Wan, M1)));
        // The kernel would drop these: route() follows it; resolve() looks only at the port's
        // routes.
        assert_eq!(nh.route(ip("198.51.100.1")), Err(NoRoute));
        assert_eq!(nh.resolve(Wan, ip("198.51.100.1")), Ok(M1));
        assert_eq!(nh.route(ip("2001:db8:66::1")), Err(NoRoute));
        // Nothing out of the LAN but its connected prefix; no IPv6 default.
        assert_eq!(nh.resolve(Lan, ip("192.0.2.1")), Err(NoRoute));
        assert_eq!(nh.resolve(Wan, ip("2001:db8:5::1")), Err(NoRoute));
        // Routes appear and disappear.
        t.gw("route add 192.0.2.0/24 via 10.0.0.254 dev lan0");
        t.gw(&format!(
            "neigh add 10.0.0.254 lladdr {} dev lan0 nud permanent",
            mac(M2)
        ));
        resolves_to(&nh, Lan, ip("192.0.2.1"), M2, Duration::from_secs(2));
        assert_eq!(nh.route(ip("192.0.2.1")), Ok((Lan, M2)));
        t.gw("route del 192.0.2.0/24");
        wait_for(Duration::from_secs(2), || {
            (nh.resolve(Lan, ip("192.0.2.1")) == Err(NoRoute)).then_some(())
        })
        .expect("the deleted route is forgotten");
        assert_eq!(nh.route(ip("192.0.2.1")), Ok((Wan, M1)));
    });
}

fn neigh_state(t: &Topology, addr: &str, dev: &str) -> String {
    t.gw(&format!("neigh show {addr} dev {dev}"))
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn missing_neighbour_is_resolved_after_a_prod() {
    let t = Topology::new("pr");
    t.gw("route add 198.51.100.0/24 via inet6 2001:db8:1::2 dev wan0");
    in_netns(&t.gw, || {
        let nh = start(&[]);
        // Nothing has talked to the peer: the kernel knows no neighbour.
        assert_eq!(neigh_state(&t, "203.0.113.2", "wan0"), "");
        assert_eq!(nh.resolve(Wan, ip("203.0.113.2")), Err(NoNeighbor));
        let took = resolves_to(
            &nh,
            Wan,
            ip("203.0.113.2"),
            PEER_WAN_MAC,
            Duration::from_secs(2),
        );
        eprintln!("IPv4 neighbour resolved after {took:?}");
        let state = neigh_state(&t, "203.0.113.2", "wan0");
        assert!(state.contains("REACHABLE"), "{state}");
        // IPv6 (neighbour discovery), and an IPv4 route via an IPv6 gateway.
        assert_eq!(nh.route(ip("2001:db8:1::2")), Err(NoNeighbor));
        let took = resolves_to(
            &nh,
            Wan,
            ip("2001:db8:1::2"),
            PEER_WAN_MAC,
            Duration::from_secs(2),
        );
        eprintln!("IPv6 neighbour resolved after {took:?}");
        assert_eq!(nh.route(ip("198.51.100.9")), Ok((Wan, PEER_WAN_MAC)));
        // Nobody has 203.0.113.99: the kernel tries (INCOMPLETE, then FAILED), the answer
        // stays no_neighbor.
        assert_eq!(nh.resolve(Wan, ip("203.0.113.99")), Err(NoNeighbor));
        let state = wait_for(Duration::from_secs(2), || {
            let s = neigh_state(&t, "203.0.113.99", "wan0");
            (s.contains("INCOMPLETE") || s.contains("FAILED")).then_some(s)
        })
        .expect("the kernel starts resolving 203.0.113.99");
        eprintln!("203.0.113.99: {}", state.0.trim());
        assert_eq!(nh.resolve(Wan, ip("203.0.113.99")), Err(NoNeighbor));
        let s = nh.stats();
        assert!(s.prods_sent >= 3, "{s:?}");
        assert_eq!(s.prod_errors, 0, "{s:?}");
        // A STALE next hop is used, and prodded so that the kernel re-validates it (DELAY, then
        // a unicast probe).
        t.gw(&format!(
            "neigh add 203.0.113.50 lladdr {} dev wan0 nud stale",
            mac(M1)
        ));
        let sent = nh.stats().prods_sent;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(nh.resolve(Wan, ip("203.0.113.50")), Ok(M1));
        let state = wait_for(Duration::from_secs(1), || {
            let s = neigh_state(&t, "203.0.113.50", "wan0");
            (!s.contains("STALE")).then_some(s)
        })
        .expect("the stale neighbour is re-validated");
        eprintln!("203.0.113.50 after a prod while stale: {}", state.0.trim());
        assert!(nh.stats().prods_sent > sent, "{:?}", nh.stats());
        // Rate limit: a burst of misses sends at most one more prod per address.
        let before = nh.stats().prods_sent;
        for _ in 0..1000 {
            let _ = nh.resolve(Wan, ip("203.0.113.99"));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(nh.stats().prods_sent <= before + 1, "{:?}", nh.stats());
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn changed_neighbour_mac_is_picked_up() {
    let t = Topology::new("mc");
    t.gw(&format!(
        "neigh add 203.0.113.2 lladdr {} dev wan0 nud permanent",
        mac(M1)
    ));
    t.gw("route add 198.51.100.0/24 via 203.0.113.2 dev wan0");
    in_netns(&t.gw, || {
        let nh = start(&[]);
        assert_eq!(nh.resolve(Wan, ip("198.51.100.1")), Ok(M1));
        let rebuilds = nh.stats().rebuilds;
        t.gw(&format!(
            "neigh replace 203.0.113.2 lladdr {} dev wan0 nud permanent",
            mac(M2)
        ));
        let took = resolves_to(&nh, Wan, ip("198.51.100.1"), M2, Duration::from_secs(2));
        eprintln!("new MAC in use after {took:?}");
        assert!(nh.stats().rebuilds > rebuilds);
        // Deleted: no neighbour any more (and the prod then finds the real peer).
        t.gw("neigh del 203.0.113.2 dev wan0");
        resolves_to(
            &nh,
            Wan,
            ip("198.51.100.1"),
            PEER_WAN_MAC,
            Duration::from_secs(2),
        );
        // The gateway moves.
        t.gw("route replace 198.51.100.0/24 via 203.0.113.3 dev wan0");
        t.gw(&format!(
            "neigh add 203.0.113.3 lladdr {} dev wan0 nud permanent",
            mac(M3)
        ));
        resolves_to(&nh, Wan, ip("198.51.100.1"), M3, Duration::from_secs(2));
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn static_neighbours_win() {
    let t = Topology::new("st");
    t.gw(&format!(
        "neigh add 203.0.113.2 lladdr {} dev wan0 nud permanent",
        mac(M1)
    ));
    t.gw("route add 198.51.100.0/24 via 203.0.113.254 dev wan0");
    in_netns(&t.gw, || {
        let nh = start(&[(ip("203.0.113.2"), M2), (ip("203.0.113.254"), M3)]);
        assert_eq!(nh.resolve(Wan, ip("203.0.113.2")), Ok(M2));
        // A gateway the kernel does not know: the static entry, and no prod.
        assert_eq!(nh.resolve(Wan, ip("198.51.100.5")), Ok(M3));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(nh.stats().prods_sent, 0);
        // A static neighbour is no route.
        assert_eq!(nh.resolve(Lan, ip("203.0.113.2")), Err(NoRoute));
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn link_info_of_a_veth() {
    let t = Topology::new("li");
    t.gw("link set wan0 mtu 1400");
    let line = t.gw("-o link show wan0");
    let ifindex: u32 = line.split(':').next().unwrap().trim().parse().unwrap();
    in_netns(&t.gw, || {
        let li = link_info("wan0").unwrap();
        assert_eq!(li.ifindex, ifindex);
        assert_eq!(li.mac, GW_WAN_MAC);
        assert_eq!(li.mtu, 1400);
        for a in [(ip("203.0.113.1"), 24), (ip("2001:db8:1::1"), 64)] {
            assert!(li.addresses.contains(&a), "{a:?} in {:?}", li.addresses);
        }
        assert!(
            li.addresses
                .iter()
                .all(|(a, _)| *a != ip("10.0.0.1") && *a != ip("203.0.113.2")),
            "{:?}",
            li.addresses
        );
        let e = link_info("nosuch0").unwrap_err();
        assert!(matches!(e, NetlinkError::NoSuchInterface(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "network interface \"nosuch0\" does not exist"
        );
        let e = link_info("much-too-long-name").unwrap_err();
        assert!(matches!(e, NetlinkError::BadInterfaceName(_)), "{e}");
        // The same for a port.
        let e = KernelNextHops::start(
            &[PortLink {
                port: Wan,
                ifname: "nosuch0".into(),
            }],
            &[],
        )
        .unwrap_err();
        assert!(matches!(e, NetlinkError::NoSuchInterface(_)), "{e}");
    });
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn namespaces_are_removed() {
    let names = {
        let t = Topology::new("cl");
        let names = t.names().map(String::from);
        let list = run(&["netns", "list"]);
        assert!(names.iter().all(|n| list.contains(n.as_str())), "{list}");
        names
    };
    let list = run(&["netns", "list"]);
    assert!(names.iter().all(|n| !list.contains(n.as_str())), "{list}");
}

#[test]
#[ignore = "needs root and network namespaces (scripts/test.sh runs it)"]
fn port_interface_recreated() {
    let t = Topology::new("re");
    t.gw(&format!(
        "neigh add 10.0.0.5 lladdr {} dev lan0 nud permanent",
        mac(M1)
    ));
    in_netns(&t.gw, || {
        let nh = start(&[]);
        assert_eq!(nh.resolve(Lan, ip("10.0.0.5")), Ok(M1));
        t.gw("link del lan0");
        wait_for(Duration::from_secs(2), || {
            (nh.resolve(Lan, ip("10.0.0.5")) == Err(NoRoute)).then_some(())
        })
        .expect("the deleted port has no routes");
        // Back, with another interface index.
        t.gw(&format!(
            "link add lan0 type veth peer name lan1 netns {}",
            t.peer
        ));
        t.gw("link set lan0 up");
        t.gw("addr add 10.0.0.1/24 dev lan0");
        t.gw(&format!(
            "neigh add 10.0.0.5 lladdr {} dev lan0 nud permanent",
            mac(M2)
        ));
        resolves_to(&nh, Lan, ip("10.0.0.5"), M2, Duration::from_secs(2));
        assert_eq!(nh.route(ip("10.0.0.5")), Ok((Lan, M2)));
        assert!(nh.is_running());
    });
}
