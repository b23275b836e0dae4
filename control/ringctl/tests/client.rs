//! The client against the real data-plane applier in-process: blocking commands, rejections,
//! events, the pipelined path, resync after a control restart and after a data-plane restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use espgw_dataplane::policy::Action;
use espgw_ring::{Direction, Lifetimes, Record, SegmentError};
use espgw_ringctl::{Client, ClientError, ClientOptions, Event, Health};
use std::time::{Duration, Instant};

fn opts() -> ClientOptions {
    ClientOptions {
        attach_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

#[test]
fn add_delete_policy_and_counters() {
    let shm = ShmPath::new();
    let dp = Dp::start(shm.path());
    let mut c = Client::attach(shm.path(), opts()).unwrap();
    let r_in = c.add_sa(sa(Direction::In, 0x1001, "in-1")).unwrap();
    let r_out = c.add_sa(sa(Direction::Out, 0x2001, "out-1")).unwrap();
    assert!(r_out.generation > r_in.generation, "generations increase");
    let g = c.add_policy(protect(7, "out-1")).unwrap();
    assert!(g > r_out.generation);
    assert_eq!(dp.names(), ["in-1", "out-1"]);
    assert_eq!(dp.spd(), [Action::Protect(dp.id("out-1").unwrap())]);
    assert_eq!(c.sas().count(), 2);
    assert_eq!(c.policy(7).unwrap().generation, g);
    assert!(c.spi_in_use(0x1001) && c.spi_in_use(0x2001) && !c.spi_in_use(0x3001));

    let all = c.query_counters(None).unwrap();
    assert_eq!(all.len(), 2);
    let one = c.query_counters(Some(&r_in)).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].sa, r_in);

    c.delete_policy(7).unwrap();
    assert!(dp.spd().is_empty());
    c.delete_sa(&r_in).unwrap();
    c.delete_sa_named("out-1").unwrap();
    assert!(dp.names().is_empty());
    assert_eq!(c.sas().count(), 0);
    assert!(c.policy(7).is_none());
}

