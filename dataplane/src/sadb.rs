//! The SA database: lock-free lookup for workers, serialized writes that never stall them.
//!
//! Layout:
//! * a fixed **slab** of `capacity` slots, each an epoch-managed pointer to an [`Sa`]
//!   (`crossbeam_epoch::Atomic`). An [`SaId`] is a slot plus the slot's generation;
//! * an **SPI index** for inbound SAs: open addressing with linear probing over `AtomicU64`
//!   buckets holding `(spi << 32) | (slot + 1)`; 0 is empty and [`TOMBSTONE`] a deleted entry;
//! * the **SPD**, an immutable [`Spd`] behind an epoch-managed pointer, replaced as a whole.
//!
//! Readers pin an epoch once per burst and then only do atomic loads. Writers (SA install and
//! delete, SPD replacement) take a mutex among themselves; a reader never waits for it. A deleted
//! SA is freed — and its keys zeroized — only once every worker has left the epoch in which it
//! could still see it. When tombstones pile up the index is rebuilt into a fresh array and
//! swapped in; the old one is reclaimed the same way.
//!
//! A reader validates what it found (SPI and direction in the SA itself), so a slot reused for
//! another SA between reading the bucket and reading the slot is harmless.

use crate::counters::DropReason;
use crate::policy::Spd;
use crate::sa::{
    Direction, Event, EventSink, Lifetime, Peer, Sa, SaId, SaParams, UnknownSpi, UpdateError,
};
use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned, Shared};
use crossbeam_queue::ArrayQueue;
use espgw_crypto::CryptoProvider;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const EMPTY: u64 = 0;
const TOMBSTONE: u64 = u64::MAX;

