//! Test helpers: unique segment paths under /dev/shm (removed afterwards) and an in-process
//! data plane (the real applier polling in a thread over a real SA database).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use espgw_crypto::SoftwareProvider;
use espgw_dataplane::policy::Action;
use espgw_dataplane::ringapply::Applier;
use espgw_dataplane::sa::SaId;
use espgw_dataplane::sadb::SaDb;
use espgw_ring::{
    DfMode, Direction, DscpMode, EcnMode, EncAlg, IntegAlg, IpPrefix, Key, Lifetimes, Mode,
    PolicyAction, PolicySpec, PortRange, SaSpec, Selector,
};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `/dev/shm/espgw-ringctl-test-<pid>-<n>`, removed when dropped.
pub struct ShmPath(pub PathBuf);

impl ShmPath {
    pub fn new() -> ShmPath {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        ShmPath(PathBuf::from(format!(
            "/dev/shm/espgw-ringctl-test-{}-{n}",
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

/// The data plane: an applier polling in a thread. Dropping it (or `stop`) drops the applier,
/// which removes the segment file like a data plane's clean exit.
pub struct Dp {
    pub db: Arc<SaDb>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dp {
    pub fn start(path: &Path) -> Dp {
        Self::start_with(path, Arc::new(SaDb::new(8192)), false)
    }

    /// `sweep`: also age the SAs (lifetime events), as the data plane's main thread does.
    pub fn start_with(path: &Path, db: Arc<SaDb>, sweep: bool) -> Dp {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let path = path.to_path_buf();
        let thread = {
            let db = Arc::clone(&db);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut applier =
                    Applier::new(&path, Arc::clone(&db), Arc::new(SoftwareProvider)).unwrap();
                tx.send(()).unwrap();
                let base = Instant::now();
                let mut last_sweep = base;
                while !stop.load(Ordering::Relaxed) {
                    let now_ns = base.elapsed().as_nanos() as u64 + 1;
                    if sweep && last_sweep.elapsed() > Duration::from_millis(50) {
                        db.sweep(now_ns);
                        last_sweep = Instant::now();
                    }
                    if applier.poll(now_ns) == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        };
        rx.recv().unwrap();
        Dp {
            db,
            stop,
            thread: Some(thread),
        }
    }

    /// A data-plane restart: the applier goes (removing its segment), a new one with an
    /// empty SA database creates a new segment at `path`.
    pub fn restart(&mut self, path: &Path) {
        self.halt();
        *self = Dp::start(path);
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// name → (id, direction, spi) of every SA in the database.
    pub fn sas(&self) -> BTreeMap<String, (SaId, Direction, u32)> {
        let guard = crossbeam_epoch::pin();
        self.db
            .iter(&guard)
            .map(|s| {
                let d = match s.direction {
                    espgw_dataplane::sa::Direction::In => Direction::In,
                    espgw_dataplane::sa::Direction::Out => Direction::Out,
                };
                (s.name.clone(), (s.id, d, s.spi))
            })
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.sas().into_keys().collect()
    }

    /// The SPD's actions, in order.
    pub fn spd(&self) -> Vec<Action> {
        let guard = crossbeam_epoch::pin();
        self.db
            .spd(&guard)
            .map(|s| s.policies().iter().map(|p| p.action).collect())
            .unwrap_or_default()
    }

    pub fn id(&self, name: &str) -> Option<SaId> {
        self.sas().get(name).map(|x| x.0)
    }

    /// The last outbound sequence number of an SA.
    pub fn last_seq(&self, name: &str) -> Option<u64> {
        let guard = crossbeam_epoch::pin();
        let id = self.id(name)?;
        self.db.get(id, &guard).map(|s| s.last_seq())
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        self.halt();
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn prefix(s: &str, len: u8) -> IpPrefix {
    IpPrefix { addr: ip(s), len }
}

pub fn selector(src: &str, dst: &str) -> Selector {
    Selector {
        src: prefix(src, 16),
        dst: prefix(dst, 16),
        protocol: 0,
        src_ports: PortRange::ANY,
        dst_ports: PortRange::ANY,
    }
}

/// An AES-128-GCM tunnel SA between 203.0.113.1 and 198.51.100.7.
pub fn sa(direction: Direction, spi: u32, name: &str) -> SaSpec {
    let key: Vec<u8> = (0..16u8).map(|i| i ^ (spi as u8)).collect();
    SaSpec {
        generation: 0,
        spi,
        direction,
        mode: Mode::Tunnel,
        reqid: 1,
        name: name.into(),
        local: ip("203.0.113.1"),
        remote: ip("198.51.100.7"),
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
        selectors: vec![selector("10.2.0.0", "10.1.0.0")],
        df: DfMode::Copy,
        dscp: DscpMode::Copy,
        ecn: EcnMode::Normal,
        outer_ttl: 64,
    }
}

pub fn protect(policy_id: u32, sa_name: &str) -> PolicySpec {
    PolicySpec {
        policy_id,
        generation: 0,
        direction: Direction::Out,
        priority: 10,
        selector: selector("10.1.0.0", "10.2.0.0"),
        action: PolicyAction::Protect {
            sa_name: sa_name.into(),
        },
    }
}
