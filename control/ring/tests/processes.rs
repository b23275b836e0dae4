//! Two real processes: this test binary re-executes itself as the control process (the
//! `child` test, with `ESPGW_RING_CHILD` selecting the role) while the parent plays the data
//! plane; the child is killed with SIGKILL mid-stream and replaced, several times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use espgw_ring::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

const ROLE: &str = "ESPGW_RING_CHILD";
const LONG: Duration = Duration::from_secs(60);

/// The child's side. Does nothing in a normal test run.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let args: Vec<&str> = role.split(' ').collect();
    match args.as_slice() {
        // Produce commands until the ring position reaches `until`.
        ["produce", path, until] => {
            let until: u64 = until.parse().unwrap();
            let control = Segment::attach(path).unwrap();
            let mut tx = control.sender().unwrap();
            println!("first {}", tx.next_seq());
            while tx.next_seq() < until {
                let seq = tx.next_seq();
                assert_eq!(tx.push_wait(&to_dp_record(seq), LONG), Ok(seq));
            }
        }
        // Produce `n` commands, leave one written but unpublished, then wait to be killed.
        ["torn", path, n] => {
            let n: u64 = n.parse().unwrap();
            let control = Segment::attach(path).unwrap();
            let mut tx = control.sender().unwrap();
            for _ in 0..n {
                let seq = tx.next_seq();
                tx.push_wait(&to_dp_record(seq), LONG).unwrap();
            }
            tx.write_unpublished(&Record::AddSa(Box::new(marked_sa())))
                .unwrap();
            println!("torn");
            std::thread::sleep(LONG);
        }
        // Consume events until `until`, printing each one as it is applied, before commit.
        ["consume", path, until] => {
            let until: u64 = until.parse().unwrap();
            let control = Segment::attach(path).unwrap();
            let mut rx = control.receiver().unwrap();
            while rx.next_seq() < until {
                let Some(pending) = rx.peek().unwrap() else {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                };
                let seq = pending.seq();
                match pending.record() {
                    Ok(r) if *r == from_dp_record(seq) => println!("applied {seq}"),
                    other => println!("BAD {seq} {other:?}"),
                }
                pending.commit();
            }
        }
        // Create a segment under a umask that would strip the owner's bits.
        ["umask", path] => {
            // SAFETY: umask has no preconditions; this process is single-purpose.
            unsafe { libc::umask(0o277) };
            let dp = Segment::create(path, small_params(8, 8)).unwrap();
            let mode = std::fs::metadata(path).unwrap().permissions();
            println!(
                "mode {:o}",
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777
            );
            drop(dp);
        }
        _ => panic!("unknown role {role:?}"),
    }
}

fn marked_key() -> Vec<u8> {
    (0xC0..0xD0).collect()
}

fn marked_sa() -> SaSpec {
    let mut sa = sa_for(0);
    sa.enc_key = Key::new(&marked_key()).unwrap();
    sa
}

/// Kills the child if the test fails, so no child outlives a failed parent.
struct Guard(Child);

impl std::ops::Deref for Guard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(role: String) -> (Guard, BufReader<ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (Guard(child), out)
}

/// The child's next line that starts with `prefix` (the test harness prints its own lines).
fn line(out: &mut BufReader<ChildStdout>, prefix: &str) -> Option<String> {
    let mut s = String::new();
    loop {
        s.clear();
        if out.read_line(&mut s).unwrap() == 0 {
            return None;
        }
        if let Some(rest) = s.trim_end().strip_prefix(prefix) {
            return Some(rest.trim().to_string());
        }
    }
}

fn kill_9(child: &mut Guard) {
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
}

