//! The two single-producer/single-consumer rings.
//!
//! **Publish:** the producer encodes the record straight into the slot at its producer index
//! (a slot it owns: the consumer never reads beyond the published index), writes the slot header
//! (sequence number, length, flags, checksum), then stores the incremented producer index with
//! release ordering. **Consume:** the consumer loads the producer index with acquire ordering,
//! copies the slot out, checks it and decodes it; the record is then *pending*. The caller applies
//! it and [`Pending::commit`]s: the slot's payload is zeroed (key material must not stay in
//! shared memory), its header becomes a *wiped* marker, and the consumer index is stored with
//! release ordering, handing the slot back. The producer loads the consumer index with acquire
//! ordering before it reuses a slot, so the wipe happens-before its next write there.
//!
//! Sequence numbers are positions: the record at ring position `p` carries `seq = p` (0, 1, 2,
//! … since the data plane created the segment). A producer that (re)attaches continues at the
//! producer index it finds, so numbers continue across producer restarts without a gap or a
//! repetition; a consumer checks that each slot carries the number of its position.

use crate::checksum::slot_checksum;
use crate::record::{DecodeError, EncodeError, Kind, Record, RingDir};
use crate::segment::{Mapping, layout};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zeroize::Zeroize;

const FLAG_WIPED: u32 = 1;

/// A problem with a ring as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// This mapping already has a producer (or consumer) for the ring.
    #[error("the {ring} ring already has a {role} in this process")]
    Claimed {
        /// The ring.
        ring: RingDir,
        /// `"producer"` or `"consumer"`.
        role: &'static str,
    },
    /// The indices are impossible: something other than the ring protocol wrote them.
    #[error(
        "the {ring} ring's indices are impossible (producer {producer}, consumer {consumer}, {slots} slots): the segment was overwritten; the data plane must recreate it"
    )]
    Corrupt {
        /// The ring.
        ring: RingDir,
        /// Producer index.
        producer: u64,
        /// Consumer index.
        consumer: u64,
        /// Slots.
        slots: u64,
    },
}

/// Why a record was not pushed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Every slot holds a record the consumer has not released yet.
    #[error("the ring is full")]
    Full,
    /// Still full when the timeout expired.
    #[error("the ring stayed full until the timeout")]
    Timeout,
    /// The record does not travel in this direction.
    #[error("{kind} records do not travel on the {ring} ring")]
    WrongRing {
        /// The record's kind.
        kind: Kind,
        /// This ring.
        ring: RingDir,
    },
    /// The record could not be encoded (it is invalid); nothing was published.
    #[error("record not encodable: {0}")]
    Encode(EncodeError),
    /// The payload passed to [`Producer::try_push_raw`] does not fit a slot.
    #[error("{len}-byte payload does not fit the {max}-byte slot payload")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// The slot payload's size.
        max: usize,
    },
    /// The ring is corrupt.
    #[error(transparent)]
    Ring(RingError),
}

/// Why a published record is unusable. The consumer index still advances past it when the
/// record is committed; the data plane answers with [`Record::Rejected`]
/// ([`Received::rejection`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The slot carries another position's number (a stale or overwritten slot).
    #[error("slot holds sequence number {found}, expected {expected}")]
    WrongSeq {
        /// The position.
        expected: u64,
        /// What the slot says.
        found: u64,
    },
    /// The length field exceeds the slot.
    #[error("record length {len} exceeds the {max}-byte slot payload")]
    BadLength {
        /// The length field.
        len: u32,
        /// The slot's payload size.
        max: usize,
    },
    /// Unknown flags in the slot header.
    #[error("unknown slot flags {0:#x}")]
    BadFlags(u32),
    /// The checksum does not match: the slot changed after it was published.
    #[error("checksum mismatch (the slot was modified after it was published)")]
    BadChecksum,
    /// The bytes do not decode.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// A valid record of the other direction.
    #[error("{kind} records do not travel on the {ring} ring")]
    WrongRing {
        /// The record's kind.
        kind: Kind,
        /// This ring.
        ring: RingDir,
    },
}

/// A record taken from a ring (or an error in its place), with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The record's sequence number (its ring position).
    pub seq: u64,
    /// The record, or why the slot held none.
    pub record: Result<Record, RecordError>,
}

impl Received {
    /// For a bad record: the [`Record::Rejected`] to send back (the reason is the error's text).
    pub fn rejection(&self) -> Option<Record> {
        match &self.record {
            Ok(_) => None,
            Err(e) => Some(Record::rejected(self.seq, e)),
        }
    }
}

