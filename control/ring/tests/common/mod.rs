//! Helpers shared by the integration tests: unique segment paths, deterministic records, and
//! proptest strategies for every record kind.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use espgw_ring::*;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A path under /dev/shm unique to this process and call, removed when the guard drops.
pub struct ShmPath(pub PathBuf);

impl ShmPath {
    pub fn new(tag: &str) -> ShmPath {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        ShmPath(PathBuf::from(format!(
            "/dev/shm/espgw-ring-test-{}-{tag}-{n}",
            std::process::id()
        )))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ShmPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn small_params(to_dp: u32, from_dp: u32) -> RingParams {
    RingParams {
        record_size: 512,
        to_dp_slots: to_dp,
        from_dp_slots: from_dp,
    }
}

/// Deterministic bytes from a seed.
pub fn bytes_for(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn v4(a: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

pub fn v6(a: u128) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(a))
}

pub fn sa_ref_for(seq: u64) -> SaRef {
    SaRef {
        direction: if seq.is_multiple_of(2) {
            Direction::In
        } else {
            Direction::Out
        },
        spi: 0x1000 + (seq as u32 & 0x0fff_ffff),
        generation: seq,
    }
}

/// A valid SA whose every field depends on `seq` (algorithms cycle through all of them).
pub fn sa_for(seq: u64) -> SaSpec {
    let enc_alg = EncAlg::ALL[seq as usize % EncAlg::ALL.len()];
    let integ_alg = if enc_alg.is_aead() {
        IntegAlg::None
    } else {
        IntegAlg::ALL[1 + (seq / 7) as usize % (IntegAlg::ALL.len() - 1)]
    };
    let six = seq.is_multiple_of(3);
    let (local, remote) = if six {
        (
            v6(0x2001_0db8 << 96 | u128::from(seq)),
            v6(0x2001_0db9 << 96 | 1),
        )
    } else {
        (v4(0x0a00_0001), v4(0xc000_0200 | (seq as u32 & 0xff)))
    };
    let selectors = (0..(seq % 5) as usize)
        .map(|i| {
            let (src, dst) = if six {
                (v6(u128::from(seq) << 64), v6(i as u128))
            } else {
                (v4(seq as u32), v4(i as u32))
            };
            Selector {
                src: IpPrefix {
                    addr: src,
                    len: if six { 64 } else { 24 },
                },
                dst: IpPrefix {
                    addr: dst,
                    len: i as u8,
                },
                protocol: [0, 6, 17, 1][i % 4],
                src_ports: PortRange::ANY,
                dst_ports: PortRange {
                    first: i as u16,
                    last: 1000 + i as u16,
                },
            }
        })
        .collect();
    let icv = enc_alg.aead_icv_len().unwrap_or(integ_alg.icv_len());
    SaSpec {
        generation: seq,
        spi: 0x1000 + (seq as u32 & 0x0fff_ffff),
        direction: if seq.is_multiple_of(2) {
            Direction::In
        } else {
            Direction::Out
        },
        mode: if seq % 4 == 3 {
            Mode::Transport
        } else {
            Mode::Tunnel
        },
        reqid: seq as u32,
        name: format!("sa-{seq}"),
        local,
        remote,
        encap: (seq % 2 == 1).then_some(UdpEncap {
            local_port: 4500,
            remote_port: 4500 + (seq % 1000) as u16,
        }),
        enc_alg,
        integ_alg,
        enc_key: Key::new(&bytes_for(seq, enc_alg.key_len())).unwrap(),
        salt: Key::new(&bytes_for(seq + 1, enc_alg.salt_len())).unwrap(),
        integ_key: Key::new(&bytes_for(seq + 2, integ_alg.key_len())).unwrap(),
        icv_len: icv as u8,
        esn: seq % 3 == 1,
        initial_seq: seq * 3,
        replay_window: if seq.is_multiple_of(2) { 1024 } else { 0 },
        lifetime: Lifetimes {
            soft_seconds: 3000,
            hard_seconds: 3600,
            soft_bytes: seq,
            hard_bytes: seq * 2,
            soft_packets: 0,
            hard_packets: 0,
        },
        selectors,
        df: DfMode::ALL[seq as usize % 3],
        dscp: if seq.is_multiple_of(2) {
            DscpMode::Copy
        } else {
            DscpMode::Set((seq % 64) as u8)
        },
        ecn: EcnMode::ALL[seq as usize % 2],
        outer_ttl: 64,
    }
}

/// The control → data plane record for position `seq` (every kind in turn).
pub fn to_dp_record(seq: u64) -> Record {
    match seq % 8 {
        0 => Record::AddSa(Box::new(sa_for(seq))),
        1 => Record::UpdateSa(SaUpdate {
            sa: sa_ref_for(seq),
            remote: v4(seq as u32),
            encap: Some(UdpEncap {
                local_port: 4500,
                remote_port: seq as u16,
            }),
            lifetime: Lifetimes {
                hard_seconds: seq,
                ..Lifetimes::default()
            },
        }),
        2 => Record::DeleteSa(sa_ref_for(seq)),
        3 => Record::AddPolicy(Box::new(PolicySpec {
            policy_id: seq as u32,
            generation: seq,
            direction: Direction::Out,
            priority: (seq % 100) as u32,
            selector: Selector {
                src: IpPrefix {
                    addr: v4(seq as u32),
                    len: 32,
                },
                dst: IpPrefix {
                    addr: v4(0),
                    len: 0,
                },
                protocol: 0,
                src_ports: PortRange::ANY,
                dst_ports: PortRange::ANY,
            },
            action: PolicyAction::Protect {
                sa_name: format!("sa-{seq}"),
            },
        })),
        4 => Record::DeletePolicy {
            policy_id: seq as u32,
            generation: seq,
        },
        5 => Record::Flush { older_than: seq },
        6 => Record::QueryCounters {
            sa: (seq % 16 == 6).then(|| sa_ref_for(seq)),
        },
        _ => Record::Resync { generation: seq },
    }
}

/// The data plane → control record for position `seq` (every kind in turn).
pub fn from_dp_record(seq: u64) -> Record {
    let sa = sa_ref_for(seq);
    match seq % 10 {
        0 => Record::SoftExpired {
            sa,
            limit: Limit::ALL[(seq / 10) as usize % 4],
        },
        1 => Record::HardExpired {
            sa,
            limit: Limit::ALL[(seq / 10) as usize % 4],
        },
        2 => Record::SeqNearExhaustion { sa },
        3 => Record::UnknownSpi {
            spi: seq as u32,
            src: v6(u128::from(seq)),
            dst: v6(1),
            src_port: 4500,
            dst_port: 4500,
        },
        4 => Record::NatMappingChanged {
            sa,
            src: v4(seq as u32),
            src_port: seq as u16,
        },
        5 => Record::FirstPacket { sa },
        6 => Record::Idle {
            sa,
            seconds: seq as u32,
        },
        7 => Record::CountersReply(SaCounters {
            sa,
            packets: seq,
            bytes: seq * 1000,
            drops: 1,
            replay_drops: 2,
            auth_failures: 3,
            last_seq: seq,
        }),
        8 => Record::Rejected {
            seq,
            reason: format!("reason {seq}"),
        },
        _ => Record::Applied { seq },
    }
}

// ---- proptest strategies ----

pub fn arb_v4() -> impl Strategy<Value = IpAddr> {
    any::<u32>().prop_map(v4)
}

pub fn arb_v6() -> impl Strategy<Value = IpAddr> {
    any::<u128>().prop_map(v6)
}

pub fn arb_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![arb_v4(), arb_v6()]
}

pub fn arb_addr_pair() -> impl Strategy<Value = (IpAddr, IpAddr)> {
    prop_oneof![(arb_v4(), arb_v4()), (arb_v6(), arb_v6())]
}

pub fn arb_ports() -> impl Strategy<Value = PortRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(a, b)| PortRange {
        first: a.min(b),
        last: a.max(b),
    })
}