/// Why an SA could not be installed or removed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SadbError {
    /// Every slot is in use.
    #[error("SA table full ({0} SAs); raise max_sas")]
    Full(usize),
    /// An inbound SA with this SPI and local address exists.
    #[error(
        "an inbound SA with SPI {spi:#010x} and local address {local} is already installed ({existing})"
    )]
    DuplicateSpi {
        /// SPI.
        spi: u32,
        /// Local address.
        local: IpAddr,
        /// Name of the existing SA.
        existing: String,
    },
    /// The name is taken.
    #[error("an SA named {0:?} is already installed")]
    DuplicateName(String),
    /// SPI 0..=255 are reserved (RFC 4303 §2.1).
    #[error("SPI {0:#x} is reserved (SPIs 0-255 are not used for SAs)")]
    ReservedSpi(u32),
    /// No such SA.
    #[error("no SA with id {0:?}")]
    NotFound(SaId),
    /// The crypto backend refused the keys or transform.
    #[error("{0}")]
    Crypto(#[from] espgw_crypto::KeyError),
    /// An update the SA cannot take in place.
    #[error("{0}")]
    Update(#[from] UpdateError),
}

/// At most this many unknown-SPI reports per second (RFC 4301 §6.1.2 asks for a rate limit);
/// every such packet is still counted as an `unknown_spi` drop.
pub const UNKNOWN_SPI_REPORTS_PER_SECOND: u64 = 100;

struct SpiIndex {
    buckets: Box<[AtomicU64]>,
    mask: usize,
}

impl SpiIndex {
    fn with_capacity(sas: usize) -> Self {
        // At most half full: short probe sequences, and a guaranteed empty bucket ends each probe.
        let n = (sas.max(8) * 2).next_power_of_two();
        SpiIndex {
            buckets: (0..n).map(|_| AtomicU64::new(EMPTY)).collect(),
            mask: n - 1,
        }
    }

    #[inline]
    fn home(&self, spi: u32) -> usize {
        // Fibonacci hashing: SPIs are often sequential or random; both spread well.
        ((u64::from(spi).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize) & self.mask
    }

    fn entry(spi: u32, slot: u32) -> u64 {
        (u64::from(spi) << 32) | (u64::from(slot) + 1)
    }

    /// Insert (writer only). Reuses the first tombstone on the probe path.
    fn insert(&self, spi: u32, slot: u32) {
        let mut i = self.home(spi);
        loop {
            let e = self.buckets[i].load(Ordering::Relaxed);
            if e == EMPTY || e == TOMBSTONE {
                self.buckets[i].store(Self::entry(spi, slot), Ordering::Release);
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The slots of the entries with this SPI, in probe order: what a reader's lookup walks and
    /// what the writer checks for SPI sharing. Several inbound SAs share an SPI only when their
    /// local addresses differ. A reader validates the SA it reaches (the slot may have been
    /// reused since the entry was read).
    #[inline]
    fn slots_of(&self, spi: u32) -> impl Iterator<Item = u32> + '_ {
        let mut i = self.home(spi);
        let mut left = self.mask + 1;
        std::iter::from_fn(move || {
            while left > 0 {
                left -= 1;
                let e = self.buckets[i].load(Ordering::Acquire);
                i = (i + 1) & self.mask;
                if e == EMPTY {
                    left = 0;
                } else if e != TOMBSTONE && (e >> 32) as u32 == spi {
                    return Some(((e & 0xFFFF_FFFF) - 1) as u32);
                }
            }
            None
        })
    }

    /// Remove (writer only).
    fn remove(&self, spi: u32, slot: u32) -> bool {
        let want = Self::entry(spi, slot);
        let mut i = self.home(spi);
        for _ in 0..=self.mask {
            let e = self.buckets[i].load(Ordering::Relaxed);
            if e == EMPTY {
                return false;
            }
            if e == want {
                self.buckets[i].store(TOMBSTONE, Ordering::Release);
                return true;
            }
            i = (i + 1) & self.mask;
        }
        false
    }
}

struct Writer {
    /// Free slots (a stack).
    free: Vec<u32>,
    /// Generation of each slot, bumped on every install.
    generations: Vec<u32>,
    /// Installed SAs by name: each entry is the hash of the SA's name (also kept in the SA,
    /// [`Sa::name_hash`]) and its handle. Removing an SA finds its entry by hash and handle
    /// without reading any name (with 10^6 SAs every name is a cache miss of its own); a name
    /// is compared only when a hash matches, against the SA's own copy.
    names: hashbrown::HashTable<(u64, SaId)>,
    /// Hasher of `names` (seeded at random per database).
    name_hasher: foldhash::fast::RandomState,
    installed: usize,
    tombstones: usize,
    index_capacity: usize,
}

/// The SA database shared by all workers.
pub struct SaDb {
    slots: Box<[Atomic<Sa>]>,
    index: Atomic<SpiIndex>,
    spd: Atomic<Spd>,
    writer: Mutex<Writer>,
    events: ArrayQueue<Event>,
    events_lost: AtomicU64,
    unknown_spi: ArrayQueue<UnknownSpi>,
    /// Earliest time (ns) of the next unknown-SPI report.
    unknown_spi_next_ns: AtomicU64,
    /// Idle threshold for [`Sa::check_idle`] in ns (0: no idle events).
    idle_ns: AtomicU64,
}

impl std::fmt::Debug for SaDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaDb")
            .field("capacity", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl SaDb {
    /// An empty database for up to `capacity` SAs (in and out together).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, u32::MAX as usize - 1);
        SaDb {
            slots: (0..capacity).map(|_| Atomic::null()).collect(),
            index: Atomic::new(SpiIndex::with_capacity(capacity)),
            spd: Atomic::new(Spd::default()),
            writer: Mutex::new(Writer {
                free: (0..capacity as u32).rev().collect(),
                generations: vec![0; capacity],
                names: hashbrown::HashTable::new(),
                name_hasher: foldhash::fast::RandomState::default(),
                installed: 0,
                tombstones: 0,
                index_capacity: capacity,
            }),
            events: ArrayQueue::new(4096),
            events_lost: AtomicU64::new(0),
            unknown_spi: ArrayQueue::new(256),
            unknown_spi_next_ns: AtomicU64::new(0),
            idle_ns: AtomicU64::new(0),
        }
    }

    /// Maximum number of SAs.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Number of installed SAs.
    pub fn len(&self) -> usize {
        self.lock_writer().installed
    }

    /// True when no SA is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A writer that panicked left the maps consistent (every mutation is completed before
        // anything can panic), so a poisoned lock is still usable.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where workers queue SA events.
    pub fn event_sink(&self) -> EventSink<'_> {
        EventSink {
            queue: &self.events,
            lost: &self.events_lost,
        }
    }

    /// Take every queued event.
    pub fn drain_events(&self) -> Vec<Event> {
        std::iter::from_fn(|| self.events.pop()).collect()
    }

    /// Events lost because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.events_lost.load(Ordering::Relaxed)
    }

    /// Report ESP for an SPI no inbound SA has, at most
    /// [`UNKNOWN_SPI_REPORTS_PER_SECOND`] times a second over all workers (lock-free; a report
    /// over the limit, or with the queue full, is simply not made).
    #[inline]
    pub fn report_unknown_spi(&self, r: UnknownSpi) {
        let next = self.unknown_spi_next_ns.load(Ordering::Relaxed);
        if r.at_ns < next {
            return;
        }
        let gap = 1_000_000_000 / UNKNOWN_SPI_REPORTS_PER_SECOND;
        if self
            .unknown_spi_next_ns
            .compare_exchange(next, r.at_ns + gap, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let _ = self.unknown_spi.push(r);
        }
    }

    /// Take every queued unknown-SPI report.
    pub fn drain_unknown_spi(&self) -> Vec<UnknownSpi> {
        std::iter::from_fn(|| self.unknown_spi.pop()).collect()
    }

    /// Send an Idle event for an SA that carried nothing for `seconds` (0: never), checked by
    /// [`SaDb::sweep`].
    pub fn set_idle_seconds(&self, seconds: u64) {
        self.idle_ns
            .store(seconds.saturating_mul(1_000_000_000), Ordering::Relaxed);
    }

    /// Change an installed SA's peer address/ports and limits in place ([`Sa::update`]).
    pub fn update(
        &self,
        id: SaId,
        peer: Peer,
        lifetime: Lifetime,
        now_ns: u64,
    ) -> Result<(), SadbError> {
        let guard = epoch::pin();
        // Serialized with install/remove, so the SA cannot be removed half-way.
        let _w = self.lock_writer();
        let sa = self.get(id, &guard).ok_or(SadbError::NotFound(id))?;
        sa.update(peer, lifetime, now_ns, &self.event_sink())?;
        Ok(())
    }

    /// Install an SA. Inbound SAs become visible to lookups when this returns.
    pub fn install(
        &self,
        params: SaParams,
        provider: &dyn CryptoProvider,
        now_ns: u64,
    ) -> Result<SaId, SadbError> {
        if params.spi < 256 {
            return Err(SadbError::ReservedSpi(params.spi));
        }
        let crypto = provider.new_sa(params.transform, &params.keys, params.esn)?;
        let guard = epoch::pin();
        let mut w = self.lock_writer();
        let name_hash = w.name_hasher.hash_one(params.name.as_str());
        if self
            .find_name(&w, name_hash, &params.name, &guard)
            .is_some()
        {
            return Err(SadbError::DuplicateName(params.name.clone()));
        }
        // Inbound SAs with the same SPI, found through the SPI index itself (no second map).
        let mut shares_spi = Vec::new();
        if params.direction == Direction::In
            && let Some(index) = shared_ref(self.index.load(Ordering::Acquire, &guard))
        {
            for slot in index.slots_of(params.spi) {
                if let Some(other) = self.at_slot(slot, &guard) {
                    if other.local == params.local {
                        return Err(SadbError::DuplicateSpi {
                            spi: params.spi,
                            local: params.local,
                            existing: other.name.clone(),
                        });
                    }
                    shares_spi.push(other);
                }
            }
        }
        let slot = w.free.pop().ok_or(SadbError::Full(self.slots.len()))?;
        w.generations[slot as usize] = w.generations[slot as usize].wrapping_add(1);
        let id = SaId::new(slot, w.generations[slot as usize]);
        let direction = params.direction;
        let spi = params.spi;
        let mut sa = Sa::new(id, params, crypto, now_ns);
        sa.name_hash = name_hash;
        if !shares_spi.is_empty() {
            sa.shared_spi.store(true, Ordering::Release);
            for other in &shares_spi {
                other.shared_spi.store(true, Ordering::Release);
            }
        }
        if let Some(weak) = sa.transform.weakness() {
            tracing::warn!(sa = %sa.name, transform = %sa.transform.name(), "weak algorithm: {weak}");
        }
        self.slots[slot as usize].store(Owned::new(sa), Ordering::Release);
        if direction == Direction::In {
            // The index pointer is never null (set in `new`, replaced only by a rebuild).
            if let Some(index) = shared_ref(self.index.load(Ordering::Acquire, &guard)) {
                index.insert(spi, slot);
            }
        }
        w.names.insert_unique(name_hash, (name_hash, id), |e| e.0);
        w.installed += 1;
        Ok(id)
    }

    /// Remove an SA. Workers that still hold it finish their burst with it; its memory and keys
    /// are released after that.
    pub fn remove(&self, id: SaId) -> Result<(), SadbError> {
        let guard = epoch::pin();
        let mut w = self.lock_writer();
        let slot = id.slot() as usize;
        let cur = match self.slots.get(slot) {
            Some(s) => s.load(Ordering::Acquire, &guard),
            None => return Err(SadbError::NotFound(id)),
        };
        let Some(sa) = shared_ref(cur) else {
            return Err(SadbError::NotFound(id));
        };
        if sa.id != id {
            return Err(SadbError::NotFound(id));
        }
        if sa.direction == Direction::In
            && let Some(index) = shared_ref(self.index.load(Ordering::Acquire, &guard))
        {
            if index.remove(sa.spi, id.slot()) {
                w.tombstones += 1;
            }
            // The one SA left with this SPI no longer needs the destination compared.
            let mut rest = index.slots_of(sa.spi);
            if let (Some(last), None) = (rest.next(), rest.next())
                && let Some(other) = self.at_slot(last, &guard)
            {
                other.shared_spi.store(false, Ordering::Release);
            }
        }
        if let Ok(e) = w.names.find_entry(sa.name_hash, |e| e.1 == id) {
            e.remove();
        }
        self.slots[slot].store(Shared::null(), Ordering::Release);
        // SAFETY: the slot no longer points to the SA, so no reader pinned from now on can reach
        // it; `defer_destroy` frees it only after every currently pinned reader has unpinned.
        unsafe { guard.defer_destroy(cur) };
        w.free.push(id.slot());
        w.installed -= 1;
        if w.tombstones > w.index_capacity / 4 {
            self.rebuild_index(&mut w, &guard);
        }
        drop(w);
        guard.flush();
        Ok(())
    }

    fn rebuild_index(&self, w: &mut Writer, guard: &Guard) {
        let fresh = SpiIndex::with_capacity(w.index_capacity);
        for slot in 0..self.slots.len() as u32 {
            if let Some(sa) = self.at_slot(slot, guard) {
                fresh.insert(sa.spi, slot);
            }
        }
        let old = self.index.swap(Owned::new(fresh), Ordering::AcqRel, guard);
        // SAFETY: `old` is no longer reachable through `self.index`; it is destroyed only after
        // every reader that may have loaded it has unpinned.
        unsafe { guard.defer_destroy(old) };
        w.tombstones = 0;
    }

    /// Look up an inbound SA by SPI and (where SPIs are shared) destination address.
    #[inline]
    pub fn lookup_inbound<'g>(&self, spi: u32, dst: IpAddr, guard: &'g Guard) -> Option<&'g Sa> {
        let index = shared_ref(self.index.load(Ordering::Acquire, guard))?;
        index.slots_of(spi).find_map(|slot| {
            self.at_slot(slot, guard).filter(|sa| {
                sa.spi == spi && (sa.local == dst || !sa.shared_spi.load(Ordering::Acquire))
            })
        })
    }

    /// The inbound SA in this slot, if any (the SPI index's entries name slots).
    #[inline]
    fn at_slot<'g>(&self, slot: u32, guard: &'g Guard) -> Option<&'g Sa> {
        let sa = shared_ref(
            self.slots
                .get(slot as usize)?
                .load(Ordering::Acquire, guard),
        )?;
        (sa.direction == Direction::In).then_some(sa)
    }

    /// The SA with this handle, if still installed.
    #[inline]
    pub fn get<'g>(&self, id: SaId, guard: &'g Guard) -> Option<&'g Sa> {
        let sa = shared_ref(
            self.slots
                .get(id.slot() as usize)?
                .load(Ordering::Acquire, guard),
        )?;
        (sa.id == id).then_some(sa)
    }

    /// The SA with this name.
    pub fn id_by_name(&self, name: &str) -> Option<SaId> {
        let guard = epoch::pin();
        let w = self.lock_writer();
        let hash = w.name_hasher.hash_one(name);
        self.find_name(&w, hash, name, &guard)
    }

    /// The installed SA named `name` (whose name hashes to `hash`), writer lock held.
    fn find_name(&self, w: &Writer, hash: u64, name: &str, guard: &Guard) -> Option<SaId> {
        w.names
            .find(hash, |&(h, id)| {
                h == hash && self.get(id, guard).is_some_and(|sa| sa.name == name)
            })
            .map(|&(_, id)| id)
    }

    /// Replace the SPD as a whole.
    pub fn set_spd(&self, spd: Spd) {
        let guard = epoch::pin();
        let _w = self.lock_writer();
        let old = self.spd.swap(Owned::new(spd), Ordering::AcqRel, &guard);
        // SAFETY: unreachable through `self.spd` from now on; freed after current readers unpin.
        unsafe { guard.defer_destroy(old) };
    }

    /// The current SPD.
    #[inline]
    pub fn spd<'g>(&self, guard: &'g Guard) -> Option<&'g Spd> {
        shared_ref(self.spd.load(Ordering::Acquire, guard))
    }

    /// Every installed SA, in slot order.
    pub fn iter<'g>(&'g self, guard: &'g Guard) -> impl Iterator<Item = &'g Sa> + 'g {
        self.slots
            .iter()
            .filter_map(move |s| shared_ref(s.load(Ordering::Acquire, guard)))
    }

    /// Periodic housekeeping: age limits of every SA (so idle SAs expire too) and idle events.
    pub fn sweep(&self, now_ns: u64) {
        let guard = epoch::pin();
        let sink = self.event_sink();
        let idle_ns = self.idle_ns.load(Ordering::Relaxed);
        for sa in self.iter(&guard) {
            sa.check_age(now_ns, &sink);
            sa.check_idle(now_ns, idle_ns, &sink);
        }
    }

    /// Total drops attributed to SAs, by reason (for reports).
    pub fn sa_drops(&self, reason: DropReason) -> u64 {
        let guard = epoch::pin();
        self.iter(&guard)
            .map(|sa| sa.counters.drops.snapshot().get(reason))
            .sum()
    }
}