#[derive(Clone, Copy)]
struct Geometry {
    dir: RingDir,
    producer_index: usize,
    consumer_index: usize,
    dropped: usize,
    slots_off: usize,
    slots: u64,
    record_size: usize,
}

impl Geometry {
    fn new(map: &Mapping, dir: RingDir) -> Geometry {
        let p = map.params();
        let ctl = layout::ring_ctl(p, dir);
        Geometry {
            dir,
            producer_index: ctl + layout::PRODUCER_INDEX,
            consumer_index: ctl + layout::CONSUMER_INDEX,
            dropped: ctl + layout::DROPPED,
            slots_off: layout::ring_slots(p, dir),
            slots: u64::from(p.slots(dir)),
            record_size: p.record_size as usize,
        }
    }
    fn slot(&self, pos: u64) -> usize {
        self.slots_off + (pos & (self.slots - 1)) as usize * self.record_size
    }
    fn payload_max(&self) -> usize {
        self.record_size - layout::SLOT_HEADER_LEN
    }
    fn check(&self, producer: u64, consumer: u64) -> Result<(), RingError> {
        if producer < consumer || producer - consumer > self.slots {
            return Err(RingError::Corrupt {
                ring: self.dir,
                producer,
                consumer,
                slots: self.slots,
            });
        }
        Ok(())
    }
}

struct SlotHeader {
    seq: u64,
    len: u32,
    flags: u32,
    checksum: u64,
}

impl SlotHeader {
    fn to_bytes(&self) -> [u8; layout::SLOT_HEADER_LEN] {
        let mut b = [0u8; layout::SLOT_HEADER_LEN];
        b[layout::SLOT_SEQ..][..8].copy_from_slice(&self.seq.to_le_bytes());
        b[layout::SLOT_LEN..][..4].copy_from_slice(&self.len.to_le_bytes());
        b[layout::SLOT_FLAGS..][..4].copy_from_slice(&self.flags.to_le_bytes());
        b[layout::SLOT_CHECKSUM..][..8].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }
    fn from_bytes(b: &[u8; layout::SLOT_HEADER_LEN]) -> SlotHeader {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        SlotHeader {
            seq: u64_at(layout::SLOT_SEQ),
            len: u32_at(layout::SLOT_LEN),
            flags: u32_at(layout::SLOT_FLAGS),
            checksum: u64_at(layout::SLOT_CHECKSUM),
        }
    }
    /// The marker a consumer leaves in a slot it released.
    fn wiped(seq: u64) -> SlotHeader {
        SlotHeader {
            seq,
            len: 0,
            flags: FLAG_WIPED,
            checksum: slot_checksum(seq, 0, FLAG_WIPED, &[]),
        }
    }
}

/// Backoff for the waiting variants: spin briefly, then yield, then sleep 20 µs doubling up
/// to 1 ms. The clock is read only once waiting has begun (the common case never waits).
struct Backoff {
    timeout: Duration,
    deadline: Option<Instant>,
    round: u32,
}

impl Backoff {
    fn new(timeout: Duration) -> Backoff {
        Backoff {
            timeout,
            deadline: None,
            round: 0,
        }
    }
    /// Waits a little; false once the timeout has passed.
    fn wait(&mut self) -> bool {
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert(now + self.timeout);
        if now >= deadline {
            return false;
        }
        self.round += 1;
        if self.round <= 64 {
            std::hint::spin_loop();
        } else if self.round <= 80 {
            std::thread::yield_now();
        } else {
            let exp = (self.round - 81).min(6);
            let d = Duration::from_micros(20 << exp).min(Duration::from_millis(1));
            std::thread::sleep(d.min(deadline - now));
        }
        true
    }
}

/// The producing end of one ring. Not `Clone`: one producer per ring.
pub struct Producer {
    map: Arc<Mapping>,
    geo: Geometry,
    /// Next position to publish (our copy of the producer index).
    head: u64,
    /// The consumer index as last loaded.
    tail: u64,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("ring", &self.geo.dir)
            .field("next_seq", &self.head)
            .field("consumer_index", &self.tail)
            .finish()
    }
}