pub fn arb_selector() -> impl Strategy<Value = Selector> {
    let v4s = (arb_v4(), 0u8..=32, arb_v4(), 0u8..=32);
    let v6s = (arb_v6(), 0u8..=128, arb_v6(), 0u8..=128);
    (prop_oneof![v4s, v6s], any::<u8>(), arb_ports(), arb_ports()).prop_map(
        |((s, sl, d, dl), protocol, src_ports, dst_ports)| Selector {
            src: IpPrefix { addr: s, len: sl },
            dst: IpPrefix { addr: d, len: dl },
            protocol,
            src_ports,
            dst_ports,
        },
    )
}

pub fn arb_direction() -> impl Strategy<Value = Direction> {
    prop::sample::select(Direction::ALL)
}

pub fn arb_sa_ref() -> impl Strategy<Value = SaRef> {
    (arb_direction(), 256u32.., any::<u64>()).prop_map(|(direction, spi, generation)| SaRef {
        direction,
        spi,
        generation,
    })
}

pub fn arb_lifetimes() -> impl Strategy<Value = Lifetimes> {
    prop::array::uniform6(prop_oneof![Just(0u64), any::<u64>()]).prop_map(|a| Lifetimes {
        soft_seconds: a[0],
        hard_seconds: a[1],
        soft_bytes: a[2],
        hard_bytes: a[3],
        soft_packets: a[4],
        hard_packets: a[5],
    })
}

