//! The rings over real segments in /dev/shm, in one process: order, full, wraparound, bad
//! records, stray writers, wiping, and crash simulations of either end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use espgw_ring::segment::layout;
use espgw_ring::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);

fn poke(path: &Path, off: usize, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_at(bytes, off as u64).unwrap();
}

fn peek_file(path: &Path, off: usize, len: usize) -> Vec<u8> {
    let f = OpenOptions::new().read(true).open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_at(&mut b, off as u64).unwrap();
    b
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn pair(tag: &str, params: RingParams) -> (ShmPath, Segment, Segment) {
    let p = ShmPath::new(tag);
    let dp = Segment::create(p.path(), params).unwrap();
    let control = Segment::attach(p.path()).unwrap();
    (p, dp, control)
}

/// Cheap records for the volume test, with a full SA every 1000th.
fn volume_record(i: u64) -> Record {
    if i.is_multiple_of(1000) {
        Record::AddSa(Box::new(sa_for(i)))
    } else {
        Record::Flush { older_than: i }
    }
}

#[test]
fn a_million_records_in_order_between_threads() {
    const N: u64 = 1_000_000;
    let (_p, dp, control) = pair("million", small_params(1024, 64));
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    let start = Instant::now();
    let producer = std::thread::spawn(move || {
        for i in 0..N {
            assert_eq!(tx.push_wait(&volume_record(i), LONG).unwrap(), i);
        }
    });
    for i in 0..N {
        let r = rx
            .pop_wait(LONG)
            .unwrap()
            .expect("record within the timeout");
        assert_eq!(r.seq, i);
        assert_eq!(r.record, Ok(volume_record(i)), "record {i}");
    }
    producer.join().unwrap();
    assert_eq!(rx.try_pop().unwrap(), None);
    eprintln!("{N} records in {:?}", start.elapsed());
}

#[test]
fn events_flow_back_in_order_between_threads() {
    const N: u64 = 100_000;
    let (_p, dp, control) = pair("events", small_params(64, 256));
    let mut tx = dp.sender().unwrap();
    let mut rx = control.receiver().unwrap();
    let producer = std::thread::spawn(move || {
        for i in 0..N {
            tx.push_wait(&from_dp_record(i), LONG).unwrap();
        }
    });
    for i in 0..N {
        let r = rx.pop_wait(LONG).unwrap().unwrap();
        assert_eq!((r.seq, r.record), (i, Ok(from_dp_record(i))));
    }
    producer.join().unwrap();
}

#[test]
fn a_full_ring_refuses_and_never_overwrites() {
    let (_p, dp, control) = pair("full", small_params(4, 4));
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    for i in 0..4 {
        assert_eq!(tx.try_push(&to_dp_record(i)), Ok(i));
    }
    assert_eq!(tx.free_slots(), Ok(0));
    assert_eq!(tx.try_push(&to_dp_record(4)), Err(PushError::Full));
    let t = Instant::now();
    assert_eq!(
        tx.push_wait(&to_dp_record(4), Duration::from_millis(50)),
        Err(PushError::Timeout)
    );
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert_eq!(rx.available(), Ok(4));

    // Peeking does not free a slot; committing does.
    let pending = rx.peek().unwrap().unwrap();
    assert_eq!(pending.seq(), 0);
    drop(pending);
    assert_eq!(tx.try_push(&to_dp_record(4)), Err(PushError::Full));
    assert_eq!(rx.try_pop().unwrap().unwrap().seq, 0);
    assert_eq!(tx.try_push(&to_dp_record(4)), Ok(4));
    for i in 1..5 {
        let r = rx.try_pop().unwrap().unwrap();
        assert_eq!((r.seq, r.record), (i, Ok(to_dp_record(i))));
    }
    assert_eq!(rx.try_pop().unwrap(), None);
}

#[test]
fn push_wait_resumes_when_the_consumer_frees_a_slot() {
    let (_p, dp, control) = pair("resume", small_params(2, 2));
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    tx.try_push(&to_dp_record(0)).unwrap();
    tx.try_push(&to_dp_record(1)).unwrap();
    let consumer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        rx.try_pop().unwrap().unwrap().seq
    });
    assert_eq!(tx.push_wait(&to_dp_record(2), LONG), Ok(2));
    assert_eq!(consumer.join().unwrap(), 0);
}

#[test]
fn wraparound_keeps_sequence_numbers_and_contents() {
    let (_p, dp, control) = pair("wrap", small_params(2, 2));
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    let mut next = 0u64;
    for round in 0..5000u64 {
        // 1 or 2 records per round: every slot sees records of every size.
        let n = 1 + round % 2;
        for k in 0..n {
            assert_eq!(tx.try_push(&to_dp_record(next + k)), Ok(next + k));
        }
        for _ in 0..n {
            let r = rx.try_pop().unwrap().unwrap();
            assert_eq!((r.seq, r.record), (next, Ok(to_dp_record(next))));
            next += 1;
        }
    }
    assert_eq!(tx.next_seq(), next);
    assert_eq!(rx.next_seq(), next);
}

