//! Outbound SPD lookups with many policies: [`Spd::lookup`] (the tuple-space index from
//! `Spd::INDEX_FROM` policies on) next to [`Spd::lookup_in_order`] (the ordered walk, what the
//! SPD did for every size before), over the same SPD in the same run.
//!
//! The SPD is a hub's: a bypass for its management network first, then one host-to-host
//! policy per spoke (`10.255.0.1/32 -> spoke/32`, protect with that spoke's SA), the shape a
//! DMVPN hub or a remote-access concentrator gets with one tunnel per peer. Each iteration
//! looks up 1,024 flows to spokes spread over the whole list (a fixed pseudo-random order);
//! criterion reports the time per iteration, so divide by 1,024 for one lookup.
//!
//! `cargo bench -p espgw-benches --bench spd`

use criterion::{BenchmarkId, Criterion, Throughput};
use espgw_dataplane::policy::{
    Action, FlowAddr, FlowKey, Policy, PortRange, Prefix, Selector, Spd,
};
use espgw_dataplane::sa::SaId;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// Lookups per iteration.
const FLOWS: usize = 1024;
/// Spokes (policies after the bypass).
const SIZES: [u32; 4] = [15, 100, 10_000, 100_000];

fn host(a: Ipv4Addr) -> Prefix {
    Prefix::host(IpAddr::V4(a))
}

fn spoke(i: u32) -> Ipv4Addr {
    // 10.0.0.0 upwards: 10.0.0.0 .. 10.1.134.159 for 100,000 spokes.
    Ipv4Addr::from_bits(0x0A00_0000 + i)
}

fn hub_spd(spokes: u32) -> Spd {
    let hub = Ipv4Addr::new(10, 255, 0, 1);
    let mut policies = vec![Policy {
        selector: Selector {
            src: Prefix::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 24),
            dst: Prefix::any(false),
            protocol: None,
            src_ports: PortRange::ANY,
            dst_ports: PortRange::ANY,
        },
        action: Action::Bypass,
    }];
    policies.extend((0..spokes).map(|i| Policy {
        selector: Selector {
            src: host(hub),
            dst: host(spoke(i)),
            protocol: None,
            src_ports: PortRange::ANY,
            dst_ports: PortRange::ANY,
        },
        action: Action::Protect(SaId(u64::from(i))),
    }));
    Spd::new(policies, Action::Discard)
}

/// `FLOWS` flows from the hub to spokes in a fixed scattered order.
fn flows(spokes: u32) -> Vec<FlowKey> {
    let mut x = 0x9E37_79B9u32;
    (0..FLOWS)
        .map(|_| {
            // xorshift32: a fixed, reproducible spread over the spokes.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            FlowKey {
                src: FlowAddr::from(IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1))),
                dst: FlowAddr::from(IpAddr::V4(spoke(x % spokes))),
                protocol: 6,
                ports: Some((40_000, 443)),
            }
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("spd-hub");
    g.throughput(Throughput::Elements(FLOWS as u64));
    for &n in &SIZES {
        let spd = hub_spd(n);
        let keys = flows(n);
        // Both must give the same answers before either is timed.
        for k in &keys {
            let (action, at) = spd.lookup(k);
            assert_eq!(at, spd.lookup_in_order(k), "{k:?}");
            assert!(matches!(action, Action::Protect(_)), "{k:?}");
        }
        let policies = n as usize + 1;
        g.bench_with_input(BenchmarkId::new("lookup", policies), &keys, |b, keys| {
            b.iter(|| {
                for k in keys {
                    black_box(spd.lookup(black_box(k)));
                }
            });
        });
        // The ordered walk at 100,001 policies takes ~0.25 s per iteration here.
        g.bench_with_input(BenchmarkId::new("in-order", policies), &keys, |b, keys| {
            b.iter(|| {
                for k in keys {
                    black_box(spd.lookup_in_order(black_box(k)));
                }
            });
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .without_plots()
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
}