pub fn arb_encap() -> impl Strategy<Value = Option<UdpEncap>> {
    prop::option::of((any::<u16>(), any::<u16>()).prop_map(|(l, r)| UdpEncap {
        local_port: l,
        remote_port: r,
    }))
}

pub fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9_.{}-]{1,32}", "[a-zé€{}]{1,10}"]
}

pub fn arb_key(len: usize) -> impl Strategy<Value = Key> {
    prop::collection::vec(any::<u8>(), len).prop_map(|v| Key::new(&v).unwrap())
}

pub fn arb_algs() -> impl Strategy<Value = (EncAlg, IntegAlg)> {
    prop::sample::select(EncAlg::ALL).prop_flat_map(|e| {
        let integ: Vec<IntegAlg> = if e.is_aead() {
            vec![IntegAlg::None]
        } else {
            IntegAlg::ALL[1..].to_vec()
        };
        (Just(e), prop::sample::select(integ))
    })
}

pub fn arb_sa() -> impl Strategy<Value = SaSpec> {
    let head = (
        any::<u64>(),
        256u32..,
        arb_direction(),
        prop::sample::select(Mode::ALL),
        any::<u32>(),
        arb_name(),
        arb_addr_pair(),
        arb_encap(),
    );
    let keys = arb_algs().prop_flat_map(|(e, i)| {
        (
            Just(e),
            Just(i),
            arb_key(e.key_len()),
            arb_key(e.salt_len()),
            arb_key(i.key_len()),
        )
    });
    let tail = (
        any::<bool>(),
        any::<u64>(),
        any::<u32>(),
        arb_lifetimes(),
        prop::collection::vec(arb_selector(), 0..=4),
        prop::sample::select(DfMode::ALL),
        prop_oneof![Just(DscpMode::Copy), (0u8..=63).prop_map(DscpMode::Set)],
        prop::sample::select(EcnMode::ALL),
        1u8..,
    );
    (head, keys, tail).prop_map(
        |(
            (generation, spi, direction, mode, reqid, name, (local, remote), encap),
            (enc_alg, integ_alg, enc_key, salt, integ_key),
            (esn, initial_seq, replay_window, lifetime, selectors, df, dscp, ecn, outer_ttl),
        )| {
            let icv_len = enc_alg.aead_icv_len().unwrap_or(integ_alg.icv_len()) as u8;
            SaSpec {
                generation,
                spi,
                direction,
                mode,
                reqid,
                name,
                local,
                remote,
                encap,
                enc_alg,
                integ_alg,
                enc_key,
                salt,
                integ_key,
                icv_len,
                esn,
                initial_seq,
                replay_window,
                lifetime,
                selectors,
                df,
                dscp,
                ecn,
                outer_ttl,
            }
        },
    )
}