#[test]
fn a_malformed_record_is_rejected_and_the_index_advances() {
    let (_p, dp, control) = pair("malformed", small_params(8, 8));
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    let mut events = dp.sender().unwrap();
    let mut control_rx = control.receiver().unwrap();

    tx.try_push_raw(&[0x77, 0x00]).unwrap();
    let mut applied = encode(&to_dp_record(1));
    applied.truncate(applied.len() - 1);
    tx.try_push_raw(&applied).unwrap();
    tx.try_push_raw(&encode(&Record::Applied { seq: 9 }))
        .unwrap();
    tx.try_push(&to_dp_record(3)).unwrap();

    // What the data plane's applier will do: reject bad records with their reason.
    for _ in 0..4 {
        let r = rx.try_pop().unwrap().unwrap();
        let answer = r.rejection().unwrap_or(Record::Applied { seq: r.seq });
        events.try_push(&answer).unwrap();
    }
    let answers: Vec<Record> = std::iter::from_fn(|| control_rx.try_pop().unwrap())
        .map(|r| r.record.unwrap())
        .collect();
    assert_eq!(
        answers,
        vec![
            Record::Rejected {
                seq: 0,
                reason: "unknown record kind 0x0077".into()
            },
            Record::Rejected {
                seq: 1,
                reason: "record ends inside `lifetime.hard_packets`".into()
            },
            Record::Rejected {
                seq: 2,
                reason: "applied records do not travel on the to-data-plane ring".into()
            },
            Record::Applied { seq: 3 },
        ]
    );

    // The producer refuses a record of the wrong direction, or an invalid one, outright.
    assert_eq!(
        tx.try_push(&Record::Applied { seq: 1 }),
        Err(PushError::WrongRing {
            kind: Kind::Applied,
            ring: RingDir::ToDataPlane
        })
    );
    let mut bad = sa_for(0);
    bad.spi = 1;
    assert!(matches!(
        tx.try_push(&Record::AddSa(Box::new(bad))),
        Err(PushError::Encode(_))
    ));
    assert_eq!(tx.next_seq(), 4);
    assert!(matches!(
        tx.try_push_raw(&[0u8; 489]),
        Err(PushError::TooLarge { len: 489, max: 488 })
    ));
}

#[test]
fn stray_writes_are_caught() {
    let (p, dp, control) = pair("stray", small_params(8, 8));
    let params = dp.params();
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    for i in 0..4 {
        tx.try_push(&to_dp_record(i)).unwrap();
    }
    let slot = |pos| layout::slot(&params, RingDir::ToDataPlane, pos);
    // A payload byte.
    let off = slot(0) + layout::SLOT_PAYLOAD + 5;
    let b = peek_file(p.path(), off, 1)[0];
    poke(p.path(), off, &[b ^ 0x10]);
    // The sequence number.
    poke(p.path(), slot(1) + layout::SLOT_SEQ, &77u64.to_le_bytes());
    // The length.
    poke(p.path(), slot(2) + layout::SLOT_LEN, &4000u32.to_le_bytes());

    let r: Vec<Received> = std::iter::from_fn(|| rx.try_pop().unwrap()).collect();
    assert_eq!(r.len(), 4);
    assert_eq!(r[0].record, Err(RecordError::BadChecksum));
    assert_eq!(
        r[1].record,
        Err(RecordError::WrongSeq {
            expected: 1,
            found: 77
        })
    );
    assert_eq!(
        r[2].record,
        Err(RecordError::BadLength {
            len: 4000,
            max: 488
        })
    );
    assert_eq!(r[3].record, Ok(to_dp_record(3)));
    assert_eq!(
        r[1].rejection(),
        Some(Record::Rejected {
            seq: 1,
            reason: "slot holds sequence number 77, expected 1".into()
        })
    );
    // The ring goes on.
    tx.try_push(&to_dp_record(4)).unwrap();
    assert_eq!(rx.try_pop().unwrap().unwrap().record, Ok(to_dp_record(4)));
}