#[test]
fn rejections_carry_the_reason() {
    let shm = ShmPath::new();
    let dp = Dp::start(shm.path());
    let mut c = Client::attach(shm.path(), opts()).unwrap();
    c.add_sa(sa(Direction::In, 0x1001, "in-1")).unwrap();

    // Same name: the SA database refuses it.
    match c.add_sa(sa(Direction::In, 0x1002, "in-1")) {
        Err(ClientError::Rejected { reason, what, .. }) => {
            assert!(reason.contains("in-1"), "{reason}");
            assert!(what.contains("AddSa"), "{what}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // A protect policy naming no installed outbound SA.
    let e = c.add_policy(protect(1, "nope")).unwrap_err();
    assert!(
        e.to_string().contains("no outbound SA named \"nope\""),
        "{e}"
    );
    // Nothing rejected entered the desired state.
    assert_eq!(c.sas().count(), 1);
    assert!(c.policy(1).is_none());

    // Not encodable: the client says so before anything reaches the ring.
    let e = c.add_sa(sa(Direction::In, 17, "low")).unwrap_err();
    assert!(matches!(e, ClientError::Push { .. }), "{e}");
    assert!(e.to_string().contains("reserved"), "{e}");

    // UpdateSa: the data plane changes the SA in place; the desired state follows.
    let r = c.sa("in-1").unwrap().sa_ref();
    let lifetime = Lifetimes {
        hard_seconds: 100,
        soft_seconds: 90,
        ..Lifetimes::default()
    };
    c.update_sa_named("in-1", ip("198.51.100.8"), None, lifetime)
        .unwrap();
    assert_eq!(c.sa("in-1").unwrap().remote, ip("198.51.100.8"));
    assert_eq!(c.sa("in-1").unwrap().lifetime, lifetime);
    // One the data plane refuses (another address family) leaves the desired state alone.
    match c.update_sa_named("in-1", ip("2001:db8::8"), None, lifetime) {
        Err(ClientError::Rejected { reason, .. }) => {
            assert!(reason.contains("address family"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.sa("in-1").unwrap().remote, ip("198.51.100.8"));
    assert_eq!(c.sa("in-1").unwrap().sa_ref(), r);

    // Unknown names and refs are the caller's mistake.
    assert!(matches!(
        c.delete_sa_named("missing"),
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(c.delete_policy(99), Err(ClientError::Invalid(_))));
    drop(dp);
}

#[test]
fn events_arrive_while_commands_wait() {
    let shm = ShmPath::new();
    let db = std::sync::Arc::new(espgw_dataplane::sadb::SaDb::new(64));
    let _dp = Dp::start_with(shm.path(), db, true);
    let mut c = Client::attach(shm.path(), opts()).unwrap();
    let mut spec = sa(Direction::Out, 0x3001, "short");
    spec.lifetime = Lifetimes {
        soft_seconds: 1,
        hard_seconds: 2,
        ..Lifetimes::default()
    };
    let r = c.add_sa(spec).unwrap();
    // Commands keep working while the events come; they are queued, not lost.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut seen = Vec::new();
    while Instant::now() < deadline && seen.len() < 2 {
        c.query_counters(None).unwrap();
        while let Some(e) = c.next_event(Duration::from_millis(100)).unwrap() {
            seen.push(e);
        }
    }
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Record(Record::SoftExpired { sa, .. }) if *sa == r)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Record(Record::HardExpired { sa, .. }) if *sa == r)),
        "{seen:?}"
    );
    let line = espgw_ringctl::json::event(&seen[0], Some("short")).to_string();
    assert!(line.contains("\"name\":\"short\""), "{line}");
    assert!(c.drain_events().unwrap().is_empty());
}

#[test]
fn pipelined_bulk_install_and_delete() {
    let shm = ShmPath::new();
    let dp = Dp::start(shm.path());
    let mut c = Client::attach(shm.path(), opts()).unwrap();
    let n = 3000u32;
    let mut specs: Vec<_> = (0..n)
        .map(|i| sa(Direction::In, 0x10000 + i, &format!("bulk-{i}")))
        .collect();
    // Two duplicates: rejected, counted, listed.
    specs.push(sa(Direction::In, 0x900, "bulk-0"));
    specs.push(sa(Direction::In, 0x10001, "other"));
    let r = c.add_sas_pipelined(specs, 256).unwrap();
    assert_eq!((r.pushed, r.applied, r.rejected), (3002, 3000, 2), "{r:?}");
    assert_eq!(r.rejections.len(), 2);
    assert_eq!(dp.sas().len(), 3000);
    assert_eq!(c.sas().count(), 3000);

    let names: Vec<String> = c.sas().map(|s| s.name.clone()).collect();
    let d = c
        .delete_sas_pipelined(names.iter().map(String::as_str), 4096)
        .unwrap();
    assert_eq!((d.applied, d.rejected), (3000, 0));
    assert!(dp.sas().is_empty());
    assert_eq!(c.sas().count(), 0);
}

#[test]
fn attach_waits_for_the_data_plane_and_refuses_a_second_control() {
    let shm = ShmPath::new();
    let path = shm.path().to_path_buf();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        Dp::start(&path)
    });
    let c = Client::attach(shm.path(), opts()).unwrap();
    let dp = starter.join().unwrap();
    match Client::attach(shm.path(), opts()) {
        Err(ClientError::Attach(SegmentError::Busy { .. })) => {}
        other => panic!("expected Busy, got {other:?}"),
    }
    drop(c);
    drop(dp);
    // No data plane at all: a timeout that says so.
    let shm2 = ShmPath::new();
    let e = Client::attach(
        shm2.path(),
        ClientOptions {
            attach_timeout: Duration::from_millis(100),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(matches!(e, ClientError::AttachTimeout { .. }), "{e}");
}

#[test]
fn control_restart_adopts_what_is_repushed_and_flushes_the_rest() {
    let shm = ShmPath::new();
    let dp = Dp::start(shm.path());
    let (keep, policies) = {
        let mut c = Client::attach(shm.path(), opts()).unwrap();
        c.add_sa(sa(Direction::In, 0x1001, "in-1")).unwrap();
        c.add_sa(sa(Direction::Out, 0x2001, "out-1")).unwrap();
        c.add_sa(sa(Direction::Out, 0x2002, "out-2")).unwrap();
        c.add_policy(protect(1, "out-1")).unwrap();
        c.add_policy(protect(2, "out-2")).unwrap();
        let keep: Vec<_> = c.sas().filter(|s| s.name != "out-2").cloned().collect();
        let policies: Vec<_> = c.policies().filter(|p| p.policy_id == 1).cloned().collect();
        (keep, policies)
        // the control process "dies" here
    };
    let before = dp.sas();
    let old_gens: Vec<u64> = keep.iter().map(|s| s.generation).collect();

    let (c, report) = Client::attach_with_state(shm.path(), opts(), keep, policies).unwrap();
    assert_eq!((report.sas, report.policies, report.rejected), (2, 1, 0));
    let after = dp.sas();
    assert_eq!(after.keys().collect::<Vec<_>>(), ["in-1", "out-1"]);
    // Adopted: the same SA database entries (counters and replay state kept).
    assert_eq!(after["in-1"].0, before["in-1"].0);
    assert_eq!(after["out-1"].0, before["out-1"].0);
    // The SPD: policy 1 protects with out-1, policy 2 is gone.
    assert_eq!(dp.spd(), [Action::Protect(after["out-1"].0)]);
    // New generations ≥ G, and the old refs still resolve.
    for s in c.sas() {
        assert!(s.generation >= report.generation);
    }
    for (s, g) in c.sas().zip(&old_gens) {
        let mut old = s.sa_ref();
        old.generation = *g;
        assert_eq!(
            c.resolve(&old).map(|x| x.name.as_str()),
            Some(s.name.as_str())
        );
    }
    assert!(c.policy(1).unwrap().generation >= report.generation);
}

#[test]
fn ensure_current_repushes_everything_into_a_restarted_data_plane() {
    let shm = ShmPath::new();
    let dp = Dp::start(shm.path());
    let mut c = Client::attach(shm.path(), opts()).unwrap();
    c.add_sa(sa(Direction::In, 0x1001, "in-1")).unwrap();
    c.add_sa(sa(Direction::Out, 0x2001, "out-1")).unwrap();
    c.add_policy(protect(1, "out-1")).unwrap();
    assert_eq!(c.ensure_current().unwrap(), Health::Current);
    let old_dp_gen = c.dp_generation();

    dp.stop(); // clean exit: the segment file is removed
    assert!(matches!(c.ensure_current().unwrap(), Health::Waiting(_)));
    // A command now fails plainly instead of hanging.
    let e = c.add_sa(sa(Direction::In, 0x1002, "in-2")).unwrap_err();
    assert!(matches!(e, ClientError::DataPlaneGone { .. }), "{e}");

    let dp2 = Dp::start(shm.path());
    let Health::Resynced(report) = c.ensure_current().unwrap() else {
        panic!("expected a resync");
    };
    assert_ne!(c.dp_generation(), old_dp_gen);
    assert_eq!(report.dp_generation, c.dp_generation());
    assert_eq!((report.sas, report.policies, report.rejected), (2, 1, 0));
    assert_eq!(dp2.names(), ["in-1", "out-1"]);
    assert_eq!(dp2.spd(), [Action::Protect(dp2.id("out-1").unwrap())]);
    // The outbound SA does not start again at sequence number 0 with the same key.
    assert!(dp2.last_seq("out-1").unwrap() >= c.options().restart_seq_skip);
    assert_eq!(c.ensure_current().unwrap(), Health::Current);
    // And the client works on the new data plane.
    c.add_sa(sa(Direction::In, 0x1003, "in-3")).unwrap();
    assert_eq!(dp2.names(), ["in-1", "in-3", "out-1"]);
}

#[test]
fn a_killed_data_plane_is_reported_down() {
    // The applier is dropped without removing the file: what `kill -9` leaves behind.
    let shm = ShmPath::new();
    let dp = Dp::start(shm.path());
    let mut c = Client::attach(shm.path(), opts()).unwrap();
    c.add_sa(sa(Direction::In, 0x1001, "in-1")).unwrap();
    // Keep a copy of the file, put it back after the data plane removed it: same inode
    // semantics are not needed, only a segment nobody holds.
    let copy = ShmPath::new();
    std::fs::copy(shm.path(), copy.path()).unwrap();
    dp.stop();
    std::fs::rename(copy.path(), shm.path()).unwrap();
    // A different file: the client sees a new segment whose data plane is not alive; it
    // attaches, and the resync's commands find nobody to answer them.
    let e = c.ensure_current().unwrap_err();
    assert!(matches!(e, ClientError::DataPlaneGone { .. }), "{e}");
    assert_eq!(c.ensure_current().unwrap(), Health::DataPlaneDown);
}
