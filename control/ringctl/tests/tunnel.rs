//! Make-before-break rekeying between two in-process data planes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use espgw_dataplane::policy::Action;
use espgw_ring::Direction;
use espgw_ringctl::{Client, ClientOptions, Endpoint, Health, Side, Tunnel, TunnelConfig};
use std::collections::HashSet;
use std::time::{Duration, Instant};

struct Rig {
    a: Client,
    b: Client,
    dp_a: Dp,
    dp_b: Dp,
    _shm: (ShmPath, ShmPath),
}

fn rig() -> Rig {
    let (sa_, sb) = (ShmPath::new(), ShmPath::new());
    let dp_a = Dp::start(sa_.path());
    let dp_b = Dp::start(sb.path());
    let a = Client::attach(sa_.path(), ClientOptions::default()).unwrap();
    let b = Client::attach(sb.path(), ClientOptions::default()).unwrap();
    Rig {
        a,
        b,
        dp_a,
        dp_b,
        _shm: (sa_, sb),
    }
}

fn config(drain: Duration) -> TunnelConfig {
    let mut c = TunnelConfig::new(
        "t1",
        Endpoint {
            addr: ip("203.0.113.1"),
            net: prefix("10.1.0.0", 16),
        },
        Endpoint {
            addr: ip("198.51.100.7"),
            net: prefix("10.2.0.0", 16),
        },
    );
    c.drain = drain;
    c
}

/// Exactly the tunnel's current SAs on both data planes, the SPD protecting with the newest
/// outbound SA, and matching SPIs and keys across the pair.
fn check_steady(r: &Rig, t: &Tunnel, n: u64) {
    let cur = t.current();
    assert_eq!(cur.a_in, format!("t1-a-in-{n}"));
    assert_eq!(cur.a_out, format!("t1-a-out-{n}"));
    assert_eq!(cur.b_in, format!("t1-b-in-{n}"));
    assert_eq!(cur.b_out, format!("t1-b-out-{n}"));
    let mut want_a = vec![cur.a_in.clone(), cur.a_out.clone()];
    want_a.sort();
    let mut want_b = vec![cur.b_in.clone(), cur.b_out.clone()];
    want_b.sort();
    assert_eq!(r.dp_a.names(), want_a);
    assert_eq!(r.dp_b.names(), want_b);
    assert_eq!(
        r.dp_a.spd(),
        [Action::Protect(r.dp_a.id(&cur.a_out).unwrap())]
    );
    assert_eq!(
        r.dp_b.spd(),
        [Action::Protect(r.dp_b.id(&cur.b_out).unwrap())]
    );
    // A → B: A's outbound and B's inbound share SPI and keys; likewise B → A.
    for (out, inn) in [
        (r.a.sa(&cur.a_out).unwrap(), r.b.sa(&cur.b_in).unwrap()),
        (r.b.sa(&cur.b_out).unwrap(), r.a.sa(&cur.a_in).unwrap()),
    ] {
        assert_eq!(out.spi, inn.spi);
        assert_eq!(out.enc_key, inn.enc_key);
        assert_eq!(out.salt, inn.salt);
        assert_eq!(out.local, inn.remote);
        assert_eq!(out.direction, Direction::Out);
        assert_eq!(inn.direction, Direction::In);
        assert!(out.spi >= 256);
    }
    assert_eq!(r.dp_a.sas()[&cur.a_out].2, r.dp_b.sas()[&cur.b_in].2);
    // The clients' desired state is the data planes' state.
    let names = |c: &Client| {
        let mut v: Vec<String> = c.sas().map(|s| s.name.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&r.a), r.dp_a.names());
    assert_eq!(names(&r.b), r.dp_b.names());
}

