//! The `espgw-ringctl` binary against in-process data planes: JSON lines out, plain errors and
//! a non-zero status on failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_espgw-ringctl"))
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn ok(out: Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    lines(&out)
}

#[test]
fn push_and_delete_print_rates() {
    let shm = ShmPath::new();
    let dp = Dp::start(shm.path());
    let ring = shm.path().to_str().unwrap();
    let out = tool()
        .args(["push", "--ring", ring, "--count", "500", "--window", "64"])
        .args(["--direction", "both", "--delete"])
        .output()
        .unwrap();
    let v = ok(out);
    assert_eq!(v.len(), 2, "{v:?}");
    assert_eq!(v[0]["installs"]["applied"], 500);
    assert_eq!(v[0]["installs"]["rejected"], 0);
    assert!(v[0]["installs"]["per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(v[1]["deletes"]["applied"], 500);
    assert!(dp.names().is_empty());

    // Without --delete they stay (the data plane keeps them after the tool exits).
    let v = ok(tool()
        .args(["push", "--ring", ring, "--count", "20"])
        .output()
        .unwrap());
    assert_eq!(v[0]["installs"]["applied"], 20);
    assert_eq!(dp.names().len(), 20);
    let v = ok(tool().args(["counters", "--ring", ring]).output().unwrap());
    assert_eq!(v.len(), 21);
    assert_eq!(v[20]["sas"], 20);
    assert!(v[0]["sa"]["spi"].as_str().unwrap().starts_with("0x"));
    let v = ok(tool().args(["flush", "--ring", ring]).output().unwrap());
    assert_eq!(v[0]["flushed"], true);
    assert!(dp.names().is_empty());
    let v = ok(tool()
        .args(["events", "--ring", ring, "--for", "0.2"])
        .output()
        .unwrap());
    assert!(v.is_empty());
}

#[test]
fn tunnel_rekeys_on_schedule_and_leaves_the_tunnel_installed() {
    let (sa_, sb) = (ShmPath::new(), ShmPath::new());
    let dp_a = Dp::start(sa_.path());
    let dp_b = Dp::start(sb.path());
    let out = tool()
        .args(["tunnel", "--a-ring", sa_.path().to_str().unwrap()])
        .args(["--b-ring", sb.path().to_str().unwrap()])
        .args(["--a-addr", "203.0.113.1", "--b-addr", "198.51.100.7"])
        .args(["--a-net", "10.1.0.0/16", "--b-net", "10.2.0.0/16"])
        .args(["--encap", "4500:4500", "--lifetime-seconds", "3600"])
        .args([
            "--rekey-every",
            "0.3",
            "--duration",
            "1.6",
            "--drain-ms",
            "100",
        ])
        .output()
        .unwrap();
    let v = ok(out);
    assert!(v[0].get("established").is_some(), "{v:?}");
    let rekeys: Vec<&Value> = v.iter().filter_map(|x| x.get("rekey")).collect();
    assert!(rekeys.len() >= 3, "{v:?}");
    for r in &rekeys {
        assert_ne!(r["old"]["spi_ab"], r["new"]["spi_ab"]);
        assert!(r["switch_ms"].as_f64().is_some());
    }
    let last = v.last().unwrap();
    let stopped = &last["stopped"];
    assert_eq!(stopped["rekeys"].as_u64().unwrap(), rekeys.len() as u64);
    let a_out = stopped["sas"]["a_out"].as_str().unwrap();
    // Exactly the newest SAs remain on both sides, and no key was printed.
    assert_eq!(dp_a.names().len(), 2, "{:?}", dp_a.names());
    assert!(dp_a.names().contains(&a_out.to_string()));
    assert_eq!(dp_b.names().len(), 2, "{:?}", dp_b.names());
    let text: String = v.iter().map(|x| x.to_string()).collect();
    for word in ["enc_key", "integ_key", "salt", "Key("] {
        assert!(!text.contains(word), "{text}");
    }
}

#[test]
fn sigterm_ends_the_tunnel_cleanly() {
    let (sa_, sb) = (ShmPath::new(), ShmPath::new());
    let dp_a = Dp::start(sa_.path());
    let _dp_b = Dp::start(sb.path());
    let mut child = tool()
        .args(["tunnel", "--a-ring", sa_.path().to_str().unwrap()])
        .args(["--b-ring", sb.path().to_str().unwrap()])
        .args(["--a-addr", "203.0.113.1", "--b-addr", "198.51.100.7"])
        .args([
            "--a-net",
            "10.1.0.0/16",
            "--b-net",
            "10.2.0.0/16",
            "--watch",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("established"), "{first}");
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: sending a signal to our own child by its pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = out.lines().map(|l| l.unwrap()).collect();
    assert!(rest.last().unwrap().contains("stopped"), "{rest:?}");
    assert_eq!(dp_a.names().len(), 2);
}

#[test]
fn failures_are_plain_sentences_with_a_nonzero_status() {
    let shm = ShmPath::new();
    let out = tool()
        .args(["counters", "--ring", shm.path().to_str().unwrap()])
        .args(["--attach-timeout", "0.2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not create"), "{err}");

    let _dp = Dp::start(shm.path());
    let _held = espgw_ringctl::Client::attach(shm.path(), Default::default()).unwrap();
    let out = tool()
        .args(["flush", "--ring", shm.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only one control process"), "{err}");

    let out = tool()
        .args([
            "tunnel",
            "--a-ring",
            "x",
            "--b-ring",
            "y",
            "--a-addr",
            "192.0.2.1",
        ])
        .args([
            "--b-addr",
            "192.0.2.2",
            "--a-net",
            "10.1.0.0",
            "--b-net",
            "10.2.0.0/16",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--a-net") && err.contains("ADDRESS/LENGTH"),
        "{err}"
    );
}

#[test]
fn watch_follows_a_data_plane_restart_and_rekeys() {
    let (sa_, sb) = (ShmPath::new(), ShmPath::new());
    let _dp_a = Dp::start(sa_.path());
    let mut dp_b = Dp::start(sb.path());
    let mut child = tool()
        .args(["tunnel", "--a-ring", sa_.path().to_str().unwrap()])
        .args(["--b-ring", sb.path().to_str().unwrap()])
        .args(["--a-addr", "203.0.113.1", "--b-addr", "198.51.100.7"])
        .args(["--a-net", "10.1.0.0/16", "--b-net", "10.2.0.0/16"])
        .args([
            "--watch",
            "--rekey-every",
            "60",
            "--duration",
            "3",
            "--drain-ms",
            "50",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("established"), "{first}");
    dp_b.restart(sb.path());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let rest: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let resynced = rest.iter().position(|v| v.get("resynced").is_some());
    let rekey = rest.iter().position(|v| v.get("rekey").is_some());
    assert!(resynced.is_some() && rekey > resynced, "{rest:?}");
    assert_eq!(rest[resynced.unwrap()]["resynced"]["side"], "b");
    assert_eq!(rest[resynced.unwrap()]["resynced"]["report"]["sas"], 2);
    // The restarted data plane ends with exactly the newest pair.
    let names = dp_b.names();
    assert_eq!(names, ["t1-b-in-1", "t1-b-out-1"], "{rest:?}");
}