#[test]
fn kill_9_the_producer_mid_stream_and_restart_it() {
    let p = ShmPath::new("proc-producer");
    let dp = Segment::create(p.path(), small_params(64, 64)).unwrap();
    let mut rx = dp.receiver().unwrap();
    let mut expected = 0u64;
    let check = |rx: &mut Consumer, expected: &mut u64| {
        let r = rx.try_pop().unwrap()?;
        assert_eq!(r.seq, *expected, "no gap, no duplicate");
        assert_eq!(r.record, Ok(to_dp_record(r.seq)), "record {}", r.seq);
        *expected += 1;
        Some(())
    };
    for round in 0..6u64 {
        let (mut child, mut out) = spawn(format!("produce {} {}", p.path().display(), u64::MAX));
        let first: u64 = line(&mut out, "first").unwrap().parse().unwrap();
        // It continues exactly where the ring is: after everything its predecessor published
        // (all of which was drained above).
        assert_eq!(first, expected);
        let stop = expected + 3000 + round * 1717;
        while expected < stop {
            if check(&mut rx, &mut expected).is_none() {
                std::thread::yield_now();
            }
        }
        // Kill it while it is producing (the ring has room: it is writing, not waiting).
        kill_9(&mut child);
        // Whatever it published is intact.
        while check(&mut rx, &mut expected).is_some() {}
        assert!(!dp.peer_alive().unwrap(), "its lock died with it");
    }
    // A last one finishes normally.
    let until = expected + 5000;
    let (mut child, _out) = spawn(format!("produce {} {until}", p.path().display()));
    while expected < until {
        if check(&mut rx, &mut expected).is_none() {
            std::thread::yield_now();
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(rx.try_pop().unwrap(), None);
}

#[test]
fn a_producer_killed_after_writing_but_before_publishing_leaves_nothing() {
    let p = ShmPath::new("proc-torn");
    let dp = Segment::create(p.path(), small_params(64, 64)).unwrap();
    let mut rx = dp.receiver().unwrap();
    let (mut child, mut out) = spawn(format!("torn {} 10", p.path().display()));
    assert!(line(&mut out, "torn").is_some());
    kill_9(&mut child);
    let bytes = std::fs::read(p.path()).unwrap();
    assert!(
        bytes.windows(16).any(|w| w == marked_key()),
        "the unpublished record is in its slot"
    );
    for i in 0..10 {
        let r = rx.try_pop().unwrap().unwrap();
        assert_eq!((r.seq, r.record), (i, Ok(to_dp_record(i))));
    }
    assert_eq!(rx.try_pop().unwrap(), None, "never published, never seen");

    let (mut child, mut out) = spawn(format!("produce {} 20", p.path().display()));
    assert_eq!(line(&mut out, "first").as_deref(), Some("10"));
    assert!(child.wait().unwrap().success());
    for i in 10..20 {
        let r = rx.try_pop().unwrap().unwrap();
        assert_eq!((r.seq, r.record), (i, Ok(to_dp_record(i))));
    }
    let bytes = std::fs::read(p.path()).unwrap();
    assert!(
        !bytes.windows(16).any(|w| w == marked_key()),
        "the new producer wiped the leftover key"
    );
}

#[test]
fn kill_9_the_consumer_mid_stream_and_restart_it() {
    const TOTAL: u64 = 40_000;
    let p = ShmPath::new("proc-consumer");
    let dp = Segment::create(p.path(), small_params(64, 64)).unwrap();
    let mut tx = dp.sender().unwrap();
    let producer = std::thread::spawn(move || {
        for i in 0..TOTAL {
            assert_eq!(tx.push_wait(&from_dp_record(i), LONG), Ok(i));
        }
    });
    // Every record the children applied, in order (a record may be applied twice: by a
    // child killed between applying and committing, then by its successor).
    let mut applied: Vec<u64> = Vec::new();
    let mut rereads = 0;
    let mut round = 0u64;
    loop {
        let last = applied.last().copied();
        let (mut child, mut out) = spawn(format!("consume {} {TOTAL}", p.path().display()));
        let stop = applied.len() as u64 + 4000 + round * 1311;
        let mut first = true;
        let mut finished = true;
        while let Some(l) = line(&mut out, "") {
            if let Some(bad) = l.strip_prefix("BAD") {
                panic!("corrupt record: {bad}");
            }
            let Some(seq) = l.strip_prefix("applied ") else {
                continue;
            };
            let seq: u64 = seq.parse().unwrap();
            if first {
                // Resumes at the record after the last one committed: the last one applied,
                // if its predecessor died before committing it, or the next.
                match last {
                    None => assert_eq!(seq, 0),
                    Some(l) if seq == l => rereads += 1,
                    Some(l) => assert_eq!(seq, l + 1),
                }
                first = false;
            } else {
                assert_eq!(Some(seq), applied.last().map(|l| l + 1));
            }
            applied.push(seq);
            if round < 6 && applied.len() as u64 >= stop {
                kill_9(&mut child);
                finished = false;
                // Lines it printed before dying are still in the pipe.
                while let Some(l) = line(&mut out, "applied ") {
                    let seq: u64 = l.parse().unwrap();
                    assert_eq!(Some(seq), applied.last().map(|l| l + 1));
                    applied.push(seq);
                }
                break;
            }
        }
        if finished {
            assert!(child.wait().unwrap().success());
            break;
        }
        round += 1;
    }
    producer.join().unwrap();
    let mut distinct = applied.clone();
    distinct.dedup();
    assert_eq!(distinct, (0..TOTAL).collect::<Vec<_>>());
    assert_eq!(applied.len() - distinct.len(), rereads);
    eprintln!("{rereads} of 6 kills landed between apply and commit");
}

#[test]
fn create_sets_0600_whatever_the_umask() {
    let p = ShmPath::new("proc-umask");
    let (mut child, mut out) = spawn(format!("umask {}", p.path().display()));
    assert_eq!(line(&mut out, "mode").as_deref(), Some("600"));
    assert!(child.wait().unwrap().success());
    assert!(
        !p.path().exists(),
        "the data plane removes its segment on exit"
    );
}