impl Producer {
    pub(crate) fn new(map: Arc<Mapping>, dir: RingDir) -> Result<Producer, RingError> {
        if !map.claim(dir, true) {
            return Err(RingError::Claimed {
                ring: dir,
                role: "producer",
            });
        }
        let geo = Geometry::new(&map, dir);
        let head = map.atomic(geo.producer_index).load(Ordering::Acquire);
        let tail = map.atomic(geo.consumer_index).load(Ordering::Acquire);
        if let Err(e) = geo.check(head, tail) {
            map.release(dir, true);
            return Err(e);
        }
        // A producer killed while writing leaves bytes (perhaps keys) in the slot it was
        // filling; it was never published. Wipe every free slot before continuing.
        for pos in head..tail + geo.slots {
            map.zero(geo.slot(pos), geo.record_size);
        }
        Ok(Producer {
            map,
            geo,
            head,
            tail,
        })
    }

    /// The ring this producer writes.
    pub fn ring(&self) -> RingDir {
        self.geo.dir
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.head
    }

    fn index(&self, off: usize) -> &AtomicU64 {
        self.map.atomic(off)
    }

    /// Slots free right now.
    pub fn free_slots(&mut self) -> Result<u64, RingError> {
        self.refresh()?;
        Ok(self.geo.slots - (self.head - self.tail))
    }

    fn refresh(&mut self) -> Result<(), RingError> {
        let tail = self.index(self.geo.consumer_index).load(Ordering::Acquire);
        self.geo.check(self.head, tail)?;
        self.tail = tail;
        Ok(())
    }

    fn reserve(&mut self) -> Result<(), PushError> {
        if self.head - self.tail >= self.geo.slots {
            self.refresh().map_err(PushError::Ring)?;
            if self.head - self.tail >= self.geo.slots {
                return Err(PushError::Full);
            }
        }
        Ok(())
    }

    /// Writes the slot header and publishes the slot at `head`.
    fn publish(&mut self, len: usize) -> u64 {
        let seq = self.head;
        let off = self.geo.slot(seq);
        let payload_off = off + layout::SLOT_PAYLOAD;
        let checksum = self
            .map
            .with_slice_mut(payload_off, len, |p| slot_checksum(seq, len as u32, 0, p));
        let hdr = SlotHeader {
            seq,
            len: len as u32,
            flags: 0,
            checksum,
        };
        self.map.write(off, &hdr.to_bytes());
        self.head += 1;
        self.index(self.geo.producer_index)
            .store(self.head, Ordering::Release);
        seq
    }

    /// Publishes `rec` if a slot is free; returns its sequence number. Never overwrites an
    /// unconsumed record: [`PushError::Full`] instead.
    pub fn try_push(&mut self, rec: &Record) -> Result<u64, PushError> {
        if rec.kind().ring() != self.geo.dir {
            return Err(PushError::WrongRing {
                kind: rec.kind(),
                ring: self.geo.dir,
            });
        }
        self.reserve()?;
        let payload_off = self.geo.slot(self.head) + layout::SLOT_PAYLOAD;
        let max = self.geo.payload_max();
        match self.map.with_slice_mut(payload_off, max, |p| rec.encode(p)) {
            Ok(len) => Ok(self.publish(len)),
            Err(e) => {
                // Part of the record (perhaps a key) may be in the slot: wipe it.
                self.map.zero(payload_off, max);
                Err(PushError::Encode(e))
            }
        }
    }

    /// [`Producer::try_push`], waiting while the ring is full: spins briefly, then sleeps with
    /// a growing backoff (up to 1 ms), until `timeout`.
    pub fn push_wait(&mut self, rec: &Record, timeout: Duration) -> Result<u64, PushError> {
        let mut backoff = Backoff::new(timeout);
        loop {
            match self.try_push(rec) {
                Err(PushError::Full) => {
                    if !backoff.wait() {
                        return Err(PushError::Timeout);
                    }
                }
                r => return r,
            }
        }
    }

