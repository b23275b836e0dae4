//! Next-hop resolution: which port a destination is behind and which MAC address to send to.
//!
//! The pipeline asks a [`NextHops`] implementation. Replay mode uses [`StaticNextHops`] built
//! from the configuration (`[[route]]`, `[[neighbor]]`, the ports' connected prefixes); the live
//! gateway will follow the kernel's routes and neighbours over netlink behind the same trait.

use crate::config::{PortConfig, PortId, RouteConfig};
use crate::counters::DropReason;
use crate::policy::{FlowAddr, Prefix};
use espgw_wire::ethernet::EthernetAddress;
use std::collections::HashMap;
use std::fmt::Debug;
use std::net::IpAddr;

/// Answers "where does a packet to this address go?".
pub trait NextHops: Send + Sync + Debug {
    /// MAC address of the next hop towards `dst` out of `port`.
    fn resolve(&self, port: PortId, dst: IpAddr) -> Result<EthernetAddress, DropReason>;
    /// The port and next-hop MAC towards `dst`, whichever port it is behind (for locally
    /// originated traffic).
    fn route(&self, dst: IpAddr) -> Result<(PortId, EthernetAddress), DropReason>;
}

#[derive(Debug, Clone)]
struct Route {
    dst: Prefix,
    via: Option<IpAddr>,
    port: PortId,
}

/// Routes and neighbours fixed at start.
#[derive(Debug, Clone, Default)]
pub struct StaticNextHops {
    /// Longest prefix first (configured and connected).
    routes: Vec<Route>,
    /// The ports' connected prefixes.
    connected: Vec<(PortId, Prefix)>,
    neighbors: HashMap<IpAddr, EthernetAddress>,
}

impl StaticNextHops {
    /// From configured routes, neighbours and the ports' connected prefixes.
    pub fn new(
        routes: &[RouteConfig],
        neighbors: &[(IpAddr, EthernetAddress)],
        wan: &PortConfig,
        lan: &PortConfig,
    ) -> Self {
        let mut r: Vec<Route> = routes
            .iter()
            .map(|r| Route {
                dst: r.dst,
                via: r.via,
                port: r.port,
            })
            .collect();
        let mut connected = Vec::new();
        for (port, pc) in [(PortId::Wan, wan), (PortId::Lan, lan)] {
            for (_, prefix) in &pc.addresses {
                r.push(Route {
                    dst: *prefix,
                    via: None,
                    port,
                });
                connected.push((port, *prefix));
            }
        }
        // Longest prefix first; configured routes before connected ones of the same length.
        r.sort_by_key(|x| std::cmp::Reverse(x.dst.prefix_len()));
        StaticNextHops {
            routes: r,
            connected,
            neighbors: neighbors.iter().copied().collect(),
        }
    }

    fn lookup(&self, port: Option<PortId>, dst: IpAddr) -> Result<(PortId, IpAddr), DropReason> {
        let a = FlowAddr::from(dst);
        for r in &self.routes {
            if port.is_none_or(|p| p == r.port) && r.dst.contains(&a) {
                return Ok((r.port, r.via.unwrap_or(dst)));
            }
        }
        // A static neighbour entry for the destination itself is an implicit host route: on the
        // port whose connected prefix holds it, or on any port if no prefix does (peers often sit
        // beyond a router without a configured prefix).
        if self.neighbors.contains_key(&dst) {
            let home = self
                .connected
                .iter()
                .find(|(_, p)| p.contains(&a))
                .map(|(port, _)| *port);
            match (port, home) {
                (Some(p), Some(h)) if p != h => {}
                (_, Some(h)) => return Ok((h, dst)),
                (p, None) => return Ok((p.unwrap_or(PortId::Wan), dst)),
            }
        }
        Err(DropReason::NoRoute)
    }
}

impl NextHops for StaticNextHops {
    fn resolve(&self, port: PortId, dst: IpAddr) -> Result<EthernetAddress, DropReason> {
        let (_, hop) = self.lookup(Some(port), dst)?;
        self.neighbors
            .get(&hop)
            .copied()
            .ok_or(DropReason::NoNeighbor)
    }

    fn route(&self, dst: IpAddr) -> Result<(PortId, EthernetAddress), DropReason> {
        let (port, hop) = self.lookup(None, dst)?;
        let mac = self
            .neighbors
            .get(&hop)
            .copied()
            .ok_or(DropReason::NoNeighbor)?;
        Ok((port, mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn port(addr: &str, len: u8) -> PortConfig {
        PortConfig {
            mac: EthernetAddress([2, 0, 0, 0, 0, 9]),
            addresses: vec![(ip(addr), Prefix::new(ip(addr), len))],
            mtu: 1500,
            vlan: None,
            interface: None,
            mac_set: true,
            mtu_set: true,
        }
    }

    #[test]
    fn connected_routed_and_neighbor_only() {
        let m1 = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let m2 = EthernetAddress([2, 0, 0, 0, 0, 2]);
        let m3 = EthernetAddress([2, 0, 0, 0, 0, 3]);
        let nh = StaticNextHops::new(
            &[RouteConfig {
                dst: Prefix::new(ip("10.9.0.0"), 16),
                via: Some(ip("10.1.0.254")),
                port: PortId::Lan,
            }],
            &[
                (ip("10.1.0.5"), m1),
                (ip("10.1.0.254"), m2),
                (ip("198.51.100.7"), m3),
            ],
            &port("203.0.113.1", 24),
            &port("10.1.0.1", 16),
        );
        assert_eq!(nh.resolve(PortId::Lan, ip("10.1.0.5")), Ok(m1));
        assert_eq!(nh.resolve(PortId::Lan, ip("10.9.3.3")), Ok(m2));
        assert_eq!(
            nh.resolve(PortId::Lan, ip("10.1.0.6")),
            Err(DropReason::NoNeighbor)
        );
        assert_eq!(nh.resolve(PortId::Wan, ip("198.51.100.7")), Ok(m3));
        assert_eq!(
            nh.resolve(PortId::Wan, ip("192.0.2.1")),
            Err(DropReason::NoRoute)
        );
        assert_eq!(nh.route(ip("10.9.1.1")), Ok((PortId::Lan, m2)));
        // A neighbour is only reachable through the port it sits behind.
        assert_eq!(
            nh.resolve(PortId::Wan, ip("10.1.0.5")),
            Err(DropReason::NoRoute)
        );
        assert_eq!(nh.route(ip("10.1.0.5")), Ok((PortId::Lan, m1)));
        assert_eq!(nh.route(ip("198.51.100.7")), Ok((PortId::Wan, m3)));
        // Outside every connected prefix a static neighbour is reachable on either port.
        assert_eq!(nh.resolve(PortId::Lan, ip("198.51.100.7")), Ok(m3));
    }
}
