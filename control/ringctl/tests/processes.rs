//! The control side and the data plane as two real processes, each killed with SIGKILL
//! mid-stream, with the data plane's SA table checked against a model of the desired state.
//!
//! The test binary re-executes itself (the `child` test, with `ESPGW_RINGCTL_PROC_CHILD`
//! selecting the role), as in `control/ring/tests/processes.rs`:
//!
//! * `dp PATH`: the real applier (`espgw_dataplane::ringapply::Applier`) over a real `SaDb`,
//!   polling in a loop; on `dump` (stdin) it prints `dump {json}`: every SA as the data plane
//!   sees it (name, direction, SPI, peer address and UDP ports, lifetimes) sorted by name, and
//!   the SPD's policies in order (selector, action; a protected SA by its name).
//! * `control PATH`: an `espgw_ringctl::Client`. `attach` attaches; `sa HEX` / `policy HEX`
//!   lines then `restore` attach with that state (`attach_with_state`: restore + resync).
//!   Then one command per line (`N add HEX`, `N upd NAME HEX`, `N del NAME`, `N pol HEX`,
//!   `N delpol ID`), answered `ok N` or `err N reason`; between commands it calls
//!   `ensure_current` every 20 ms and prints `resynced {report}` when it re-pushed the desired
//!   state into a restarted data plane. A command whose data plane died under it
//!   (`DataPlaneGone`) is carried on the way an IKE daemon would: wait for the new data plane
//!   and the resync, then retry unless the desired state already shows the command's effect.
//! * `raw PATH`: pushes malformed records with `Producer::try_push_raw`, prints the
//!   `Rejected` answers, then continues as `control` (attached).
//!
//! SA specs and policies travel between the processes in espgw-ring's own record encoding,
//! hex-encoded (test keys only).
//!
//! The main test (`kill_9_either_side_…`) runs ~300 seeded random commands (seed printed;
//! replay with `ESPGW_RINGCTL_PROC_SEED`) with 5 kills of the control child (a command in
//! flight; the new child restores the whole model) and 6 of the data plane (3 between commands,
//! 3 with a command in flight, half of those frozen with SIGSTOP first so the command surely
//! was not applied); after each recovery, every 50 commands and at the end, the data plane's
//! dump must equal the model. Segments: `/dev/shm/espgw-ringctl-proc-<pid>-<n>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use espgw_crypto::SoftwareProvider;
use espgw_dataplane::policy::Action;
use espgw_dataplane::ringapply::Applier;
use espgw_dataplane::sadb::SaDb;
use espgw_ring::record::MAX_ENCODED_LEN;
use espgw_ring::{
    DfMode, Direction, DscpMode, EcnMode, EncAlg, IntegAlg, IpPrefix, Key, Lifetimes, Mode,
    PolicyAction, PolicySpec, PortRange, Received, Record, SaSpec, SaUpdate, Segment, Selector,
    UdpEncap,
};
use espgw_ringctl::{Client, ClientError, ClientOptions, Health, ResyncReport};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ROLE: &str = "ESPGW_RINGCTL_PROC_CHILD";
/// Replays a run of the randomized test.
const SEED_VAR: &str = "ESPGW_RINGCTL_PROC_SEED";
/// How long the data plane's table may take to match the model after a recovery.
const CONVERGE: Duration = Duration::from_secs(10);
/// How long a child may take to answer anything.
const ANSWER: Duration = Duration::from_secs(20);

// ----- shared by the parent and the children --------------------------------------------------