    /// Publishes arbitrary bytes as a record, with a valid slot header and checksum. For tests
    /// and tools that check how the consumer handles a malformed record.
    pub fn try_push_raw(&mut self, payload: &[u8]) -> Result<u64, PushError> {
        let max = self.geo.payload_max();
        if payload.len() > max {
            return Err(PushError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        self.reserve()?;
        let payload_off = self.geo.slot(self.head) + layout::SLOT_PAYLOAD;
        self.map.write(payload_off, payload);
        Ok(self.publish(payload.len()))
    }

    /// Crash simulation for tests: encodes `rec` into the next free slot with a complete slot
    /// header, but does not publish it — what a producer killed just before its release store
    /// leaves behind. The next producer that attaches wipes it; the consumer never sees it.
    pub fn write_unpublished(&mut self, rec: &Record) -> Result<(), PushError> {
        self.reserve()?;
        let off = self.geo.slot(self.head);
        let payload_off = off + layout::SLOT_PAYLOAD;
        let max = self.geo.payload_max();
        let len = self
            .map
            .with_slice_mut(payload_off, max, |p| rec.encode(p))
            .map_err(PushError::Encode)?;
        let seq = self.head;
        let checksum = self
            .map
            .with_slice_mut(payload_off, len, |p| slot_checksum(seq, len as u32, 0, p));
        let hdr = SlotHeader {
            seq,
            len: len as u32,
            flags: 0,
            checksum,
        };
        self.map.write(off, &hdr.to_bytes());
        Ok(())
    }

    /// Adds `n` to the ring's count of records the producer gave up on (a full event ring: the
    /// data plane never waits for the control process). The consumer reads it with
    /// [`Consumer::dropped`] and knows it has missed events (and should query counters).
    pub fn count_dropped(&self, n: u64) {
        self.index(self.geo.dropped).fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.map.release(self.geo.dir, true);
    }
}

/// The consuming end of one ring. Not `Clone`: one consumer per ring.
pub struct Consumer {
    map: Arc<Mapping>,
    geo: Geometry,
    /// Next position to read (our copy of the consumer index).
    tail: u64,
    /// The producer index as last loaded.
    head: u64,
    /// Where a record is copied to be checked and decoded; wiped after each record.
    scratch: Box<[u8]>,
    /// Payload bytes to zero when the pending record is released: its length when the slot
    /// header was sound (the rest of the slot is already zero), else the whole payload.
    wipe_len: usize,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("ring", &self.geo.dir)
            .field("next_seq", &self.tail)
            .field("producer_index", &self.head)
            .finish()
    }
}

/// A record read but not yet released: its slot still holds it. Apply it, then
/// [`Pending::commit`]. Dropping it without committing leaves the record in the ring; the
/// next read (by this consumer or one that reattaches) returns it again.
pub struct Pending<'a> {
    consumer: &'a mut Consumer,
    received: Received,
}

impl fmt::Debug for Pending<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("received", &self.received)
            .finish()
    }
}

impl Pending<'_> {
    /// The record's sequence number.
    pub fn seq(&self) -> u64 {
        self.received.seq
    }

    /// The record, or why the slot held none.
    pub fn record(&self) -> Result<&Record, &RecordError> {
        self.received.record.as_ref()
    }

    /// Releases the slot: zeroes its payload, marks it wiped, advances the consumer index.
    /// Returns the record.
    pub fn commit(self) -> Received {
        self.consumer.release_slot();
        self.received
    }

    /// Crash simulation for tests: wipes the slot like [`Pending::commit`] but does not
    /// store the consumer index — a consumer killed between the two. The next consumer
    /// recognises the wiped marker and skips the slot (the record was applied).
    pub fn wipe_without_advancing(self) {
        let c = self.consumer;
        c.wipe_slot(c.tail, c.wipe_len);
    }
}

impl Consumer {
    pub(crate) fn new(map: Arc<Mapping>, dir: RingDir) -> Result<Consumer, RingError> {
        if !map.claim(dir, false) {
            return Err(RingError::Claimed {
                ring: dir,
                role: "consumer",
            });
        }
        let geo = Geometry::new(&map, dir);
        let tail = map.atomic(geo.consumer_index).load(Ordering::Acquire);
        let head = map.atomic(geo.producer_index).load(Ordering::Acquire);
        if let Err(e) = geo.check(head, tail) {
            map.release(dir, false);
            return Err(e);
        }
        let scratch = vec![0u8; geo.payload_max()].into_boxed_slice();
        Ok(Consumer {
            map,
            geo,
            tail,
            head,
            scratch,
            wipe_len: 0,
        })
    }

    /// The ring this consumer reads.
    pub fn ring(&self) -> RingDir {
        self.geo.dir
    }

    /// The sequence number of the next record to read.
    pub fn next_seq(&self) -> u64 {
        self.tail
    }

    /// Records published and not yet consumed.
    pub fn available(&mut self) -> Result<u64, RingError> {
        self.refresh()?;
        Ok(self.head - self.tail)
    }

    /// Records the producer reported as given up ([`Producer::count_dropped`]).
    pub fn dropped(&self) -> u64 {
        self.map.atomic(self.geo.dropped).load(Ordering::Relaxed)
    }

    fn refresh(&mut self) -> Result<(), RingError> {
        let head = self
            .map
            .atomic(self.geo.producer_index)
            .load(Ordering::Acquire);
        self.geo.check(head, self.tail)?;
        self.head = head;
        Ok(())
    }