impl Drop for SaDb {
    fn drop(&mut self) {
        // Exclusive access: no reader can be pinned on this database any more.
        // SAFETY: `&mut self` proves no other thread holds a reference into the table, so taking
        // the pointers out and dropping them now (zeroizing keys) cannot race with a reader.
        let guard = unsafe { epoch::unprotected() };
        for s in self.slots.iter() {
            let p = s.swap(Shared::null(), Ordering::AcqRel, guard);
            if !p.is_null() {
                // SAFETY: we own the only pointer to this SA (see above).
                drop(unsafe { p.into_owned() });
            }
        }
        let p = self.index.swap(Shared::null(), Ordering::AcqRel, guard);
        if !p.is_null() {
            // SAFETY: as above.
            drop(unsafe { p.into_owned() });
        }
        let p = self.spd.swap(Shared::null(), Ordering::AcqRel, guard);
        if !p.is_null() {
            // SAFETY: as above.
            drop(unsafe { p.into_owned() });
        }
    }
}

/// Dereference an epoch-protected pointer.
#[inline]
fn shared_ref<'g, T>(p: Shared<'g, T>) -> Option<&'g T> {
    // SAFETY: every pointer stored in this module's `Atomic`s comes from `Owned::new` and is
    // freed only through `defer_destroy` after it was unlinked, so while the guard `'g` is
    // pinned a loaded non-null pointer refers to a live value.
    unsafe { p.as_ref() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sa::{DfMode, DscpMode, EcnMode, EventKind, Lifetime, Limit, Mode, RunCounts};
    use espgw_crypto::{AeadAlg, SaKeys, SoftwareProvider, Transform};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    fn params(name: &str, direction: Direction, spi: u32, local: &str) -> SaParams {
        SaParams {
            name: name.into(),
            direction,
            spi,
            mode: Mode::Tunnel,
            local: local.parse().unwrap(),
            remote: "198.51.100.7".parse().unwrap(),
            encap: None,
            transform: Transform::Aead {
                alg: AeadAlg::Aes128Gcm,
                icv_len: 16,
            },
            keys: SaKeys::new(&[7u8; 20], &[]),
            esn: false,
            replay_window: 64,
            initial_seq: 0,
            lifetime: Lifetime::default(),
            selectors: Vec::new(),
            df: DfMode::Copy,
            dscp: DscpMode::Copy,
            ecn: EcnMode::Normal,
            outer_ttl: 64,
            pad_align: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn install_lookup_remove() {
        let db = SaDb::new(16);
        let g = epoch::pin();
        let id = db
            .install(
                params("a", Direction::In, 0x1000, "203.0.113.1"),
                &SoftwareProvider,
                0,
            )
            .unwrap();
        let out = db
            .install(
                params("b", Direction::Out, 0x2000, "203.0.113.1"),
                &SoftwareProvider,
                0,
            )
            .unwrap();
        assert_eq!(db.len(), 2);
        assert_eq!(
            db.lookup_inbound(0x1000, ip("203.0.113.1"), &g)
                .map(|s| s.id),
            Some(id)
        );
        // Unique SPI: a different destination still finds it (RFC 4301 allows SPI-only lookup).
        assert_eq!(
            db.lookup_inbound(0x1000, ip("203.0.113.9"), &g)
                .map(|s| s.id),
            Some(id)
        );
        // Outbound SAs are not in the SPI index.
        assert!(db.lookup_inbound(0x2000, ip("203.0.113.1"), &g).is_none());
        assert_eq!(db.get(out, &g).map(|s| s.spi), Some(0x2000));
        assert_eq!(db.id_by_name("b"), Some(out));
        db.remove(id).unwrap();
        assert!(db.lookup_inbound(0x1000, ip("203.0.113.1"), &g).is_none());
        assert_eq!(db.remove(id), Err(SadbError::NotFound(id)));
        assert_eq!(db.len(), 1);
    }

    #[test]
    fn stale_handle_does_not_reach_a_reused_slot() {
        let db = SaDb::new(1);
        let g = epoch::pin();
        let a = db
            .install(
                params("a", Direction::Out, 0x1000, "203.0.113.1"),
                &SoftwareProvider,
                0,
            )
            .unwrap();
        db.remove(a).unwrap();
        let b = db
            .install(
                params("b", Direction::Out, 0x1001, "203.0.113.1"),
                &SoftwareProvider,
                0,
            )
            .unwrap();
        assert_eq!(a.slot(), b.slot());
        assert_ne!(a, b);
        assert!(db.get(a, &g).is_none());
        assert_eq!(db.get(b, &g).map(|s| s.spi), Some(0x1001));
        assert_eq!(
            db.install(
                params("c", Direction::Out, 0x1002, "203.0.113.1"),
                &SoftwareProvider,
                0
            ),
            Err(SadbError::Full(1))
        );
    }

    #[test]
    fn shared_spi_needs_the_destination() {
        let db = SaDb::new(16);
        let g = epoch::pin();
        let a = db
            .install(
                params("a", Direction::In, 0x1000, "203.0.113.1"),
                &SoftwareProvider,
                0,
            )
            .unwrap();
        let b = db
            .install(
                params("b", Direction::In, 0x1000, "203.0.113.2"),
                &SoftwareProvider,
                0,
            )
            .unwrap();
        assert_eq!(
            db.lookup_inbound(0x1000, ip("203.0.113.1"), &g)
                .map(|s| s.id),
            Some(a)
        );
        assert_eq!(
            db.lookup_inbound(0x1000, ip("203.0.113.2"), &g)
                .map(|s| s.id),
            Some(b)
        );
        assert!(db.lookup_inbound(0x1000, ip("203.0.113.3"), &g).is_none());
        // Same SPI and local address twice is an error that names the existing SA.
        let e = db
            .install(
                params("c", Direction::In, 0x1000, "203.0.113.2"),
                &SoftwareProvider,
                0,
            )
            .unwrap_err();
        assert!(e.to_string().contains("(b)"), "{e}");
        // Once only one is left, its SPI is unique again.
        db.remove(a).unwrap();
        assert_eq!(
            db.lookup_inbound(0x1000, ip("203.0.113.3"), &g)
                .map(|s| s.id),
            Some(b)
        );
    }

    proptest::proptest! {
        /// The name table against a map: random installs (names from a small set, so that
        /// duplicates and reuse after removal are common) and removals; after each step every
        /// name resolves to the SA the model says, and a duplicate name is refused.
        #[test]
        fn names_behave_like_a_map(ops in proptest::collection::vec((0u8..12, proptest::bool::ANY), 1..120)) {
            let db = SaDb::new(16);
            let mut model: std::collections::HashMap<String, SaId> = Default::default();
            for (i, (n, add)) in ops.into_iter().enumerate() {
                let name = format!("sa-{n}");
                if add {
                    let dir = if n % 2 == 0 { Direction::In } else { Direction::Out };
                    let got = db.install(params(&name, dir, 0x1000 + i as u32, "203.0.113.1"), &SoftwareProvider, 0);
                    match model.get(&name) {
                        Some(_) => proptest::prop_assert_eq!(got, Err(SadbError::DuplicateName(name.clone()))),
                        None if model.len() == 16 => proptest::prop_assert_eq!(got, Err(SadbError::Full(16))),
                        None => {
                            let id = got.unwrap();
                            model.insert(name.clone(), id);
                        }
                    }
                } else if let Some(id) = model.remove(&name) {
                    proptest::prop_assert_eq!(db.remove(id), Ok(()));
                }
                for k in 0u8..12 {
                    let name = format!("sa-{k}");
                    proptest::prop_assert_eq!(db.id_by_name(&name), model.get(&name).copied());
                }
                // No entry outlives its SA.
                proptest::prop_assert_eq!(db.lock_writer().names.len(), model.len());
            }
        }
    }

    #[test]
    fn reserved_spi_duplicate_name_and_bad_key() {
        let db = SaDb::new(4);
        assert_eq!(
            db.install(
                params("a", Direction::In, 255, "203.0.113.1"),
                &SoftwareProvider,
                0
            ),
            Err(SadbError::ReservedSpi(255))
        );
        db.install(
            params("a", Direction::In, 256, "203.0.113.1"),
            &SoftwareProvider,
            0,
        )
        .unwrap();
        assert_eq!(
            db.install(
                params("a", Direction::In, 257, "203.0.113.1"),
                &SoftwareProvider,
                0
            ),
            Err(SadbError::DuplicateName("a".into()))
        );
        let mut p = params("k", Direction::In, 258, "203.0.113.1");
        p.keys = SaKeys::new(&[1u8; 16], &[]);
        assert!(matches!(
            db.install(p, &SoftwareProvider, 0),
            Err(SadbError::Crypto(_))
        ));
        assert_eq!(db.len(), 1);
    }

    #[test]
    fn churn_rebuilds_the_index_and_keeps_every_lookup_right() {
        let db = SaDb::new(64);
        let mut live: Vec<(u32, SaId)> = Vec::new();
        for round in 0..2000u32 {
            let spi = 0x1000 + round;
            let id = db
                .install(
                    params(&format!("sa{round}"), Direction::In, spi, "203.0.113.1"),
                    &SoftwareProvider,
                    0,
                )
                .unwrap();
            live.push((spi, id));
            if live.len() > 40 {
                let (_, old) = live.remove((round as usize * 7) % live.len());
                db.remove(old).unwrap();
            }
            if round % 97 == 0 {
                let g = epoch::pin();
                for (spi, id) in &live {
                    assert_eq!(
                        db.lookup_inbound(*spi, ip("203.0.113.1"), &g).map(|s| s.id),
                        Some(*id)
                    );
                }
                assert!(db.lookup_inbound(0x0FFF, ip("203.0.113.1"), &g).is_none());
            }
        }
        assert_eq!(db.len(), live.len());
    }

    #[test]
    fn readers_never_see_a_wrong_sa_while_writers_churn() {
        let db = Arc::new(SaDb::new(256));
        // A stable SA that must always be found.
        let stable = db
            .install(
                params("stable", Direction::In, 0x5000, "203.0.113.1"),
                &SoftwareProvider,
                0,
            )
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (db, stop) = (Arc::clone(&db), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut hits = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let g = epoch::pin();
                        let s = db.lookup_inbound(0x5000, ip("203.0.113.1"), &g);
                        assert_eq!(s.map(|s| s.id), Some(stable));
                        for spi in 0x6000..0x6010u32 {
                            if let Some(sa) = db.lookup_inbound(spi, ip("203.0.113.1"), &g) {
                                assert_eq!(sa.spi, spi);
                                hits += 1;
                            }
                        }
                    }
                    hits
                })
            })
            .collect();
        for round in 0..3000u32 {
            let spi = 0x6000 + (round % 16);
            let name = format!("churn{round}");
            if let Ok(id) = db.install(
                params(&name, Direction::In, spi, "203.0.113.1"),
                &SoftwareProvider,
                0,
            ) {
                db.remove(id).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(db.len(), 1);
    }

    #[test]
    fn lifetimes_raise_soft_then_hard_once() {
        let db = SaDb::new(4);
        let mut p = params("a", Direction::Out, 0x1000, "203.0.113.1");
        p.lifetime = Lifetime {
            soft_packets: Some(10),
            hard_packets: Some(20),
            soft_seconds: Some(100),
            hard_seconds: Some(120),
            ..Lifetime::default()
        };
        let id = db.install(p, &SoftwareProvider, 1_000).unwrap();
        let g = epoch::pin();
        let sa = db.get(id, &g).unwrap();
        let sink = db.event_sink();
        let run = RunCounts {
            packets: 6,
            bytes: 600,
            esp_bytes: 700,
        };
        sa.flush(&run, 2_000, &sink);
        assert!(db.drain_events().is_empty());
        sa.flush(&run, 3_000, &sink);
        let ev = db.drain_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].kind,
            EventKind::SoftExpired {
                limit: Limit::Packets
            }
        );
        sa.flush(&run, 4_000, &sink);
        assert!(db.drain_events().is_empty(), "soft is signalled once");
        // 18 used: two more allowed, the third would cross the hard limit.
        let pending = RunCounts {
            packets: 1,
            bytes: 0,
            esp_bytes: 0,
        };
        assert!(sa.within_hard_limits(&RunCounts::default(), 0, 5_000));
        assert!(!sa.within_hard_limits(
            &RunCounts {
                packets: 2,
                ..pending
            },
            0,
            5_000
        ));
        sa.flush(&run, 5_000, &sink);
        let ev = db.drain_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].kind,
            EventKind::HardExpired {
                limit: Limit::Packets
            }
        );
        assert!(sa.is_dead());
        // Age: the sweep reports seconds limits of idle SAs too (once each; already dead here).
        let mut p = params("b", Direction::In, 0x1001, "203.0.113.1");
        p.lifetime = Lifetime {
            soft_seconds: Some(100),
            hard_seconds: Some(120),
            ..Lifetime::default()
        };
        db.install(p, &SoftwareProvider, 0).unwrap();
        db.sweep(99_000_000_000);
        assert!(db.drain_events().is_empty());
        db.sweep(100_000_000_000);
        // Only b: a has already signalled soft and hard, and each is signalled once.
        let ev = db.drain_events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].spi, ev[0].kind),
            (
                0x1001,
                EventKind::SoftExpired {
                    limit: Limit::Seconds
                }
            )
        );
        db.sweep(121_000_000_000);
        let ev = db.drain_events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].spi, ev[0].kind),
            (
                0x1001,
                EventKind::HardExpired {
                    limit: Limit::Seconds
                }
            )
        );
    }

    #[test]
    fn sequence_numbers_never_wrap() {
        let db = SaDb::new(4);
        let mut p = params("a", Direction::Out, 0x1000, "203.0.113.1");
        p.initial_seq = u64::from(u32::MAX) - 5;
        let id = db.install(p, &SoftwareProvider, 0).unwrap();
        let g = epoch::pin();
        let sa = db.get(id, &g).unwrap();
        let sink = db.event_sink();
        assert_eq!(sa.reserve_seq(3, 0, &sink), (u64::from(u32::MAX) - 4, 3));
        let ev: Vec<_> = db.drain_events().iter().map(|e| e.kind).collect();
        assert_eq!(
            ev,
            [
                EventKind::SeqNearExhaustion,
                EventKind::SoftExpired {
                    limit: Limit::SequenceNumber
                }
            ],
            "warnings near exhaustion"
        );
        // 2 left: a request for 10 gets 2, ending exactly at 2^32-1.
        assert_eq!(sa.reserve_seq(10, 0, &sink), (u64::from(u32::MAX) - 1, 2));
        assert_eq!(sa.last_seq(), u64::from(u32::MAX));
        assert_eq!(sa.reserve_seq(1, 0, &sink).1, 0);
        assert!(sa.is_dead());
        let ev = db.drain_events();
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e.kind, EventKind::HardExpired { .. }))
                .count(),
            1
        );
    }
}