pub fn arb_policy() -> impl Strategy<Value = PolicySpec> {
    (
        any::<u32>(),
        any::<u64>(),
        arb_direction(),
        any::<u32>(),
        arb_selector(),
        prop_oneof![
            arb_name().prop_map(|sa_name| PolicyAction::Protect { sa_name }),
            Just(PolicyAction::Bypass),
            Just(PolicyAction::Discard),
        ],
    )
        .prop_map(
            |(policy_id, generation, direction, priority, selector, action)| PolicySpec {
                policy_id,
                generation,
                direction,
                priority,
                selector,
                action,
            },
        )
}

pub fn arb_limit() -> impl Strategy<Value = Limit> {
    prop::sample::select(Limit::ALL)
}

/// Every record kind.
pub fn arb_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        arb_sa().prop_map(|s| Record::AddSa(Box::new(s))),
        (arb_sa_ref(), arb_addr(), arb_encap(), arb_lifetimes()).prop_map(
            |(sa, remote, encap, lifetime)| Record::UpdateSa(SaUpdate {
                sa,
                remote,
                encap,
                lifetime
            })
        ),
        arb_sa_ref().prop_map(Record::DeleteSa),
        arb_policy().prop_map(|p| Record::AddPolicy(Box::new(p))),
        (any::<u32>(), any::<u64>()).prop_map(|(policy_id, generation)| Record::DeletePolicy {
            policy_id,
            generation
        }),
        any::<u64>().prop_map(|older_than| Record::Flush { older_than }),
        prop::option::of(arb_sa_ref()).prop_map(|sa| Record::QueryCounters { sa }),
        any::<u64>().prop_map(|generation| Record::Resync { generation }),
        (arb_sa_ref(), arb_limit()).prop_map(|(sa, limit)| Record::SoftExpired { sa, limit }),
        (arb_sa_ref(), arb_limit()).prop_map(|(sa, limit)| Record::HardExpired { sa, limit }),
        arb_sa_ref().prop_map(|sa| Record::SeqNearExhaustion { sa }),
        (
            any::<u32>(),
            arb_addr(),
            arb_addr(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(spi, src, dst, src_port, dst_port)| Record::UnknownSpi {
                spi,
                src,
                dst,
                src_port,
                dst_port
            }),
        (arb_sa_ref(), arb_addr(), any::<u16>())
            .prop_map(|(sa, src, src_port)| { Record::NatMappingChanged { sa, src, src_port } }),
        arb_sa_ref().prop_map(|sa| Record::FirstPacket { sa }),
        (arb_sa_ref(), any::<u32>()).prop_map(|(sa, seconds)| Record::Idle { sa, seconds }),
        (arb_sa_ref(), prop::array::uniform6(any::<u64>())).prop_map(|(sa, c)| {
            Record::CountersReply(SaCounters {
                sa,
                packets: c[0],
                bytes: c[1],
                drops: c[2],
                replay_drops: c[3],
                auth_failures: c[4],
                last_seq: c[5],
            })
        }),
        (any::<u64>(), prop_oneof!["[ -~]{0,96}", "[a-zé€]{0,30}"])
            .prop_map(|(seq, reason)| Record::Rejected { seq, reason }),
        any::<u64>().prop_map(|seq| Record::Applied { seq }),
    ]
}

/// Encodes into a fresh buffer of the slot payload's size.
pub fn encode(r: &Record) -> Vec<u8> {
    let mut buf = vec![0u8; 512 - 24];
    let n = r.encode(&mut buf).unwrap();
    buf.truncate(n);
    buf
}