    /// Marks the slot wiped with one aligned 4-byte store of the flags (so a consumer killed
    /// at any point of the wipe leaves either the intact record or a recognisable marker),
    /// then zeroes the payload and completes the marker header.
    ///
    /// Only `wipe_len` payload bytes are zeroed: a producer writes only the record's length
    /// into a slot that is otherwise zero (consumers zero what they read, a producer that
    /// attaches zeroes every free slot), so the slot's other cache lines stay untouched.
    fn wipe_slot(&self, pos: u64, wipe_len: usize) {
        let off = self.geo.slot(pos);
        self.map.atomic_u32(off + layout::SLOT_FLAGS).store(
            u32::from_ne_bytes(FLAG_WIPED.to_le_bytes()),
            Ordering::Relaxed,
        );
        self.map.zero(off + layout::SLOT_PAYLOAD, wipe_len);
        self.map.write(off, &SlotHeader::wiped(pos).to_bytes());
    }

    fn advance(&mut self) {
        self.tail += 1;
        self.map
            .atomic(self.geo.consumer_index)
            .store(self.tail, Ordering::Release);
    }

    fn release_slot(&mut self) {
        self.wipe_slot(self.tail, self.wipe_len);
        self.advance();
    }

    /// Reads the next record without releasing it; `None` if the ring is empty. Slots a
    /// consumer wiped but did not get to release before it died are skipped here.
    pub fn peek(&mut self) -> Result<Option<Pending<'_>>, RingError> {
        loop {
            if self.tail == self.head {
                self.refresh()?;
                if self.tail == self.head {
                    return Ok(None);
                }
            }
            let pos = self.tail;
            let off = self.geo.slot(pos);
            let mut hb = [0u8; layout::SLOT_HEADER_LEN];
            self.map.read(off, &mut hb);
            let hdr = SlotHeader::from_bytes(&hb);
            if hdr.flags == FLAG_WIPED && hdr.seq == pos {
                // Applied and (perhaps partly) wiped by a consumer that died before storing
                // the index: finish the wipe and move on.
                self.wipe_slot(pos, self.geo.payload_max());
                self.advance();
                continue;
            }
            let record = self.read_record(pos, off, &hdr);
            return Ok(Some(Pending {
                consumer: self,
                received: Received { seq: pos, record },
            }));
        }
    }

    fn read_record(
        &mut self,
        pos: u64,
        off: usize,
        hdr: &SlotHeader,
    ) -> Result<Record, RecordError> {
        self.wipe_len = self.geo.payload_max();
        if hdr.seq != pos {
            return Err(RecordError::WrongSeq {
                expected: pos,
                found: hdr.seq,
            });
        }
        let max = self.geo.payload_max();
        if hdr.len as usize > max {
            return Err(RecordError::BadLength { len: hdr.len, max });
        }
        if hdr.flags != 0 {
            return Err(RecordError::BadFlags(hdr.flags));
        }
        let len = hdr.len as usize;
        let buf = &mut self.scratch[..len];
        self.map.read(off + layout::SLOT_PAYLOAD, buf);
        let result = if slot_checksum(pos, hdr.len, hdr.flags, buf) != hdr.checksum {
            // The length may be what was corrupted: wipe the whole payload.
            Err(RecordError::BadChecksum)
        } else {
            self.wipe_len = len;
            match Record::decode(buf) {
                Ok(r) if r.kind().ring() != self.geo.dir => Err(RecordError::WrongRing {
                    kind: r.kind(),
                    ring: self.geo.dir,
                }),
                Ok(r) => Ok(r),
                Err(e) => Err(RecordError::Decode(e)),
            }
        };
        buf.zeroize();
        result
    }

    /// Reads and releases the next record (peek + commit); `None` if the ring is empty.
    pub fn try_pop(&mut self) -> Result<Option<Received>, RingError> {
        Ok(self.peek()?.map(Pending::commit))
    }

    /// [`Consumer::try_pop`], waiting up to `timeout` for a record (spin, then sleep with
    /// backoff up to 1 ms).
    pub fn pop_wait(&mut self, timeout: Duration) -> Result<Option<Received>, RingError> {
        let mut backoff = Backoff::new(timeout);
        loop {
            if let Some(r) = self.try_pop()? {
                return Ok(Some(r));
            }
            if !backoff.wait() {
                return Ok(None);
            }
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.scratch.zeroize();
        self.map.release(self.geo.dir, false);
    }
}