#[test]
fn a_corrupted_length_still_gets_the_whole_slot_wiped() {
    let (p, dp, control) = pair("strayw", small_params(8, 8));
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    let mut sa = sa_for(0);
    let key: Vec<u8> = (0x70..0x80).collect();
    sa.enc_key = Key::new(&key).unwrap();
    tx.try_push(&Record::AddSa(Box::new(sa))).unwrap();
    let slot = layout::slot(&dp.params(), RingDir::ToDataPlane, 0);
    poke(p.path(), slot + layout::SLOT_LEN, &10u32.to_le_bytes());
    assert_eq!(
        rx.try_pop().unwrap().unwrap().record,
        Err(RecordError::BadChecksum)
    );
    assert!(!contains(&std::fs::read(p.path()).unwrap(), &key));
    assert!(
        peek_file(p.path(), slot + layout::SLOT_PAYLOAD, 488)
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn impossible_indices_are_reported_not_followed() {
    let (p, dp, control) = pair("indices", small_params(8, 8));
    let params = dp.params();
    let ctl = layout::ring_ctl(&params, RingDir::ToDataPlane);
    poke(
        p.path(),
        ctl + layout::PRODUCER_INDEX,
        &1000u64.to_ne_bytes(),
    );
    let corrupt = RingError::Corrupt {
        ring: RingDir::ToDataPlane,
        producer: 1000,
        consumer: 0,
        slots: 8,
    };
    assert_eq!(dp.receiver().unwrap_err(), corrupt);
    assert_eq!(control.sender().unwrap_err(), corrupt);
    poke(p.path(), ctl + layout::PRODUCER_INDEX, &0u64.to_ne_bytes());
    let mut rx = dp.receiver().unwrap();
    assert_eq!(rx.try_pop(), Ok(None));
    poke(p.path(), ctl + layout::PRODUCER_INDEX, &9u64.to_ne_bytes());
    assert_eq!(
        rx.try_pop(),
        Err(RingError::Corrupt {
            ring: RingDir::ToDataPlane,
            producer: 9,
            consumer: 0,
            slots: 8
        })
    );
}

#[test]
fn key_material_is_wiped_from_the_slot_once_consumed() {
    let (p, dp, control) = pair("wipe", small_params(4, 4));
    let mut tx = control.sender().unwrap();
    let mut rx = dp.receiver().unwrap();
    let mut sa = sa_for(0);
    let key: Vec<u8> = (0xA0..0xB0).collect();
    sa.enc_key = Key::new(&key).unwrap();
    tx.try_push(&Record::AddSa(Box::new(sa.clone()))).unwrap();
    let file = || std::fs::read(p.path()).unwrap();
    assert!(contains(&file(), &key), "the key is in the published slot");
    let pending = rx.peek().unwrap().unwrap();
    assert!(contains(&file(), &key), "still there while pending");
    let r = pending.commit();
    assert!(!contains(&file(), &key), "wiped after commit");
    let Ok(Record::AddSa(got)) = r.record else {
        panic!("{r:?}")
    };
    assert_eq!(got.enc_key.as_bytes(), key);
    // The slot now holds only the wiped marker.
    let slot = peek_file(
        p.path(),
        layout::slot(&dp.params(), RingDir::ToDataPlane, 0),
        512,
    );
    assert_eq!(&slot[layout::SLOT_FLAGS..][..4], &1u32.to_le_bytes());
    assert!(slot[layout::SLOT_PAYLOAD..].iter().all(|&b| b == 0));
}

#[test]
fn a_consumer_that_dies_before_commit_reads_the_record_again() {
    let (_p, dp, control) = pair("reread", small_params(8, 8));
    let mut tx = control.sender().unwrap();
    for i in 0..3 {
        tx.try_push(&to_dp_record(i)).unwrap();
    }
    let mut rx = dp.receiver().unwrap();
    assert_eq!(rx.try_pop().unwrap().unwrap().seq, 0);
    let pending = rx.peek().unwrap().unwrap();
    assert_eq!(pending.seq(), 1);
    // "Dies" after applying record 1 but before releasing it.
    drop(pending);
    drop(rx);
    let mut rx = dp.receiver().unwrap();
    let r = rx.try_pop().unwrap().unwrap();
    assert_eq!((r.seq, r.record), (1, Ok(to_dp_record(1))));

    // The same on the control side: a control process that reattaches re-reads an event.
    let mut events = dp.sender().unwrap();
    events.try_push(&Record::Applied { seq: 0 }).unwrap();
    events.try_push(&Record::Applied { seq: 1 }).unwrap();
    let mut crx = control.receiver().unwrap();
    assert_eq!(crx.peek().unwrap().unwrap().seq(), 0);
    drop(crx);
    drop(tx);
    drop(control);
    let control = Segment::attach(_p.path()).unwrap();
    let mut crx = control.receiver().unwrap();
    assert_eq!(
        crx.try_pop().unwrap().unwrap().record,
        Ok(Record::Applied { seq: 0 })
    );
}

#[test]
fn a_consumer_that_dies_between_wipe_and_index_skips_the_slot() {
    let (_p, dp, control) = pair("wipedeath", small_params(8, 8));
    let mut tx = control.sender().unwrap();
    for i in 0..3 {
        tx.try_push(&to_dp_record(i)).unwrap();
    }
    let mut rx = dp.receiver().unwrap();
    rx.peek().unwrap().unwrap().wipe_without_advancing();
    drop(rx);
    let mut rx = dp.receiver().unwrap();
    assert_eq!(rx.next_seq(), 0);
    // Record 0 was applied (it is wiped only after applying): skipped, no rejection.
    let r = rx.try_pop().unwrap().unwrap();
    assert_eq!((r.seq, r.record), (1, Ok(to_dp_record(1))));
    assert_eq!(rx.next_seq(), 2);
}

#[test]
fn a_producer_that_dies_mid_write_publishes_nothing() {
    let (p, dp, control) = pair("torn", small_params(8, 8));
    let mut tx = control.sender().unwrap();
    tx.try_push(&to_dp_record(0)).unwrap();
    let mut sa = sa_for(0);
    let key: Vec<u8> = (0x50..0x60).collect();
    sa.enc_key = Key::new(&key).unwrap();
    tx.write_unpublished(&Record::AddSa(Box::new(sa))).unwrap();
    drop(tx);
    drop(control); // killed
    let mut rx = dp.receiver().unwrap();
    assert_eq!(rx.try_pop().unwrap().unwrap().seq, 0);
    assert_eq!(
        rx.try_pop().unwrap(),
        None,
        "the unpublished record is invisible"
    );
    assert!(contains(&std::fs::read(p.path()).unwrap(), &key));

    // A new control process attaches: the leftover is wiped, numbering continues.
    let control = Segment::attach(p.path()).unwrap();
    let mut tx = control.sender().unwrap();
    assert!(!contains(&std::fs::read(p.path()).unwrap(), &key));
    assert_eq!(tx.next_seq(), 1);
    assert_eq!(tx.try_push(&to_dp_record(1)), Ok(1));
    let r = rx.try_pop().unwrap().unwrap();
    assert_eq!((r.seq, r.record), (1, Ok(to_dp_record(1))));
}

#[test]
fn sequence_numbers_continue_across_producer_reattach() {
    let (p, dp, control) = pair("continue", small_params(16, 16));
    let mut tx = control.sender().unwrap();
    for i in 0..5 {
        assert_eq!(tx.try_push(&to_dp_record(i)), Ok(i));
    }
    drop(tx);
    drop(control);
    let control = Segment::attach(p.path()).unwrap();
    let mut tx = control.sender().unwrap();
    for i in 5..10 {
        assert_eq!(tx.try_push(&to_dp_record(i)), Ok(i));
    }
    let mut rx = dp.receiver().unwrap();
    for i in 0..10 {
        assert_eq!(rx.try_pop().unwrap().unwrap().seq, i);
    }
}

#[test]
fn one_producer_and_one_consumer_per_ring_and_mapping() {
    let (_p, dp, control) = pair("claim", small_params(8, 8));
    let tx = control.sender().unwrap();
    assert_eq!(
        control.clone().sender().unwrap_err(),
        RingError::Claimed {
            ring: RingDir::ToDataPlane,
            role: "producer"
        }
    );
    drop(tx);
    let _tx = control.sender().unwrap();
    let _rx = dp.receiver().unwrap();
    assert!(dp.receiver().is_err());
    let _events = dp.sender().unwrap();
    let _crx = control.receiver().unwrap();
    assert!(control.receiver().is_err());
}

#[test]
fn dropped_events_are_counted_for_the_consumer() {
    let (_p, dp, control) = pair("dropped", small_params(8, 2));
    let mut events = dp.sender().unwrap();
    events.try_push(&Record::Applied { seq: 0 }).unwrap();
    events.try_push(&Record::Applied { seq: 1 }).unwrap();
    assert_eq!(
        events.try_push(&Record::Applied { seq: 2 }),
        Err(PushError::Full)
    );
    events.count_dropped(1);
    let crx = control.receiver().unwrap();
    assert_eq!(crx.dropped(), 1);
}

#[test]
fn the_control_side_sees_a_data_plane_restart() {
    let p = ShmPath::new("restart");
    let dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    let control = Segment::attach(p.path()).unwrap();
    assert_eq!(control.dp_generation(), dp.dp_generation());
    assert!(control.is_current());
    assert!(control.peer_alive().unwrap());
    assert!(dp.peer_alive().unwrap());
    let first = dp.dp_generation();
    // A clean stop removes the file.
    drop(dp);
    assert!(!p.path().exists());
    assert!(!control.is_current());
    assert!(!control.peer_alive().unwrap());
    // A restarted data plane: a new generation; the old mapping is no longer current.
    let dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    assert_ne!(dp.dp_generation(), first);
    assert!(!control.is_current());
    assert!(
        !dp.peer_alive().unwrap(),
        "the old control holds the old file"
    );
    drop(control);
    let control = Segment::attach(p.path()).unwrap();
    assert_eq!(control.dp_generation(), dp.dp_generation());
    assert!(dp.peer_alive().unwrap());
}
