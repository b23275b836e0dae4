//! Records per second through a real segment in /dev/shm, between two threads.
//!
//! `cargo run --release -p espgw-ring --example ring_bench [-- COUNT]`
//!
//! * `flush`: the smallest command (10 bytes), one way: the ring's own cost;
//! * `add_sa`: a full AES-GCM SA with two selectors (~190 bytes), one way: encode, checksum,
//!   publish, copy out, verify, decode, wipe;
//! * `add_sa+ack`: the same, and the consumer answers each with `Applied`, which the producing
//!   thread drains as it goes (what the control process will do): SA installs through the
//!   ring end to end, minus the data plane's own install.

use espgw_ring::*;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn sa(i: u64) -> Record {
    let sel = Selector {
        src: IpPrefix {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8)),
            len: 32,
        },
        dst: IpPrefix {
            addr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 0)),
            len: 16,
        },
        protocol: 0,
        src_ports: PortRange::ANY,
        dst_ports: PortRange::ANY,
    };
    Record::AddSa(Box::new(SaSpec {
        generation: i,
        spi: 0x1000_0000 | i as u32,
        direction: Direction::In,
        mode: Mode::Tunnel,
        reqid: i as u32,
        name: format!("peer-{i}"),
        local: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        remote: IpAddr::V4(Ipv4Addr::from(0xC633_6400 | (i as u32 & 0xff))),
        encap: Some(UdpEncap {
            local_port: 4500,
            remote_port: 4500,
        }),
        enc_alg: EncAlg::Aes256Gcm16,
        integ_alg: IntegAlg::None,
        enc_key: Key::new(&[i as u8; 32]).unwrap_or_default(),
        salt: Key::new(&[7; 4]).unwrap_or_default(),
        integ_key: Key::empty(),
        icv_len: 16,
        esn: true,
        initial_seq: 0,
        replay_window: 1024,
        lifetime: Lifetimes {
            soft_seconds: 3300,
            hard_seconds: 3600,
            ..Lifetimes::default()
        },
        selectors: vec![sel, sel],
        df: DfMode::Copy,
        dscp: DscpMode::Copy,
        ecn: EcnMode::Normal,
        outer_ttl: 64,
    }))
}

fn run(
    name: &str,
    n: u64,
    make: fn(u64) -> Record,
    ack: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = format!("/dev/shm/espgw-ring-bench-{}", std::process::id());
    let dp = Segment::create(&path, RingParams::default())?;
    let control = Segment::attach(&path)?;
    let mut tx = control.sender()?;
    let mut acks = control.receiver()?;
    let mut rx = dp.receiver()?;
    let mut events = dp.sender()?;
    let bytes = {
        let mut b = [0u8; 512];
        make(0).encode(&mut b)?
    };
    let consumer = std::thread::spawn(move || -> Result<(), String> {
        for i in 0..n {
            let r = rx
                .pop_wait(WAIT)
                .map_err(|e| e.to_string())?
                .ok_or("timeout")?;
            if r.seq != i || r.record.is_err() {
                return Err(format!("record {i}: {r:?}"));
            }
            if ack {
                events
                    .push_wait(&Record::Applied { seq: r.seq }, WAIT)
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    });
    let start = Instant::now();
    let mut acked = 0u64;
    for i in 0..n {
        let rec = make(i);
        loop {
            match tx.try_push(&rec) {
                Ok(_) => break,
                Err(PushError::Full) if ack => {
                    while acks.try_pop()?.is_some() {
                        acked += 1;
                    }
                    std::hint::spin_loop();
                }
                Err(PushError::Full) => {
                    tx.push_wait(&rec, WAIT)?;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if ack && i % 64 == 0 {
            while acks.try_pop()?.is_some() {
                acked += 1;
            }
        }
    }
    if ack {
        while acked < n {
            if acks.pop_wait(WAIT)?.is_none() {
                return Err("acknowledgements stopped".into());
            }
            acked += 1;
        }
    }
    consumer.join().map_err(|_| "consumer panicked")??;
    let t = start.elapsed();
    println!(
        "{name:>11}: {n} records of {bytes} bytes in {:.3} s: {:.2} M records/s ({:.0} ns each)",
        t.as_secs_f64(),
        n as f64 / t.as_secs_f64() / 1e6,
        t.as_nanos() as f64 / n as f64
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2_000_000);
    run("flush", n * 5, |i| Record::Flush { older_than: i }, false)?;
    run("add_sa", n, sa, false)?;
    run("add_sa+ack", n, sa, true)?;
    Ok(())
}