#[test]
fn establish_then_rekeys_leave_exactly_the_newest_sas() {
    let mut r = rig();
    let mut t = Tunnel::new(config(Duration::from_millis(150))).unwrap();
    let est = t.establish(&mut r.a, &mut r.b).unwrap();
    assert_eq!(est.a_out, "t1-a-out-0");
    check_steady(&r, &t, 0);

    let mut spis = HashSet::new();
    spis.insert(est.spi_ab.clone());
    spis.insert(est.spi_ba.clone());
    for n in 1..=4u64 {
        let rep = t.rekey(&mut r.a, &mut r.b).unwrap();
        assert_eq!(rep.rekey, n);
        assert_ne!(rep.old.spi_ab, rep.new.spi_ab);
        assert!(spis.insert(rep.new.spi_ab.clone()), "SPI reused");
        assert!(spis.insert(rep.new.spi_ba.clone()), "SPI reused");
        // Right after the rekey the old inbound SAs are still there (draining) ...
        let mut draining = rep.draining.clone();
        draining.sort();
        assert_eq!(
            draining,
            [format!("t1-a-in-{}", n - 1), format!("t1-b-in-{}", n - 1)]
        );
        assert!(r.dp_a.names().contains(&format!("t1-a-in-{}", n - 1)));
        assert!(!r.dp_a.names().contains(&format!("t1-a-out-{}", n - 1)));
        assert_eq!(
            r.dp_a.spd(),
            [Action::Protect(r.dp_a.id(&rep.new.a_out).unwrap())]
        );
        if n % 2 == 1 {
            // ... and go once the drain delay has passed (poll) ...
            assert!(
                t.poll(&mut r.a, &mut r.b, Instant::now())
                    .unwrap()
                    .is_empty()
            );
            std::thread::sleep(Duration::from_millis(200));
            let done = t.poll(&mut r.a, &mut r.b, Instant::now()).unwrap();
            assert_eq!(done.len(), 2);
        } else {
            // ... or at once when asked.
            assert_eq!(t.finish_drain(&mut r.a, &mut r.b).unwrap(), 2);
        }
        check_steady(&r, &t, n);
        assert!(rep.inbound_ms >= 0.0 && rep.switch_ms >= 0.0);
    }
    // A rekey cuts the previous drain short.
    t.rekey(&mut r.a, &mut r.b).unwrap();
    let rep = t.rekey(&mut r.a, &mut r.b).unwrap();
    assert_eq!(rep.drained_early, 2);
    t.finish_drain(&mut r.a, &mut r.b).unwrap();
    check_steady(&r, &t, 6);

    t.teardown(&mut r.a, &mut r.b).unwrap();
    assert!(r.dp_a.names().is_empty() && r.dp_b.names().is_empty());
    assert!(r.dp_a.spd().is_empty());
}

#[test]
fn encapsulation_and_cbc_transforms() {
    let mut r = rig();
    let mut cfg = config(Duration::ZERO);
    cfg.enc_alg = espgw_ring::EncAlg::Aes256Cbc;
    cfg.integ_alg = espgw_ring::IntegAlg::HmacSha2_256_128;
    cfg.encap = Some(espgw_ring::UdpEncap {
        local_port: 4500,
        remote_port: 4501,
    });
    let mut t = Tunnel::new(cfg).unwrap();
    t.establish(&mut r.a, &mut r.b).unwrap();
    t.rekey(&mut r.a, &mut r.b).unwrap();
    t.finish_drain(&mut r.a, &mut r.b).unwrap();
    check_steady(&r, &t, 1);
    let cur = t.current();
    let a_out = r.a.sa(&cur.a_out).unwrap();
    let b_in = r.b.sa(&cur.b_in).unwrap();
    assert_eq!(a_out.encap.unwrap().local_port, 4500);
    assert_eq!(b_in.encap.unwrap().local_port, 4501);
    assert_eq!(a_out.integ_key, b_in.integ_key);
    assert_eq!(a_out.integ_key.len(), 32);
}

#[test]
fn a_rejected_rekey_leaves_the_tunnel_working() {
    let mut r = rig();
    let mut t = Tunnel::new(config(Duration::ZERO)).unwrap();
    t.establish(&mut r.a, &mut r.b).unwrap();
    // Occupy the name the next rekey wants on B: its new inbound SA is rejected.
    r.b.add_sa(sa(Direction::In, 0x777, "t1-b-in-1")).unwrap();
    let e = t.rekey(&mut r.a, &mut r.b).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("side b") && msg.contains("t1-b-in-1"), "{msg}");
    // A's new inbound SA was taken away again; the tunnel is as before.
    r.b.delete_sa_named("t1-b-in-1").unwrap();
    let cur = t.current();
    assert_eq!(cur.a_out, "t1-a-out-0");
    let mut want = vec!["t1-a-in-0".to_string(), "t1-a-out-0".to_string()];
    want.sort();
    assert_eq!(r.dp_a.names(), want);
    let long = TunnelConfig::new("much-too-long-name", t.config().a, t.config().b);
    assert!(Tunnel::new(long).is_err());
    assert_eq!(t.draining(), Vec::<(Side, String)>::new());
}

#[test]
fn tunnel_survives_a_data_plane_restart() {
    let mut r = rig();
    let mut t = Tunnel::new(config(Duration::ZERO)).unwrap();
    t.establish(&mut r.a, &mut r.b).unwrap();
    t.rekey(&mut r.a, &mut r.b).unwrap();
    t.finish_drain(&mut r.a, &mut r.b).unwrap();

    // B's data plane restarts (new segment, empty SA database).
    let path_b = r._shm.1.path().to_path_buf();
    r.dp_b.restart(&path_b);
    assert!(r.dp_b.names().is_empty());
    match r.b.ensure_current().unwrap() {
        Health::Resynced(rep) => assert_eq!((rep.sas, rep.policies), (2, 1)),
        other => panic!("expected a resync, got {other:?}"),
    }
    check_steady(&r, &t, 1);
    // And rekeying goes on.
    t.rekey(&mut r.a, &mut r.b).unwrap();
    t.finish_drain(&mut r.a, &mut r.b).unwrap();
    check_steady(&r, &t, 2);
}
