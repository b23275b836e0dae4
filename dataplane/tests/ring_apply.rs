//! The data plane's applier of the SA ring: commands pushed by a control side attached to the
//! segment, checked in the SA database and in the answers. Segments live in /dev/shm (no root
//! needed) under unique names and are removed afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use espgw_crypto::SoftwareProvider;
use espgw_dataplane::policy::Action;
use espgw_dataplane::ringapply::Applier;
use espgw_dataplane::sa::{RunCounts, UnknownSpi};
use espgw_dataplane::sadb::SaDb;
use espgw_ring::{
    Consumer, DfMode, Direction, DscpMode, EcnMode, EncAlg, IntegAlg, IpPrefix, Key, Lifetimes,
    Limit, Mode, PolicyAction, PolicySpec, PortRange, Producer, Record, RingParams, SaRef, SaSpec,
    SaUpdate, Segment, Selector, UdpEncap,
};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

const LOCAL: &str = "203.0.113.1";
const REMOTE: &str = "198.51.100.7";

/// A segment path unique to this process and test; removed when dropped.
struct Shm(String);

impl Shm {
    fn new(name: &str) -> Shm {
        Shm(format!(
            "/dev/shm/espgw-ringapply-test-{}-{name}",
            std::process::id()
        ))
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Rig {
    db: Arc<SaDb>,
    applier: Applier,
    tx: Producer,
    rx: Consumer,
    _control: Segment,
    _shm: Shm,
}

fn rig(name: &str, params: RingParams) -> Rig {
    let shm = Shm::new(name);
    let db = Arc::new(SaDb::new(1024));
    let applier = Applier::with_params(&shm.0, params, Arc::clone(&db), Arc::new(SoftwareProvider))
        .expect("applier");
    let control = Segment::attach(&shm.0).expect("attach");
    let tx = control.sender().expect("sender");
    let rx = control.receiver().expect("receiver");
    Rig {
        db,
        applier,
        tx,
        rx,
        _control: control,
        _shm: shm,
    }
}

impl Rig {
    fn push(&mut self, r: Record) -> u64 {
        self.tx.try_push(&r).expect("push")
    }

    /// Polls until nothing is pending; returns every record the data plane sent.
    fn replies(&mut self) -> Vec<Record> {
        while self.applier.poll(1) > 0 {}
        let mut out = Vec::new();
        while let Some(r) = self.rx.try_pop().expect("pop") {
            out.push(r.record.expect("a valid reply"));
        }
        out
    }

    /// Pushes one command and returns its answers.
    fn cmd(&mut self, r: Record) -> (u64, Vec<Record>) {
        let seq = self.push(r);
        (seq, self.replies())
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn any_selector(src: &str, dst: &str) -> Selector {
    Selector {
        src: IpPrefix {
            addr: ip(src),
            len: 16,
        },
        dst: IpPrefix {
            addr: ip(dst),
            len: 16,
        },
        protocol: 0,
        src_ports: PortRange::ANY,
        dst_ports: PortRange::ANY,
    }
}

fn sa(direction: Direction, spi: u32, generation: u64, name: &str, variant: u8) -> SaSpec {
    let key: Vec<u8> = (0..16u8).map(|i| i ^ variant ^ (spi as u8)).collect();
    SaSpec {
        generation,
        spi,
        direction,
        mode: Mode::Tunnel,
        reqid: 1,
        name: name.into(),
        local: ip(LOCAL),
        remote: ip(REMOTE),
        encap: None,
        enc_alg: EncAlg::Aes128Gcm16,
        integ_alg: IntegAlg::None,
        enc_key: Key::new(&key).unwrap(),
        salt: Key::new(&[1, 2, 3, 4]).unwrap(),
        integ_key: Key::empty(),
        icv_len: 16,
        esn: false,
        initial_seq: 0,
        replay_window: 128,
        lifetime: Lifetimes::default(),
        selectors: vec![any_selector("10.2.0.0", "10.1.0.0")],
        df: DfMode::Copy,
        dscp: DscpMode::Copy,
        ecn: EcnMode::Normal,
        outer_ttl: 64,
    }
}

fn add(s: SaSpec) -> Record {
    Record::AddSa(Box::new(s))
}

fn protect(id: u32, generation: u64, priority: u32, sa_name: &str) -> Record {
    Record::AddPolicy(Box::new(PolicySpec {
        policy_id: id,
        generation,
        direction: Direction::Out,
        priority,
        selector: any_selector("10.1.0.0", "10.2.0.0"),
        action: PolicyAction::Protect {
            sa_name: sa_name.into(),
        },
    }))
}

fn sref(direction: Direction, spi: u32, generation: u64) -> SaRef {
    SaRef {
        direction,
        spi,
        generation,
    }
}

fn spd_actions(db: &SaDb) -> Vec<Action> {
    let guard = crossbeam_epoch::pin();
    db.spd(&guard)
        .map(|s| s.policies().iter().map(|p| p.action).collect())
        .unwrap_or_default()
}

fn rejected_reason(replies: &[Record], seq: u64) -> String {
    match replies.last() {
        Some(Record::Rejected { seq: s, reason }) if *s == seq => reason.clone(),
        other => panic!("expected Rejected for {seq}, got {other:?}"),
    }
}

fn assert_applied(replies: &[Record], seq: u64) {
    assert_eq!(
        replies.last(),
        Some(&Record::Applied { seq }),
        "{replies:?}"
    );
}

#[test]
fn add_policy_delete_flush() {
    let mut r = rig("basic", RingParams::default());
    let (s, rep) = r.cmd(add(sa(Direction::In, 0x1001, 10, "in-1", 0)));
    assert_applied(&rep, s);
    let (s, rep) = r.cmd(add(sa(Direction::Out, 0x2001, 10, "out-1", 0)));
    assert_applied(&rep, s);
    {
        let guard = crossbeam_epoch::pin();
        let found =
            r.db.lookup_inbound(0x1001, ip(LOCAL), &guard)
                .expect("inbound SA");
        assert_eq!(found.name, "in-1");
    }
    let out_id = r.db.id_by_name("out-1").expect("outbound SA");
    assert_eq!(
        r.applier.sa_id(&sref(Direction::Out, 0x2001, 10)),
        Some(out_id)
    );

    let (s, rep) = r.cmd(protect(7, 10, 100, "out-1"));
    assert_applied(&rep, s);
    // A second policy with a lower priority value goes first.
    let bypass = Record::AddPolicy(Box::new(PolicySpec {
        policy_id: 8,
        generation: 10,
        direction: Direction::Out,
        priority: 5,
        selector: any_selector("10.1.0.0", "10.9.0.0"),
        action: PolicyAction::Bypass,
    }));
    let (s, rep) = r.cmd(bypass);
    assert_applied(&rep, s);
    assert_eq!(
        spd_actions(&r.db),
        vec![Action::Bypass, Action::Protect(out_id)]
    );

    // Deleting the outbound SA: the policy fails closed.
    let (s, rep) = r.cmd(Record::DeleteSa(sref(Direction::Out, 0x2001, 10)));
    assert_applied(&rep, s);
    assert_eq!(r.db.id_by_name("out-1"), None);
    assert_eq!(spd_actions(&r.db), vec![Action::Bypass, Action::Discard]);
    // Re-added under the same name (new generation): the policy protects again.
    let (s, rep) = r.cmd(add(sa(Direction::Out, 0x2002, 11, "out-1", 0)));
    assert_applied(&rep, s);
    let new_id = r.db.id_by_name("out-1").unwrap();
    assert_eq!(
        spd_actions(&r.db),
        vec![Action::Bypass, Action::Protect(new_id)]
    );

    // DeletePolicy with a stale generation does nothing; with the right one removes.
    let (s, rep) = r.cmd(Record::DeletePolicy {
        policy_id: 8,
        generation: 3,
    });
    assert_applied(&rep, s);
    assert_eq!(spd_actions(&r.db).len(), 2);
    let (s, rep) = r.cmd(Record::DeletePolicy {
        policy_id: 8,
        generation: 10,
    });
    assert_applied(&rep, s);
    assert_eq!(spd_actions(&r.db), vec![Action::Protect(new_id)]);

    // Flush below 11: the generation-10 inbound SA and policy 7 (generation 10) go.
    let (s, rep) = r.cmd(Record::Flush { older_than: 11 });
    assert_applied(&rep, s);
    {
        let guard = crossbeam_epoch::pin();
        assert!(r.db.lookup_inbound(0x1001, ip(LOCAL), &guard).is_none());
    }
    assert!(spd_actions(&r.db).is_empty());
    assert_eq!(r.db.len(), 1);
    let (s, rep) = r.cmd(Record::Flush {
        older_than: u64::MAX,
    });
    assert_applied(&rep, s);
    assert_eq!(r.db.len(), 0);
    assert_eq!(r.applier.sa_count(), 0);
}

#[test]
fn idempotence_adoption_and_absent_delete() {
    let mut r = rig("idem", RingParams::default());
    let spec = sa(Direction::In, 0x3001, 5, "in-3", 0);
    let (s1, rep1) = r.cmd(add(spec.clone()));
    assert_applied(&rep1, s1);
    let id = r.db.id_by_name("in-3").unwrap();
    // The same record again (a re-read after a consumer crash): applied, not installed twice.
    let (s2, rep2) = r.cmd(add(spec.clone()));
    assert_applied(&rep2, s2);
    assert_eq!(r.db.len(), 1);
    assert_eq!(r.db.id_by_name("in-3"), Some(id));
    // Same reference, other keys: rejected.
    let (s, rep) = r.cmd(add(sa(Direction::In, 0x3001, 5, "in-3", 1)));
    assert!(
        rejected_reason(&rep, s).contains("other parameters"),
        "{rep:?}"
    );
    // A resync re-push with a new generation: adopted (same SA id, new reference).
    let (s, rep) = r.cmd(Record::Resync { generation: 9 });
    assert_applied(&rep, s);
    let mut again = spec.clone();
    again.generation = 9;
    let (s, rep) = r.cmd(add(again));
    assert_applied(&rep, s);
    assert_eq!(r.db.len(), 1);
    assert_eq!(r.applier.sa_id(&sref(Direction::In, 0x3001, 9)), Some(id));
    assert_eq!(r.applier.sa_id(&sref(Direction::In, 0x3001, 5)), None);
    let (s, rep) = r.cmd(Record::Flush { older_than: 9 });
    assert_applied(&rep, s);
    assert_eq!(
        r.db.id_by_name("in-3"),
        Some(id),
        "adopted SA survives the flush"
    );
    // A stale delete (old generation) and a delete of something never installed: applied, no effect.
    let (s, rep) = r.cmd(Record::DeleteSa(sref(Direction::In, 0x3001, 5)));
    assert_applied(&rep, s);
    let (s, rep) = r.cmd(Record::DeleteSa(sref(Direction::Out, 0x9999, 1)));
    assert_applied(&rep, s);
    assert_eq!(r.db.len(), 1);
    // The same delete twice.
    for _ in 0..2 {
        let (s, rep) = r.cmd(Record::DeleteSa(sref(Direction::In, 0x3001, 9)));
        assert_applied(&rep, s);
    }
    assert_eq!(r.db.len(), 0);
}

#[test]
fn bad_records_are_rejected_with_reasons() {
    let mut r = rig("bad", RingParams::default());
    // Bytes that are no record at all.
    let s = r.tx.try_push_raw(&[0xff, 0xee, 1, 2, 3]).unwrap();
    let rep = r.replies();
    let reason = rejected_reason(&rep, s);
    assert!(!reason.is_empty());
    // A truncated AddSa.
    let mut buf = [0u8; 600];
    let n = add(sa(Direction::In, 0x4001, 1, "x", 0))
        .encode(&mut buf)
        .unwrap();
    let s = r.tx.try_push_raw(&buf[..n - 3]).unwrap();
    let rep = r.replies();
    assert!(rejected_reason(&rep, s).contains("ends inside"), "{rep:?}");
    // Soft lifetime above the hard one.
    let mut spec = sa(Direction::In, 0x4002, 1, "life", 0);
    spec.lifetime.soft_bytes = 2000;
    spec.lifetime.hard_bytes = 1000;
    let (s, rep) = r.cmd(add(spec));
    let reason = rejected_reason(&rep, s);
    assert!(reason.contains("soft lifetime of 2000 bytes"), "{reason}");
    // Multicast peer.
    let mut spec = sa(Direction::Out, 0x4003, 1, "mc", 0);
    spec.remote = ip("224.0.0.5");
    let (s, rep) = r.cmd(add(spec));
    assert!(
        rejected_reason(&rep, s).contains("cannot carry ESP"),
        "{rep:?}"
    );
    // Duplicate inbound SPI with another name.
    let (s, rep) = r.cmd(add(sa(Direction::In, 0x4004, 1, "a", 0)));
    assert_applied(&rep, s);
    let (s, rep) = r.cmd(add(sa(Direction::In, 0x4004, 2, "b", 0)));
    assert!(
        rejected_reason(&rep, s).contains("already installed"),
        "{rep:?}"
    );
    // A protect policy naming no SA, or an inbound one.
    let (s, rep) = r.cmd(protect(1, 1, 1, "nope"));
    assert!(
        rejected_reason(&rep, s).contains("no outbound SA named"),
        "{rep:?}"
    );
    let (s, rep) = r.cmd(protect(1, 1, 1, "a"));
    assert!(
        rejected_reason(&rep, s).contains("no outbound SA named"),
        "{rep:?}"
    );
    // Updates an SA cannot take in place.
    let upd = |remote: &str, encap: Option<UdpEncap>, spi: u32| {
        Record::UpdateSa(SaUpdate {
            sa: sref(Direction::In, spi, 1),
            remote: ip(remote),
            encap,
            lifetime: Lifetimes::default(),
        })
    };
    let (s, rep) = r.cmd(upd("2001:db8::7", None, 0x4004));
    assert!(
        rejected_reason(&rep, s).contains("another address family"),
        "{rep:?}"
    );
    let natt = Some(UdpEncap {
        local_port: 4500,
        remote_port: 4500,
    });
    let (s, rep) = r.cmd(upd(REMOTE, natt, 0x4004));
    assert!(
        rejected_reason(&rep, s).contains("cannot be switched on or off"),
        "{rep:?}"
    );
    let (s, rep) = r.cmd(upd(REMOTE, None, 0x7777));
    assert!(rejected_reason(&rep, s).contains("no such SA"), "{rep:?}");
    // Counters of an unknown SA.
    let (s, rep) = r.cmd(Record::QueryCounters {
        sa: Some(sref(Direction::In, 0x7777, 1)),
    });
    assert!(rejected_reason(&rep, s).contains("no such SA"), "{rep:?}");
    assert_eq!(r.db.len(), 1);
}

#[test]
fn counters_and_lifetime_events() {
    let mut r = rig("events", RingParams::default());
    let mut spec = sa(Direction::Out, 0x5001, 3, "short", 0);
    spec.lifetime.soft_seconds = 1;
    spec.lifetime.hard_seconds = 2;
    spec.initial_seq = 41;
    let (s, rep) = r.cmd(add(spec));
    assert_applied(&rep, s);
    let (s, rep) = r.cmd(add(sa(Direction::In, 0x5002, 3, "long", 0)));
    assert_applied(&rep, s);
    let (s, rep) = r.cmd(Record::QueryCounters { sa: None });
    assert_eq!(rep.len(), 3, "{rep:?}");
    assert_applied(&rep, s);
    let replies: Vec<_> = rep
        .iter()
        .filter_map(|x| match x {
            Record::CountersReply(c) => Some(*c),
            _ => None,
        })
        .collect();
    let out = replies.iter().find(|c| c.sa.spi == 0x5001).unwrap();
    assert_eq!(out.last_seq, 41);
    assert_eq!(out.sa, sref(Direction::Out, 0x5001, 3));
    // The SA database's clock: the test installs at 1 ns; three seconds later both limits are
    // crossed.
    r.db.sweep(3_000_000_001);
    let rep = r.replies();
    let sa = sref(Direction::Out, 0x5001, 3);
    assert!(
        rep.iter()
            .any(|x| matches!(x, Record::SoftExpired { sa: s, .. } if *s == sa)),
        "{rep:?}"
    );
    assert!(
        rep.iter()
            .any(|x| matches!(x, Record::HardExpired { sa: s, .. } if *s == sa)),
        "{rep:?}"
    );
}

#[test]
fn a_full_event_ring_counts_lost_events_and_keeps_answers() {
    // Two slots back to the control side.
    let params = RingParams {
        from_dp_slots: 2,
        ..RingParams::default()
    };
    let mut r = rig("full", params);
    for i in 0..4u32 {
        let mut spec = sa(Direction::Out, 0x6000 + i, 1, &format!("o{i}"), 0);
        spec.lifetime.hard_seconds = 1;
        r.push(add(spec));
    }
    // The control side does not read: two answers fit, the rest wait in the applier.
    r.applier.poll(1);
    r.db.sweep(5_000_000_000);
    r.applier.poll(2);
    assert!(r.applier.events_lost() >= 3, "{}", r.applier.events_lost());
    // Every answer arrives, in order, once the control side reads.
    let mut seqs = Vec::new();
    for _ in 0..100 {
        r.applier.poll(3);
        while let Some(x) = r.rx.try_pop().unwrap() {
            if let Ok(Record::Applied { seq }) = x.record {
                seqs.push(seq);
            }
        }
    }
    assert_eq!(seqs, vec![0, 1, 2, 3]);
}

/// A tiny deterministic generator (xorshift64*), so failures replay from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Applied,
    Rejected,
}

fn name_of(dir: Direction, spi: u32) -> String {
    format!("{}-{spi:x}", if dir == Direction::In { "i" } else { "o" })
}

/// Random AddSa/DeleteSa/Flush/QueryCounters sequences against a model of the SA table:
/// SaRef → variant of the content (the key), with the applier's documented semantics.
#[test]
fn random_sequences_match_the_model() {
    for seed in 1..=6u64 {
        let mut r = rig(&format!("model-{seed}"), RingParams::default());
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut model: HashMap<SaRef, u8> = HashMap::new();
        // policy id → (generation, priority, SPI of the outbound SA it protects with)
        let mut policies: HashMap<u32, (u64, u32, u32)> = HashMap::new();
        // (answers by kind and outcome), to check the sequence exercised every path.
        let mut seen: HashMap<(espgw_ring::Kind, bool), u32> = HashMap::new();
        for step in 0..400 {
            let dir = if rng.below(2) == 0 {
                Direction::In
            } else {
                Direction::Out
            };
            let spi = 0x1000 + rng.below(12) as u32;
            let generation = 1 + rng.below(6);
            let this = sref(dir, spi, generation);
            let (cmd, expect, counters) = match rng.below(13) {
                0..=4 => {
                    let variant = (rng.below(4) == 0) as u8;
                    let existing = model
                        .iter()
                        .find(|(k, _)| k.direction == dir && k.spi == spi)
                        .map(|(k, v)| (*k, *v));
                    let expect = match existing {
                        Some((_, v)) if v != variant => Expect::Rejected,
                        Some((k, v)) => {
                            model.remove(&k);
                            model.insert(this, v);
                            Expect::Applied
                        }
                        None => {
                            model.insert(this, variant);
                            Expect::Applied
                        }
                    };
                    let spec = sa(dir, spi, generation, &name_of(dir, spi), variant);
                    (add(spec), expect, 0)
                }
                5..=7 => {
                    model.remove(&this);
                    (Record::DeleteSa(this), Expect::Applied, 0)
                }
                8 => {
                    let t = 1 + rng.below(7);
                    model.retain(|k, _| k.generation >= t);
                    policies.retain(|_, p| p.0 >= t);
                    (Record::Flush { older_than: t }, Expect::Applied, 0)
                }
                9 => (
                    Record::QueryCounters { sa: None },
                    Expect::Applied,
                    model.len(),
                ),
                10 | 11 => {
                    let id = rng.below(5) as u32;
                    let priority = rng.below(3) as u32;
                    let has_sa = model
                        .keys()
                        .any(|k| k.direction == Direction::Out && k.spi == spi);
                    let expect = match policies.get(&id) {
                        Some(p) if p.0 > generation => Expect::Rejected,
                        _ if !has_sa => Expect::Rejected,
                        _ => {
                            policies.insert(id, (generation, priority, spi));
                            Expect::Applied
                        }
                    };
                    let name = name_of(Direction::Out, spi);
                    (protect(id, generation, priority, &name), expect, 0)
                }
                _ => {
                    let id = rng.below(5) as u32;
                    if policies.get(&id).is_some_and(|p| p.0 == generation) {
                        policies.remove(&id);
                    }
                    (
                        Record::DeletePolicy {
                            policy_id: id,
                            generation,
                        },
                        Expect::Applied,
                        0,
                    )
                }
            };
            let (seq, rep) = r.cmd(cmd.clone());
            assert_eq!(
                rep.len(),
                counters + 1,
                "seed {seed} step {step} {cmd:?}: {rep:?}"
            );
            match (expect, rep.last()) {
                (Expect::Applied, Some(Record::Applied { seq: s })) if *s == seq => {}
                (Expect::Rejected, Some(Record::Rejected { seq: s, .. })) if *s == seq => {}
                (e, got) => panic!("seed {seed} step {step} {cmd:?}: expected {e:?}, got {got:?}"),
            }
            *seen
                .entry((cmd.kind(), expect == Expect::Applied))
                .or_default() += 1;
            // The SPD agrees with the model: by (priority, id); a deleted SA's policy discards.
            let mut want: Vec<_> = policies.iter().map(|(id, p)| (p.1, *id, p.2)).collect();
            want.sort();
            let want: Vec<Action> = want
                .into_iter()
                .map(
                    |(_, _, spi)| match r.db.id_by_name(&name_of(Direction::Out, spi)) {
                        Some(id) => Action::Protect(id),
                        None => Action::Discard,
                    },
                )
                .collect();
            assert_eq!(spd_actions(&r.db), want, "seed {seed} step {step} {cmd:?}");
            // The SA database agrees with the model.
            assert_eq!(r.db.len(), model.len(), "seed {seed} step {step}");
            assert_eq!(r.applier.sa_count(), model.len(), "seed {seed} step {step}");
            let guard = crossbeam_epoch::pin();
            for s in 0x1000..0x100c_u32 {
                for d in [Direction::In, Direction::Out] {
                    let entry = model.iter().find(|(k, _)| k.direction == d && k.spi == s);
                    let by_name = r.db.id_by_name(&name_of(d, s));
                    match entry {
                        Some((k, _)) => {
                            let id = r.applier.sa_id(k).expect("applier knows the SA");
                            assert_eq!(by_name, Some(id), "seed {seed} step {step}");
                        }
                        None => assert_eq!(by_name, None, "seed {seed} step {step} {d:?} {s:#x}"),
                    }
                    if d == Direction::In {
                        let found = r.db.lookup_inbound(s, ip(LOCAL), &guard);
                        assert_eq!(found.is_some(), entry.is_some(), "seed {seed} step {step}");
                    }
                }
            }
        }
        use espgw_ring::Kind;
        for path in [
            (Kind::AddSa, true),
            (Kind::AddSa, false),
            (Kind::DeleteSa, true),
            (Kind::Flush, true),
            (Kind::QueryCounters, true),
            (Kind::AddPolicy, true),
            (Kind::AddPolicy, false),
            (Kind::DeletePolicy, true),
        ] {
            assert!(
                seen.get(&path).copied().unwrap_or(0) > 0,
                "seed {seed}: {path:?} never happened: {seen:?}"
            );
        }
    }
}

const FILE_CONFIG: &str = r#"
[dataplane]
ring = "/dev/shm/espgw.ring"
[dataplane.wan]
mac = "02:00:00:00:00:01"
addresses = ["203.0.113.1/24"]

[[sa]]
name = "file-out"
direction = "out"
spi = 0x00009001
local = "203.0.113.1"
remote = "198.51.100.7"
aead = "aes128gcm16"
key = "0x000102030405060708090a0b0c0d0e0f10111213"

[[policy]]
src = "10.1.0.0/16"
dst = "10.3.0.0/16"
action = "protect"
sa = "file-out"
"#;

/// The `ring` key, and the configuration file's SAs and policies next to the ring's.
#[test]
fn configuration_file_and_ring_coexist() {
    use espgw_dataplane::config;
    use std::path::Path;
    let c = config::parse_str(FILE_CONFIG, Path::new("t.toml")).unwrap();
    assert_eq!(
        c.dataplane.run.ring.as_deref(),
        Some(Path::new("/dev/shm/espgw.ring"))
    );
    let empty = FILE_CONFIG.replace("ring = \"/dev/shm/espgw.ring\"", "ring = \"\"");
    let err = config::parse_str(&empty, Path::new("t.toml")).unwrap_err();
    assert!(err.to_string().contains("ring is empty"), "{err}");
    let none = FILE_CONFIG.replace("ring = \"/dev/shm/espgw.ring\"", "");
    assert_eq!(
        config::parse_str(&none, Path::new("t.toml"))
            .unwrap()
            .dataplane
            .run
            .ring,
        None
    );

    let (db, _net) = config::instantiate(c, &SoftwareProvider, 1).unwrap();
    let file_out = db.id_by_name("file-out").unwrap();
    let shm = Shm::new("file");
    let mut applier = Applier::new(&shm.0, Arc::clone(&db), Arc::new(SoftwareProvider)).unwrap();
    let control = Segment::attach(&shm.0).unwrap();
    let mut tx = control.sender().unwrap();
    let mut rx = control.receiver().unwrap();
    let mut cmd = |rec: Record| {
        let seq = tx.try_push(&rec).unwrap();
        while applier.poll(1) > 0 {}
        let mut out = Vec::new();
        while let Some(x) = rx.try_pop().unwrap() {
            out.push(x.record.unwrap());
        }
        (seq, out)
    };
    // A ring policy may protect with the file's SA; it goes after the file's policies.
    let (s, rep) = cmd(protect(1, 1, 0, "file-out"));
    assert_applied(&rep, s);
    assert_eq!(
        spd_actions(&db),
        vec![Action::Protect(file_out), Action::Protect(file_out)]
    );
    // The file's SA name is taken.
    let (s, rep) = cmd(add(sa(Direction::Out, 0x9002, 1, "file-out", 0)));
    assert!(
        rejected_reason(&rep, s).contains("already installed"),
        "{rep:?}"
    );
    // Flushing everything leaves the file's SA and policy alone.
    let (s, rep) = cmd(Record::Flush {
        older_than: u64::MAX,
    });
    assert_applied(&rep, s);
    assert_eq!(db.id_by_name("file-out"), Some(file_out));
    assert_eq!(spd_actions(&db), vec![Action::Protect(file_out)]);
}

/// Impossible ring indices (something other than the ring protocol wrote the file): the
/// applier creates a new segment (new data-plane generation) and keeps its SAs; a control
/// process that reattaches finds them and resynchronises.
#[test]
fn a_corrupt_segment_is_recreated() {
    use std::os::unix::fs::FileExt;
    let mut r = rig("corrupt", RingParams::default());
    let (s, rep) = r.cmd(add(sa(Direction::In, 0x7001, 1, "keep", 0)));
    assert_applied(&rep, s);
    let old_generation = r._control.dp_generation();
    // The to-data-plane producer index (offset 256) far beyond anything the ring can hold.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&r._shm.0)
        .unwrap();
    f.write_at(&(1u64 << 40).to_ne_bytes(), 256).unwrap();
    drop(f);
    r.applier.poll(1);
    assert!(!r._control.is_current(), "the old segment was replaced");
    let control = Segment::attach(&r._shm.0).unwrap();
    assert_ne!(control.dp_generation(), old_generation);
    assert_eq!(r.db.len(), 1, "the SAs survive");
    let mut tx = control.sender().unwrap();
    let mut rx = control.receiver().unwrap();
    // Resync: re-push with a new generation (adopted), then flush the old ones.
    for rec in [
        Record::Resync { generation: 2 },
        add(sa(Direction::In, 0x7001, 2, "keep", 0)),
        Record::Flush { older_than: 2 },
    ] {
        tx.try_push(&rec).unwrap();
    }
    while r.applier.poll(2) > 0 {}
    let mut applied = 0;
    while let Some(x) = rx.try_pop().unwrap() {
        assert!(matches!(x.record, Ok(Record::Applied { .. })), "{x:?}");
        applied += 1;
    }
    assert_eq!(applied, 3);
    assert_eq!(r.db.len(), 1);
    assert!(r.applier.sa_id(&sref(Direction::In, 0x7001, 2)).is_some());
}

fn events_of(rep: &[Record]) -> Vec<Record> {
    rep.iter()
        .filter(|r| !matches!(r, Record::Applied { .. } | Record::Rejected { .. }))
        .cloned()
        .collect()
}

#[test]
fn update_moves_the_peer_in_place_and_keeps_state() {
    let mut r = rig("update", RingParams::default());
    let natt = |remote_port| {
        Some(UdpEncap {
            local_port: 4500,
            remote_port,
        })
    };
    let mut spec = sa(Direction::In, 0x8001, 1, "nat-in", 0);
    spec.encap = natt(4500);
    let (s, rep) = r.cmd(add(spec.clone()));
    assert_applied(&rep, s);
    let id = r.applier.sa_id(&sref(Direction::In, 0x8001, 1)).unwrap();
    // Traffic from the known mapping: the first packet is reported, the mapping is not news.
    {
        let g = crossbeam_epoch::pin();
        let sa = r.db.get(id, &g).unwrap();
        let run = RunCounts {
            packets: 3,
            bytes: 300,
            esp_bytes: 400,
        };
        sa.flush(&run, 10, &r.db.event_sink());
        sa.note_source(ip(REMOTE), 4500, 10, &r.db.event_sink());
        sa.flush(&run, 20, &r.db.event_sink());
    }
    let ev = events_of(&r.replies());
    assert_eq!(
        ev,
        [Record::FirstPacket {
            sa: sref(Direction::In, 0x8001, 1)
        }],
        "one FirstPacket, no NAT change"
    );
    // The peer's NAT moves it to another address and port: reported once per new mapping.
    {
        let g = crossbeam_epoch::pin();
        let sa = r.db.get(id, &g).unwrap();
        for _ in 0..3 {
            sa.note_source(ip("198.51.100.99"), 33333, 30, &r.db.event_sink());
        }
    }
    let ev = events_of(&r.replies());
    assert_eq!(
        ev,
        [Record::NatMappingChanged {
            sa: sref(Direction::In, 0x8001, 1),
            src: ip("198.51.100.99"),
            src_port: 33333,
        }]
    );
    // The control process follows it with an update: new peer, new limits, same SA.
    let (s, rep) = r.cmd(Record::UpdateSa(SaUpdate {
        sa: sref(Direction::In, 0x8001, 1),
        remote: ip("198.51.100.99"),
        encap: natt(33333),
        lifetime: Lifetimes {
            soft_packets: 5,
            hard_packets: 100,
            ..Lifetimes::default()
        },
    }));
    // 6 packets counted so far: the new soft limit is already crossed, and said so at once.
    assert!(rep.contains(&Record::Applied { seq: s }), "{rep:?}");
    assert_eq!(
        events_of(&rep),
        [Record::SoftExpired {
            sa: sref(Direction::In, 0x8001, 1),
            limit: Limit::Packets
        }]
    );
    {
        let g = crossbeam_epoch::pin();
        let sa = r.db.get(id, &g).expect("the same SA, updated in place");
        let peer = **sa.peer();
        assert_eq!(peer.remote, ip("198.51.100.99"));
        assert_eq!(peer.encap.map(|e| e.dport), Some(33333));
        assert_eq!(sa.lifetime().hard_packets, Some(100));
        assert_eq!(sa.snapshot().packets, 6, "counters kept");
        // The new mapping is now the peer's: no more reports.
        sa.note_source(ip("198.51.100.99"), 33333, 40, &r.db.event_sink());
    }
    assert!(events_of(&r.replies()).is_empty());
    // A resync re-push of the original record: adopted, and its (older) peer wins, as sent.
    spec.generation = 2;
    let (s, rep) = r.cmd(add(spec));
    assert_applied(&rep, s);
    assert_eq!(r.applier.sa_id(&sref(Direction::In, 0x8001, 2)), Some(id));
    let g = crossbeam_epoch::pin();
    let sa = r.db.get(id, &g).unwrap();
    assert_eq!(sa.peer().encap.map(|e| e.dport), Some(4500));
    assert_eq!(sa.snapshot().packets, 6);
}

#[test]
fn unknown_spi_idle_and_sequence_events_reach_the_control_side() {
    let mut r = rig("notices", RingParams::default());
    let mut spec = sa(Direction::Out, 0x8101, 1, "out", 0);
    spec.initial_seq = u64::from(u32::MAX) - 10;
    let (s, rep) = r.cmd(add(spec));
    assert_applied(&rep, s);
    let (s, rep) = r.cmd(add(sa(Direction::In, 0x8102, 1, "in", 0)));
    assert_applied(&rep, s);
    let id = r.applier.sa_id(&sref(Direction::Out, 0x8101, 1)).unwrap();
    {
        let g = crossbeam_epoch::pin();
        let out = r.db.get(id, &g).unwrap();
        assert_eq!(out.reserve_seq(2, 5, &r.db.event_sink()).1, 2);
    }
    // Idle after 30 s without packets, once.
    r.db.set_idle_seconds(30);
    r.db.sweep(29_000_000_000);
    r.db.sweep(31_000_000_000);
    r.db.sweep(40_000_000_000);
    // Unknown SPIs: reported with where they came from, at most 100 a second.
    for i in 0..50u64 {
        r.db.report_unknown_spi(UnknownSpi {
            at_ns: 50_000_000_000 + i * 1_000_000,
            spi: 0xdead,
            src: ip("192.0.2.9"),
            dst: ip(LOCAL),
            sport: 4500,
            dport: 4500,
        });
    }
    let ev = events_of(&r.replies());
    let out = sref(Direction::Out, 0x8101, 1);
    let inb = sref(Direction::In, 0x8102, 1);
    assert!(
        ev.contains(&Record::SeqNearExhaustion { sa: out }),
        "{ev:?}"
    );
    assert!(
        ev.contains(&Record::SoftExpired {
            sa: out,
            limit: Limit::SequenceNumber
        }),
        "{ev:?}"
    );
    let idle: Vec<_> = ev
        .iter()
        .filter(|e| matches!(e, Record::Idle { .. }))
        .collect();
    assert_eq!(
        idle,
        [
            &Record::Idle {
                sa: out,
                seconds: 30
            },
            &Record::Idle {
                sa: inb,
                seconds: 30
            }
        ],
        "{ev:?}"
    );
    let unknown: Vec<_> = ev
        .iter()
        .filter(|e| matches!(e, Record::UnknownSpi { .. }))
        .collect();
    // 50 packets over 49 ms: one report per 10 ms.
    assert_eq!(unknown.len(), 5, "{unknown:?}");
    assert_eq!(
        unknown[0],
        &Record::UnknownSpi {
            spi: 0xdead,
            src: ip("192.0.2.9"),
            dst: ip(LOCAL),
            src_port: 4500,
            dst_port: 4500
        }
    );
}

/// Policy `i` of the bulk tests: its own destination, so that it can be found in the SPD.
fn bulk_policy(i: u32, generation: u64, sa_name: &str) -> Record {
    Record::AddPolicy(Box::new(PolicySpec {
        policy_id: 1000 + i,
        generation,
        direction: Direction::Out,
        priority: 100,
        selector: bulk_selector(i),
        action: PolicyAction::Protect {
            sa_name: sa_name.into(),
        },
    }))
}

fn bulk_selector(i: u32) -> Selector {
    let dst = std::net::Ipv4Addr::from_bits(0x0A80_0000 + i);
    Selector {
        src: IpPrefix {
            addr: ip("10.1.0.1"),
            len: 32,
        },
        dst: IpPrefix {
            addr: IpAddr::V4(dst),
            len: 32,
        },
        protocol: 0,
        src_ports: PortRange::ANY,
        dst_ports: PortRange::ANY,
    }
}

/// Does the published SPD hold policy `i` of the bulk tests?
fn spd_has_bulk(db: &SaDb, i: u32) -> bool {
    let want = std::net::Ipv4Addr::from_bits(0x0A80_0000 + i);
    let guard = crossbeam_epoch::pin();
    db.spd(&guard).is_some_and(|s| {
        s.policies()
            .iter()
            .any(|p| p.selector.dst.addr() == IpAddr::V4(want) && p.selector.dst.prefix_len() == 32)
    })
}

#[test]
fn a_bulk_policy_push_publishes_one_spd_per_poll() {
    let mut r = rig("bulk", RingParams::default());
    let (s, rep) = r.cmd(add(sa(Direction::Out, 0x2001, 10, "out-1", 0)));
    assert_applied(&rep, s);
    let out_id = r.db.id_by_name("out-1").unwrap();
    let before = r.applier.spd_swaps();
    // More than one poll's worth, all queued before the data plane looks.
    let n = espgw_dataplane::ringapply::MAX_RECORDS_PER_POLL as u32 + 44;
    let seqs: Vec<u64> = (0..n)
        .map(|i| r.push(bulk_policy(i, 10, "out-1")))
        .collect();
    assert_eq!(r.applier.poll(1), n as usize - 44);
    assert_eq!(
        r.applier.spd_swaps(),
        before + 1,
        "one SPD for the first poll"
    );
    assert_eq!(r.applier.poll(1), 44);
    assert_eq!(r.applier.spd_swaps(), before + 2, "and one for the second");
    let mut applied = Vec::new();
    while let Some(x) = r.rx.try_pop().unwrap() {
        match x.record.unwrap() {
            Record::Applied { seq } => applied.push(seq),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(applied, seqs);
    let actions = spd_actions(&r.db);
    assert_eq!(actions.len(), n as usize);
    assert!(actions.iter().all(|a| *a == Action::Protect(out_id)));
    assert!((0..n).all(|i| spd_has_bulk(&r.db, i)));
}

#[test]
fn make_before_break_and_policy_removal_within_one_poll() {
    let mut r = rig("mbb-poll", RingParams::default());
    let (s, rep) = r.cmd(add(sa(Direction::Out, 0x2001, 10, "out-old", 0)));
    assert_applied(&rep, s);
    let (s, rep) = r.cmd(protect(1, 10, 100, "out-old"));
    assert_applied(&rep, s);
    let before = r.applier.spd_swaps();
    // A rekey in one poll: the new SA, the policy moved to it, the old SA deleted. The SPD
    // must point to the new SA before the old one leaves the database.
    r.push(add(sa(Direction::Out, 0x2002, 11, "out-new", 1)));
    r.push(protect(1, 11, 100, "out-new"));
    r.push(Record::DeleteSa(sref(Direction::Out, 0x2001, 10)));
    let rep = r.replies();
    assert_eq!(rep.len(), 3);
    assert!(
        rep.iter().all(|x| matches!(x, Record::Applied { .. })),
        "{rep:?}"
    );
    let new_id = r.db.id_by_name("out-new").unwrap();
    assert_eq!(r.db.id_by_name("out-old"), None);
    assert_eq!(spd_actions(&r.db), vec![Action::Protect(new_id)]);
    // Published once, when the old SA left (nothing was pending at the end of the poll).
    assert_eq!(r.applier.spd_swaps(), before + 1);

    // A policy deleted and its SA deleted in one poll: the SPD that names the SA is replaced
    // before the SA goes, although no remaining policy protects with it.
    let before = r.applier.spd_swaps();
    r.push(Record::DeletePolicy {
        policy_id: 1,
        generation: 11,
    });
    r.push(Record::DeleteSa(sref(Direction::Out, 0x2002, 11)));
    let rep = r.replies();
    assert_eq!(rep.len(), 2);
    assert!(spd_actions(&r.db).is_empty());
    assert_eq!(r.db.len(), 0);
    assert_eq!(r.applier.spd_swaps(), before + 1);
}

/// With the data plane polling in its own thread, every `Applied` for a policy the control side
/// reads is already in the published SPD. (A race: an applier that answered before publishing
/// fails this in most runs, not in every one; a correct one never does.)
#[test]
fn an_applied_policy_is_in_effect_when_its_answer_is_read() {
    let shm = Shm::new("in-effect");
    let db = Arc::new(SaDb::new(1024));
    let mut applier = Applier::with_params(
        &shm.0,
        RingParams::default(),
        Arc::clone(&db),
        Arc::new(SoftwareProvider),
    )
    .expect("applier");
    let control = Segment::attach(&shm.0).expect("attach");
    let mut tx = control.sender().expect("sender");
    let mut rx = control.receiver().expect("receiver");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                if applier.poll(1) == 0 {
                    std::thread::yield_now();
                }
            }
        })
    };
    let mut pending: HashMap<u64, u32> = HashMap::new();
    let seq = tx
        .try_push(&add(sa(Direction::Out, 0x2001, 10, "out-1", 0)))
        .unwrap();
    let n = 2000u32;
    let mut pushed = 0u32;
    let mut answered = 0u32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut sa_applied = false;
    while answered < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{answered} of {n} answered"
        );
        if sa_applied && pushed < n {
            match tx.try_push(&bulk_policy(pushed, 10, "out-1")) {
                Ok(s) => {
                    pending.insert(s, pushed);
                    pushed += 1;
                }
                Err(espgw_ring::PushError::Full) => {}
                Err(e) => panic!("push: {e}"),
            }
        }
        while let Some(x) = rx.try_pop().unwrap() {
            match x.record.unwrap() {
                Record::Applied { seq: s } if s == seq => sa_applied = true,
                Record::Applied { seq: s } => {
                    let i = pending.remove(&s).expect("an answer to a pushed policy");
                    assert!(
                        spd_has_bulk(&db, i),
                        "policy {i} answered before it is in effect"
                    );
                    answered += 1;
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    poller.join().unwrap();
}