fn opts() -> ClientOptions {
    ClientOptions {
        attach_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

fn to_hex(rec: &Record) -> String {
    let mut buf = vec![0u8; MAX_ENCODED_LEN];
    let n = rec.encode(&mut buf).unwrap();
    hex::encode(&buf[..n])
}

fn from_hex(s: &str) -> Record {
    Record::decode(&hex::decode(s).unwrap()).unwrap()
}

/// One command of the randomized sequence.
#[derive(Debug, Clone)]
enum Cmd {
    AddSa(Box<SaSpec>),
    DeleteSa(String),
    UpdateSa { name: String, update: SaUpdate },
    AddPolicy(PolicySpec),
    DeletePolicy(u32),
}

impl Cmd {
    fn line(&self, n: u64) -> String {
        match self {
            Cmd::AddSa(s) => format!("{n} add {}", to_hex(&Record::AddSa(s.clone()))),
            Cmd::DeleteSa(name) => format!("{n} del {name}"),
            Cmd::UpdateSa { name, update } => {
                format!("{n} upd {name} {}", to_hex(&Record::UpdateSa(*update)))
            }
            Cmd::AddPolicy(p) => {
                format!(
                    "{n} pol {}",
                    to_hex(&Record::AddPolicy(Box::new(p.clone())))
                )
            }
            Cmd::DeletePolicy(id) => format!("{n} delpol {id}"),
        }
    }

    fn parse(line: &str) -> (u64, Cmd) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let n: u64 = words[0].parse().unwrap();
        let cmd = match words[1..] {
            ["add", h] => match from_hex(h) {
                Record::AddSa(s) => Cmd::AddSa(s),
                other => panic!("{other:?}"),
            },
            ["del", name] => Cmd::DeleteSa(name.to_string()),
            ["upd", name, h] => match from_hex(h) {
                Record::UpdateSa(update) => Cmd::UpdateSa {
                    name: name.to_string(),
                    update,
                },
                other => panic!("{other:?}"),
            },
            ["pol", h] => match from_hex(h) {
                Record::AddPolicy(p) => Cmd::AddPolicy(*p),
                other => panic!("{other:?}"),
            },
            ["delpol", id] => Cmd::DeletePolicy(id.parse().unwrap()),
            _ => panic!("bad command line {line:?}"),
        };
        (n, cmd)
    }
}

/// The JSON shapes of the dump, built by the data plane from its table and by the parent from
/// its model.
fn sa_json(
    name: &str,
    direction: &str,
    spi: u32,
    remote: IpAddr,
    encap: Option<(u16, u16)>,
    life: [u64; 6],
) -> Value {
    json!({
        "name": name,
        "direction": direction,
        "spi": format!("{spi:#010x}"),
        "remote": remote.to_string(),
        "encap": encap.map(|(s, d)| format!("{s}:{d}")),
        "lifetime": {
            "soft_seconds": life[0], "hard_seconds": life[1],
            "soft_bytes": life[2], "hard_bytes": life[3],
            "soft_packets": life[4], "hard_packets": life[5],
        },
    })
}

fn policy_json(
    src: String,
    dst: String,
    protocol: u8,
    sports: (u16, u16),
    dports: (u16, u16),
    action: String,
) -> Value {
    json!({
        "selector": format!(
            "{src} -> {dst} proto {protocol} sports {}-{} dports {}-{}",
            sports.0, sports.1, dports.0, dports.1
        ),
        "action": action,
    })
}

// ----- the children ---------------------------------------------------------------------------

/// The children's side. Does nothing in a normal test run.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let args: Vec<&str> = role.split(' ').collect();
    match args.as_slice() {
        ["dp", path] => dp_child(path),
        ["control", path] => control_child(path),
        ["raw", path] => raw_child(path),
        _ => panic!("unknown role {role:?}"),
    }
}

/// Lines from stdin; the channel closes at EOF (the parent is gone or done).
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

fn dp_child(path: &str) {
    let db = Arc::new(SaDb::new(4096));
    let mut applier =
        Applier::new(path, Arc::clone(&db), Arc::new(SoftwareProvider)).expect("applier");
    let stop = Arc::new(AtomicBool::new(false));
    {
        let db = Arc::clone(&db);
        let stop = Arc::clone(&stop);
        let lines = stdin_lines();
        std::thread::spawn(move || {
            for line in lines {
                if line.trim() == "dump" {
                    say(&format!("dump {}", dump(&db)));
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    say(&format!(
        "ready {}",
        applier.segment().map_or(0, Segment::dp_generation)
    ));
    let base = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now_ns = base.elapsed().as_nanos() as u64 + 1;
        if applier.poll(now_ns) == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The table as the data plane sees it.
fn dump(db: &SaDb) -> Value {
    use espgw_dataplane::sa::Direction as D;
    let guard = crossbeam_epoch::pin();
    let z = |v: Option<u64>| v.unwrap_or(0);
    let mut sas: Vec<(String, Value)> = db
        .iter(&guard)
        .map(|s| {
            let peer = s.peer();
            let l = s.lifetime();
            let dir = match s.direction {
                D::In => "in",
                D::Out => "out",
            };
            let v = sa_json(
                &s.name,
                dir,
                s.spi,
                peer.remote,
                peer.encap.map(|e| (e.sport, e.dport)),
                [
                    z(l.soft_seconds),
                    z(l.hard_seconds),
                    z(l.soft_bytes),
                    z(l.hard_bytes),
                    z(l.soft_packets),
                    z(l.hard_packets),
                ],
            );
            (s.name.clone(), v)
        })
        .collect();
    sas.sort_by(|a, b| a.0.cmp(&b.0));
    let spd: Vec<Value> = db
        .spd(&guard)
        .map(|spd| {
            spd.policies()
                .iter()
                .map(|p| {
                    let action = match p.action {
                        Action::Protect(id) => match db.get(id, &guard) {
                            Some(sa) => format!("protect {}", sa.name),
                            None => format!("protect <no SA with id {}>", id.0),
                        },
                        Action::Bypass => "bypass".into(),
                        Action::Discard => "discard".into(),
                    };
                    let s = &p.selector;
                    policy_json(
                        s.src.to_string(),
                        s.dst.to_string(),
                        s.protocol.unwrap_or(0),
                        (s.src_ports.lo, s.src_ports.hi),
                        (s.dst_ports.lo, s.dst_ports.hi),
                        action,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "sas": sas.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "spd": spd,
    })
}

fn control_child(path: &str) {
    let lines = stdin_lines();
    let mut sas = Vec::new();
    let mut policies = Vec::new();
    let client = loop {
        let Ok(line) = lines.recv() else { return };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["sa", h] => match from_hex(h) {
                Record::AddSa(s) => sas.push(*s),
                other => panic!("{other:?}"),
            },
            ["policy", h] => match from_hex(h) {
                Record::AddPolicy(p) => policies.push(*p),
                other => panic!("{other:?}"),
            },
            ["attach"] => break Client::attach(path, opts()).expect("attach"),
            ["restore"] => {
                let sas = std::mem::take(&mut sas);
                let policies = std::mem::take(&mut policies);
                let (c, report) = Client::attach_with_state(path, opts(), sas, policies)
                    .expect("attach_with_state");
                say(&format!(
                    "restored {}",
                    serde_json::to_string(&report).unwrap()
                ));
                break c;
            }
            _ => panic!("control child: unexpected line {line:?}"),
        }
    };
    control_loop(client, &lines);
}

/// Executes commands; `ensure_current` every 20 ms, also while idle.
fn control_loop(mut c: Client, lines: &mpsc::Receiver<String>) {
    let every = Duration::from_millis(20);
    let mut last_check = Instant::now();
    loop {
        match lines.recv_timeout(every) {
            Ok(line) => {
                let (n, cmd) = Cmd::parse(&line);
                match execute(&mut c, &cmd) {
                    Ok(()) => say(&format!("ok {n}")),
                    Err(e) => say(&format!("err {n} {e}")),
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if last_check.elapsed() >= every {
            last_check = Instant::now();
            match c.ensure_current() {
                Ok(Health::Resynced(r)) => report_resync(&r),
                Ok(_) => {}
                Err(e) => eprintln!("control child: ensure_current: {e}"),
            }
            // Nothing is expected (no traffic, long lifetimes); keep the queue empty anyway.
            let _ = c.drain_events();
        }
    }
}

fn report_resync(r: &ResyncReport) {
    say(&format!("resynced {}", serde_json::to_string(r).unwrap()));
}

fn run(c: &mut Client, cmd: &Cmd) -> Result<(), ClientError> {
    match cmd {
        Cmd::AddSa(s) => c.add_sa(s.as_ref().clone()).map(drop),
        Cmd::DeleteSa(name) => c.delete_sa_named(name),
        Cmd::UpdateSa { name, update } => {
            c.update_sa_named(name, update.remote, update.encap, update.lifetime)
        }
        Cmd::AddPolicy(p) => c.add_policy(p.clone()).map(drop),
        Cmd::DeletePolicy(id) => c.delete_policy(*id),
    }
}

/// Whether the desired state already shows the command's effect (its answer was read from the
/// old segment by `ensure_current`, and the resync carried it to the new data plane).
fn done(c: &Client, cmd: &Cmd) -> bool {
    match cmd {
        Cmd::AddSa(s) => c.sa(&s.name).is_some_and(|x| x.spi == s.spi),
        Cmd::DeleteSa(name) => c.sa(name).is_none(),
        Cmd::UpdateSa { name, update } => c.sa(name).is_some_and(|x| {
            x.remote == update.remote && x.encap == update.encap && x.lifetime == update.lifetime
        }),
        Cmd::AddPolicy(p) => c.policy(p.policy_id).is_some_and(|x| {
            x.direction == p.direction
                && x.priority == p.priority
                && x.selector == p.selector
                && x.action == p.action
        }),
        Cmd::DeletePolicy(id) => c.policy(*id).is_none(),
    }
}

fn execute(c: &mut Client, cmd: &Cmd) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match run(c, cmd) {
            Ok(()) => return Ok(()),
            Err(ClientError::DataPlaneGone { .. }) if Instant::now() < deadline => {
                follow_restart(c, deadline)?;
                say("carried-on");
                if done(c, cmd) {
                    return Ok(());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Waits for the new data plane and the resync into it.
fn follow_restart(c: &mut Client, deadline: Instant) -> Result<(), String> {
    loop {
        match c.ensure_current() {
            Ok(Health::Resynced(r)) => {
                report_resync(&r);
                return Ok(());
            }
            Ok(Health::Current) => return Ok(()),
            Ok(Health::DataPlaneDown | Health::Waiting(_)) => {}
            Err(e) => eprintln!("control child: ensure_current: {e}"),
        }
        if Instant::now() >= deadline {
            return Err("the data plane did not come back".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Malformed records first (raw, on a plain attach), then an ordinary control child.
fn raw_child(path: &str) {
    let lines = stdin_lines();
    let spec = match lines.recv().map(|l| {
        let h = l.strip_prefix("sa ").expect("sa HEX").to_string();
        from_hex(&h)
    }) {
        Ok(Record::AddSa(s)) => *s,
        other => panic!("{other:?}"),
    };
    {
        let seg = Segment::attach(path).expect("attach");
        let mut tx = seg.sender().unwrap();
        let mut rx = seg.receiver().unwrap();
        let mut buf = vec![0u8; MAX_ENCODED_LEN];
        let n = Record::AddSa(Box::new(spec)).encode(&mut buf).unwrap();
        let mut applied = vec![0u8; MAX_ENCODED_LEN];
        let m = Record::Applied { seq: 5 }.encode(&mut applied).unwrap();
        let payloads: [(&str, &[u8]); 3] = [
            ("unknown-kind", &[0xff, 0x7f, 1, 2, 3, 4, 5, 6]),
            ("truncated-add-sa", &buf[..n - 7]),
            ("wrong-direction", &applied[..m]),
        ];
        for (what, p) in payloads {
            let seq = tx.try_push_raw(p).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "no answer to {what}");
                match rx.pop_wait(Duration::from_millis(100)).unwrap() {
                    Some(Received {
                        record: Ok(Record::Rejected { seq: s, reason }),
                        ..
                    }) if s == seq => {
                        say(&format!("rejected {what} {seq} {reason}"));
                        break;
                    }
                    Some(Received {
                        record: Ok(Record::Applied { seq: s }),
                        ..
                    }) if s == seq => {
                        say(&format!("applied {what} {seq}"));
                        break;
                    }
                    Some(other) => eprintln!("raw child: {other:?}"),
                    None => {}
                }
            }
        }
        // Dropping the segment releases the control lock for the client below.
    }
    let c = Client::attach(path, opts()).expect("attach");
    control_loop(c, &lines);
}

// ----- the parent -----------------------------------------------------------------------------

/// `/dev/shm/espgw-ringctl-proc-<pid>-<n>`, removed when dropped (also on panic).
struct Shm(PathBuf);

impl Shm {
    fn new() -> Shm {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Shm(PathBuf::from(format!(
            "/dev/shm/espgw-ringctl-proc-{}-{n}",
            std::process::id()
        )))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A child process with its stdin and its stdout lines; killed when dropped (a failing test
/// leaves no child behind).
struct Proc {
    role: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    resyncs: usize,
    /// Commands the control child carried on across a data-plane restart.
    carried: usize,
}

impl Proc {
    fn spawn(role: String) -> Proc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--nocapture", "--test-threads=1", "-q"])
            .env(ROLE, &role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            role,
            stdin: child.stdin.take(),
            child,
            lines: rx,
            resyncs: 0,
            carried: 0,
        }
    }

    fn dp(path: &Path) -> Proc {
        let mut p = Proc::spawn(format!("dp {}", path.display()));
        p.expect("ready ", ANSWER);
        p
    }

    fn control(path: &Path) -> Proc {
        Proc::spawn(format!("control {}", path.display()))
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// The next line, or `None` at EOF or timeout. `resynced` reports are checked here.
    fn next(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        if let Some(r) = line.strip_prefix("resynced ") {
            let v: Value = serde_json::from_str(r).unwrap();
            assert_eq!(
                v["rejected"], 0,
                "a resync into a restarted data plane had rejections: {v}"
            );
            self.resyncs += 1;
        }
        if line == "carried-on" {
            self.carried += 1;
        }
        Some(line)
    }

    /// The rest of the next line that starts with `prefix` (other lines are skipped).
    fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.next(left) else {
                panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?} (exited: {:?})",
                    self.role,
                    self.child.try_wait()
                );
            };
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_string();
            }
        }
    }

    /// Waits for command `n`'s answer, which must be `ok`.
    fn answer(&mut self, n: u64) {
        let deadline = Instant::now() + ANSWER;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.next(left) else {
                panic!(
                    "control child: no answer to command {n} (exited: {:?})",
                    self.child.try_wait()
                );
            };
            if line.starts_with("err ") {
                panic!("command {n}: {line}");
            }
            if line == format!("ok {n}") {
                return;
            }
            if line.starts_with("ok ") {
                panic!("expected the answer to command {n}, got {line:?}");
            }
        }
    }

    /// Closes its stdin and waits for a clean exit (no panic in the child).
    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + ANSWER;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.role);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.role);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn sigstop(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    }

    fn kill_9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "{}: {status}", self.role);
    }

    /// After a kill: whatever it printed before dying. Returns whether command `n` was
    /// answered (`ok`; an `err` fails the test).
    fn leftovers(&mut self, n: u64) -> bool {
        let mut answered = false;
        while let Some(line) = self.next(Duration::from_secs(2)) {
            assert!(!line.starts_with("err "), "command {n}: {line}");
            answered |= line == format!("ok {n}");
        }
        answered
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A tiny deterministic generator (xorshift64*), so failures replay from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng((seed ^ 0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const SA_NAMES: usize = 12;
const POLICY_IDS: u64 = 6;

fn random_addr(rng: &mut Rng) -> IpAddr {
    let [a, b, c] = *rng.pick(&[[192u8, 0, 2], [198, 51, 100], [203, 0, 113]]);
    IpAddr::V4(Ipv4Addr::new(a, b, c, 1 + rng.below(254) as u8))
}

fn random_port(rng: &mut Rng) -> u16 {
    1024 + rng.below(64000) as u16
}

/// Soft and hard limits, each present or not (0); soft ≤ hard when both are.
fn random_lifetimes(rng: &mut Rng) -> Lifetimes {
    let mut pair = |base: u64| {
        let soft = base + rng.below(base);
        let hard = soft + rng.below(base);
        match rng.below(4) {
            0 => (0, 0),
            1 => (0, hard),
            2 => (soft, 0),
            _ => (soft, hard),
        }
    };
    let (soft_seconds, hard_seconds) = pair(3600);
    let (soft_bytes, hard_bytes) = pair(1 << 30);
    let (soft_packets, hard_packets) = pair(1 << 20);
    Lifetimes {
        soft_seconds,
        hard_seconds,
        soft_bytes,
        hard_bytes,
        soft_packets,
        hard_packets,
    }
}

fn random_selector(rng: &mut Rng) -> Selector {
    let net = |rng: &mut Rng, base: u8| {
        if rng.below(2) == 0 {
            IpPrefix {
                addr: IpAddr::V4(Ipv4Addr::new(10, base + rng.below(8) as u8, 0, 0)),
                len: 16,
            }
        } else {
            IpPrefix {
                addr: IpAddr::V4(Ipv4Addr::new(
                    10,
                    base + rng.below(8) as u8,
                    rng.below(256) as u8,
                    0,
                )),
                len: 24,
            }
        }
    };
    let src = net(rng, 0);
    let dst = net(rng, 100);
    let protocol = *rng.pick(&[0u8, 6, 17]);
    let dst_ports = if protocol != 0 && rng.below(2) == 0 {
        let first = 1 + rng.below(1000) as u16;
        PortRange {
            first,
            last: first + rng.below(100) as u16,
        }
    } else {
        PortRange::ANY
    };
    Selector {
        src,
        dst,
        protocol,
        src_ports: PortRange::ANY,
        dst_ports,
    }
}

fn key(rng: &mut Rng, len: usize) -> Key {
    if len == 0 {
        Key::empty()
    } else {
        Key::new(&rng.bytes(len)).unwrap()
    }
}

fn random_sa(rng: &mut Rng, name: &str, spi: u32) -> SaSpec {
    let direction = if rng.below(2) == 0 {
        Direction::In
    } else {
        Direction::Out
    };
    let (enc_alg, integ_alg) = *rng.pick(&[
        (EncAlg::Aes128Gcm16, IntegAlg::None),
        (EncAlg::Aes256Gcm16, IntegAlg::None),
        (EncAlg::Aes128Gcm8, IntegAlg::None),
        (EncAlg::Aes256Cbc, IntegAlg::HmacSha2_256_128),
    ]);
    let icv_len = enc_alg.aead_icv_len().unwrap_or(integ_alg.icv_len()) as u8;
    let encap = (rng.below(3) == 0).then(|| UdpEncap {
        local_port: 4500,
        remote_port: random_port(rng),
    });
    SaSpec {
        generation: 0,
        spi,
        direction,
        mode: Mode::Tunnel,
        reqid: 1 + rng.below(100) as u32,
        name: name.into(),
        local: random_addr(rng),
        remote: random_addr(rng),
        encap,
        enc_alg,
        integ_alg,
        enc_key: key(rng, enc_alg.key_len()),
        salt: key(rng, enc_alg.salt_len()),
        integ_key: key(rng, integ_alg.key_len()),
        icv_len,
        esn: rng.below(4) == 0,
        initial_seq: 0,
        replay_window: *rng.pick(&[0, 64, 128]),
        lifetime: random_lifetimes(rng),
        selectors: if rng.below(4) == 0 {
            Vec::new()
        } else {
            vec![random_selector(rng)]
        },
        df: DfMode::Copy,
        dscp: DscpMode::Copy,
        ecn: EcnMode::Normal,
        outer_ttl: 64,
    }
}

/// The desired state: what the data plane's table must show once things have settled.
#[derive(Default)]
struct Model {
    sas: BTreeMap<String, SaSpec>,
    policies: BTreeMap<u32, PolicySpec>,
    spis: BTreeSet<u32>,
}

impl Model {
    fn fresh_spi(&mut self, rng: &mut Rng) -> u32 {
        loop {
            let spi = 256 + rng.below(u64::from(u32::MAX) - 256) as u32;
            if self.spis.insert(spi) {
                return spi;
            }
        }
    }

    fn protected(&self, name: &str) -> bool {
        self.policies
            .values()
            .any(|p| matches!(&p.action, PolicyAction::Protect { sa_name } if sa_name == name))
    }

    /// A valid command: every one must be applied.
    fn random_cmd(&mut self, rng: &mut Rng) -> Cmd {
        loop {
            match rng.below(12) {
                0..=2 => {
                    let free: Vec<String> = (0..SA_NAMES)
                        .map(|i| format!("sa-{i:02}"))
                        .filter(|n| !self.sas.contains_key(n))
                        .collect();
                    if free.is_empty() {
                        continue;
                    }
                    let name = rng.pick(&free).clone();
                    let spi = self.fresh_spi(rng);
                    return Cmd::AddSa(Box::new(random_sa(rng, &name, spi)));
                }
                3..=4 => {
                    let deletable: Vec<String> = self
                        .sas
                        .keys()
                        .filter(|n| !self.protected(n))
                        .cloned()
                        .collect();
                    if deletable.is_empty() {
                        continue;
                    }
                    return Cmd::DeleteSa(rng.pick(&deletable).clone());
                }
                5..=7 => {
                    let names: Vec<String> = self.sas.keys().cloned().collect();
                    if names.is_empty() {
                        continue;
                    }
                    let name = rng.pick(&names).clone();
                    let s = &self.sas[&name];
                    let sa = s.sa_ref();
                    // Same family; UDP encapsulation stays on or off, its ports may move.
                    let encap = match s.encap {
                        Some(_) => {
                            let other = random_port(rng);
                            Some(UdpEncap {
                                local_port: *rng.pick(&[4500, other]),
                                remote_port: random_port(rng),
                            })
                        }
                        None => None,
                    };
                    let update = SaUpdate {
                        sa,
                        remote: random_addr(rng),
                        encap,
                        lifetime: random_lifetimes(rng),
                    };
                    return Cmd::UpdateSa { name, update };
                }
                8..=10 => {
                    let outbound: Vec<String> = self
                        .sas
                        .values()
                        .filter(|s| s.direction == Direction::Out)
                        .map(|s| s.name.clone())
                        .collect();
                    let action = match rng.below(5) {
                        0..=2 if !outbound.is_empty() => PolicyAction::Protect {
                            sa_name: rng.pick(&outbound).clone(),
                        },
                        0..=3 => PolicyAction::Bypass,
                        _ => PolicyAction::Discard,
                    };
                    return Cmd::AddPolicy(PolicySpec {
                        policy_id: 1 + rng.below(POLICY_IDS) as u32,
                        generation: 0,
                        direction: Direction::Out,
                        priority: rng.below(3) as u32,
                        selector: random_selector(rng),
                        action,
                    });
                }
                _ => {
                    let ids: Vec<u32> = self.policies.keys().copied().collect();
                    if ids.is_empty() {
                        continue;
                    }
                    return Cmd::DeletePolicy(*rng.pick(&ids));
                }
            }
        }
    }

    fn apply(&mut self, cmd: &Cmd) {
        match cmd {
            Cmd::AddSa(s) => {
                assert!(
                    self.sas
                        .insert(s.name.clone(), s.as_ref().clone())
                        .is_none()
                );
            }
            Cmd::DeleteSa(name) => {
                assert!(self.sas.remove(name).is_some());
            }
            Cmd::UpdateSa { name, update } => {
                let s = self.sas.get_mut(name).unwrap();
                s.remote = update.remote;
                s.encap = update.encap;
                s.lifetime = update.lifetime;
            }
            Cmd::AddPolicy(p) => {
                self.policies.insert(p.policy_id, p.clone());
            }
            Cmd::DeletePolicy(id) => {
                assert!(self.policies.remove(id).is_some());
            }
        }
    }

    /// The dump the data plane must print.
    fn expected(&self) -> Value {
        let l = |s: &SaSpec| {
            let l = &s.lifetime;
            [
                l.soft_seconds,
                l.hard_seconds,
                l.soft_bytes,
                l.hard_bytes,
                l.soft_packets,
                l.hard_packets,
            ]
        };
        let sas: Vec<Value> = self
            .sas
            .values()
            .map(|s| {
                sa_json(
                    &s.name,
                    match s.direction {
                        Direction::In => "in",
                        Direction::Out => "out",
                    },
                    s.spi,
                    s.remote,
                    s.encap.map(|e| (e.local_port, e.remote_port)),
                    l(s),
                )
            })
            .collect();
        let mut ordered: Vec<&PolicySpec> = self.policies.values().collect();
        ordered.sort_by_key(|p| (p.priority, p.policy_id));
        let spd: Vec<Value> = ordered
            .into_iter()
            .map(|p| {
                let s = &p.selector;
                policy_json(
                    format!("{}/{}", s.src.addr, s.src.len),
                    format!("{}/{}", s.dst.addr, s.dst.len),
                    s.protocol,
                    (s.src_ports.first, s.src_ports.last),
                    (s.dst_ports.first, s.dst_ports.last),
                    match &p.action {
                        PolicyAction::Protect { sa_name } => format!("protect {sa_name}"),
                        PolicyAction::Bypass => "bypass".into(),
                        PolicyAction::Discard => "discard".into(),
                    },
                )
            })
            .collect();
        json!({ "sas": sas, "spd": spd })
    }

    /// The state a restarted control process restores.
    fn state_lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .sas
            .values()
            .map(|s| format!("sa {}", to_hex(&Record::AddSa(Box::new(s.clone())))))
            .collect();
        out.extend(
            self.policies
                .values()
                .map(|p| format!("policy {}", to_hex(&Record::AddPolicy(Box::new(p.clone()))))),
        );
        out
    }
}

/// A readable difference between the model's table and the data plane's.
fn diff(expected: &Value, actual: &Value) -> String {
    let mut out = String::new();
    let list = |v: &Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
    let (e, a) = (list(expected, "sas"), list(actual, "sas"));
    let by_name = |v: &[Value]| -> BTreeMap<String, Value> {
        v.iter()
            .map(|x| (x["name"].as_str().unwrap_or("?").to_string(), x.clone()))
            .collect()
    };
    let (e, a) = (by_name(&e), by_name(&a));
    for (name, x) in &e {
        match a.get(name) {
            None => out += &format!("  SA {name} missing in the data plane: {x}\n"),
            Some(y) if y != x => {
                out += &format!("  SA {name} differs:\n    model:      {x}\n    data plane: {y}\n")
            }
            Some(_) => {}
        }
    }
    for (name, y) in &a {
        if !e.contains_key(name) {
            out += &format!("  SA {name} in the data plane, not in the model: {y}\n");
        }
    }
    let (e, a) = (list(expected, "spd"), list(actual, "spd"));
    if e != a {
        out += "  SPD (model | data plane):\n";
        for i in 0..e.len().max(a.len()) {
            let show = |v: &[Value]| v.get(i).map_or("-".to_string(), Value::to_string);
            let mark = if e.get(i) == a.get(i) { ' ' } else { '!' };
            out += &format!("  {mark} {i}: {} | {}\n", show(&e), show(&a));
        }
    }
    out
}

/// Polls the data plane's dump until it equals the model; fails with a diff after
/// [`CONVERGE`]. Returns how long it took.
fn converge(dp: &mut Proc, model: &Model, when: &str, seed: u64) -> Duration {
    let start = Instant::now();
    let expected = model.expected();
    loop {
        dp.send("dump");
        let actual: Value = serde_json::from_str(&dp.expect("dump ", ANSWER)).unwrap();
        if actual == expected {
            return start.elapsed();
        }
        if start.elapsed() > CONVERGE {
            panic!(
                "{when}: the data plane's table did not match the model within {CONVERGE:?} \
                 (seed {seed}):\n{}",
                diff(&expected, &actual)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The control child, with a command in flight; a new one restores the model.
    Control,
    /// The data plane, between commands.
    DataPlane,
    /// The data plane, with a command in flight (the control child carries it on).
    DataPlaneMid,
}

#[test]
fn kill_9_either_side_mid_stream_and_the_table_follows_the_model() {
    const COMMANDS: u64 = 300;
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} (replay with {SEED_VAR}={seed})");
    let mut rng = Rng::new(seed);

    // Five kills of the control child, three of the data plane between commands and three
    // with a command in flight, at distinct random points.
    let mut schedule: BTreeMap<u64, Kill> = BTreeMap::new();
    for (kind, count) in [
        (Kill::Control, 5),
        (Kill::DataPlane, 3),
        (Kill::DataPlaneMid, 3),
    ] {
        let mut placed = 0;
        while placed < count {
            let n = 10 + rng.below(COMMANDS - 20);
            if let std::collections::btree_map::Entry::Vacant(e) = schedule.entry(n) {
                e.insert(kind);
                placed += 1;
            }
        }
    }

    let shm = Shm::new();
    let path = shm.path();
    let mut dp = Proc::dp(path);
    let mut ctl = Proc::control(path);
    ctl.send("attach");
    let mut model = Model::default();
    let mut answered_before_kill = 0;
    let mut slowest = Duration::ZERO;
    let mut resyncs = 0;
    let mut carried = 0;
    let start = Instant::now();

    for n in 1..=COMMANDS {
        let cmd = model.random_cmd(&mut rng);
        model.apply(&cmd);
        let kill = schedule.get(&n).copied();
        let pause = Duration::from_micros(*rng.pick(&[0, 0, 100, 500, 2000]));
        if kill == Some(Kill::DataPlaneMid) && rng.below(2) == 0 {
            // Sure to be in flight and not applied: the data plane cannot run any more.
            dp.sigstop();
        }
        ctl.send(&cmd.line(n));
        match kill {
            None => ctl.answer(n),
            Some(Kill::Control) => {
                std::thread::sleep(pause);
                ctl.kill_9();
                answered_before_kill += u32::from(ctl.leftovers(n));
                resyncs += ctl.resyncs;
                carried += ctl.carried;
                // A new control process with the whole desired state, the command in flight
                // included (it may or may not have reached the data plane).
                ctl = Proc::control(path);
                for line in model.state_lines() {
                    ctl.send(&line);
                }
                ctl.send("restore");
                let report: Value = serde_json::from_str(&ctl.expect("restored ", ANSWER)).unwrap();
                assert_eq!(report["rejected"], 0, "restore after kill at {n}: {report}");
                assert_eq!(report["sas"], model.sas.len(), "{report}");
                assert_eq!(report["policies"], model.policies.len(), "{report}");
            }
            Some(Kill::DataPlane) => {
                ctl.answer(n);
                dp.kill_9();
                dp = Proc::dp(path);
            }
            Some(Kill::DataPlaneMid) => {
                std::thread::sleep(pause);
                dp.kill_9();
                dp = Proc::dp(path);
                ctl.answer(n);
            }
        }
        if kill.is_some() || n % 50 == 0 {
            let when = match kill {
                Some(k) => format!("after {k:?} kill at command {n}"),
                None => format!("at command {n}"),
            };
            slowest = slowest.max(converge(&mut dp, &model, &when, seed));
        }
    }
    converge(&mut dp, &model, "at the end", seed);
    resyncs += ctl.resyncs;
    carried += ctl.carried;
    ctl.finish();
    dp.finish();
    let control_kills = schedule.values().filter(|k| **k == Kill::Control).count();
    let data_plane_kills = schedule.len() - control_kills;
    assert!(
        resyncs >= data_plane_kills,
        "{resyncs} resyncs reported for {data_plane_kills} data-plane restarts"
    );
    eprintln!(
        "seed {seed}: {COMMANDS} commands, kills {:?}; {answered_before_kill} of {control_kills} killed \
         commands answered before the kill; {resyncs} resyncs; {carried} commands carried on \
         across a data-plane restart; slowest convergence {slowest:?}; \
         {:?} in all; final table: {} SAs, {} policies",
        schedule.values().collect::<Vec<_>>(),
        start.elapsed(),
        model.sas.len(),
        model.policies.len()
    );
}

#[test]
fn a_malformed_record_is_rejected_and_the_data_plane_keeps_serving() {
    let shm = Shm::new();
    let path = shm.path();
    let mut dp = Proc::dp(path);
    let mut rng = Rng::new(7);
    let mut model = Model::default();
    let spi = model.fresh_spi(&mut rng);
    let spec = random_sa(&mut rng, "after-bad", spi);
    let mut raw = Proc::spawn(format!("raw {}", path.display()));
    raw.send(&format!(
        "sa {}",
        to_hex(&Record::AddSa(Box::new(spec.clone())))
    ));
    for (what, expect) in [
        ("unknown-kind", "kind"),
        ("truncated-add-sa", "ends inside"),
        ("wrong-direction", "to-data-plane ring"),
    ] {
        let line = raw.expect(&format!("rejected {what} "), ANSWER);
        let (seq, reason) = line.split_once(' ').unwrap();
        let _: u64 = seq.parse().unwrap();
        assert!(
            reason.contains(expect),
            "{what}: reason {reason:?} should mention {expect:?}"
        );
    }
    // The data plane carries on: the next command (through an ordinary client) is applied.
    let cmd = Cmd::AddSa(Box::new(spec));
    model.apply(&cmd);
    raw.send(&cmd.line(1));
    raw.answer(1);
    converge(&mut dp, &model, "after the malformed records", 7);
    raw.finish();
    dp.finish();
}

/// A resync into a restarted data plane that fails (here: the new data plane is stopped for
/// longer than the command timeout, so the resync's `QueryCounters` times out) is owed: the
/// client is already attached to the new segment, and later `ensure_current` calls must retry
/// it until the desired state reaches the new data plane (this once answered `Current`
/// forever).
#[test]
fn a_resync_that_failed_is_retried() {
    let shm = Shm::new();
    let path = shm.path();
    let mut dp = Proc::dp(path);
    let mut ctl = Proc::control(path);
    ctl.send("attach");
    let mut rng = Rng::new(99);
    let mut model = Model::default();
    let spi = model.fresh_spi(&mut rng);
    let cmd = Cmd::AddSa(Box::new(random_sa(&mut rng, "kept", spi)));
    model.apply(&cmd);
    ctl.send(&cmd.line(1));
    ctl.answer(1);
    converge(&mut dp, &model, "before the restart", 0);
    dp.kill_9();
    dp = Proc::dp(path);
    // Frozen before the control child's next ensure_current (every 20 ms) gets an answer.
    dp.sigstop();
    std::thread::sleep(opts().command_timeout + Duration::from_secs(2));
    let pid = libc::pid_t::try_from(dp.child.id()).unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    converge(&mut dp, &model, "after the data plane resumed", 0);
}
