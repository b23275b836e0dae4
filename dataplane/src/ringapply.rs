//! The data plane's side of the SA ring (`espgw-ring`): the [`Applier`] owns the shared-memory
//! segment, applies the control process's commands to the [`SaDb`] and sends back one
//! `Applied`/`Rejected` per command, the counters asked for, and the SAs' lifetime events.
//!
//! Semantics (see also `control/ring/README.md`, *Generations, resync and idempotent records*):
//!
//! * **AddSa** is converted to [`SaParams`] and checked (the record's own checks — key lengths,
//!   one address family, selectors — run when it is decoded; the applier adds lifetimes, outer
//!   addresses and ports); a bad record is `Rejected` with a sentence, never a panic.
//!   An SA that is already installed with the same `(direction, SPI, generation)` and the same
//!   identity is `Applied` without a second install (a record re-read after a consumer crash).
//!   The same SA with *another* generation and the same identity is **adopted**: it takes the
//!   new generation and keeps its sequence counter, replay window and counters (a resync).
//!   *Identity* is everything but the generation, `initial_seq` and what an update may change
//!   (peer address, UDP ports, lifetimes): in both cases the record's peer and lifetimes are
//!   applied as an update would, so a re-push carries any update the data plane missed.
//!   Anything else that collides (same name or inbound SPI) is `Rejected` with the SA
//!   database's reason: delete the old SA first.
//! * **DeleteSa** of an SA that is not there (or not with that generation) is `Applied`: it is
//!   already gone, and a stale delete never touches a newer SA. A policy that protects with a
//!   deleted SA stays in the applier's table but becomes *discard* in the SPD (fail closed)
//!   until an SA of that name is added again.
//! * **UpdateSa** changes an installed SA's peer address, UDP ports and lifetimes in place
//!   ([`SaDb::update`]): keys, sequence numbers, replay window and counters stay, workers see
//!   the new peer from their next burst (it is an `arc_swap` pointer; nothing waits). The
//!   address family and "UDP-encapsulated or not" cannot change (`Rejected`: rekey instead).
//!   Limits still count from the installation; one already crossed is reported at once.
//! * **AddPolicy** replaces the policy with the same id (unless the installed one has a newer
//!   generation); the SPD is rebuilt and swapped in as a whole: the policies that were in the
//!   SPD when the applier started (the configuration file's) first, in their order, then the
//!   ring's ordered by `(priority, policy_id)`. A protect policy must name an installed
//!   outbound SA. Inbound policies are `Rejected`: this data plane checks inbound traffic
//!   against the inbound SA's selectors only.
//! * **DeletePolicy** of an absent policy, or with another generation, is `Applied` (no effect).
//! * **Flush{older_than}** removes the ring's SAs and policies with a generation below the
//!   bound (never the configuration file's SAs). **Resync** is acknowledged.
//! * **QueryCounters** answers one `CountersReply` per SA (the ring's SAs only: the file's SAs
//!   have no generation), then `Applied`; an unknown SA is `Rejected` ("no such SA").
//! * Events from [`SaDb::drain_events`] become `SoftExpired`/`HardExpired`,
//!   `SeqNearExhaustion` (just before the soft expiry for the sequence number),
//!   `FirstPacket` (inbound SA, first authenticated packet), `Idle` (no packet for
//!   `idle_seconds`, once per idle period) and `NatMappingChanged` (an authenticated
//!   ESP-in-UDP packet from another address or port than the SA's peer, once per new
//!   mapping); [`SaDb::drain_unknown_spi`] gives `UnknownSpi` (at most
//!   [`crate::sadb::UNKNOWN_SPI_REPORTS_PER_SECOND`] a second, with the outer addresses and
//!   ports). Events of the configuration file's SAs are not sent (nobody to tell). When the
//!   event ring is full they are counted as lost (the ring's `dropped` counter and
//!   [`Applier::events_lost`]) and the applier goes on. Answers to commands are never dropped:
//!   they wait in a small queue and the applier reads no further command until they are out
//!   (back-pressure on the control process rather than lost answers).

use crate::counters::DropReason;
use crate::policy::{self, Action, Policy, Prefix, Spd};
use crate::sa::{
    self, DfMode, Direction, DscpMode, EcnMode, Event, EventKind, Lifetime, Mode, SaId, SaParams,
};
use crate::sadb::SaDb;
use espgw_crypto::{AeadAlg, CipherAlg, CryptoProvider, SaKeys, Transform};
use espgw_ring::record;
use espgw_ring::{
    Consumer, PolicyAction, PolicySpec, Producer, PushError, Record, RingError, RingParams,
    SaCounters, SaRef, SaSpec, SaUpdate, Segment, SegmentError,
};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

/// The applier's tables, keyed by what the control process sent: foldhash (seeded per process)
/// instead of SipHash, which was a visible share of an install.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Most commands one [`Applier::poll`] handles, so a flood never starves the caller.
pub const MAX_RECORDS_PER_POLL: usize = 256;

/// Why the applier could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApplierError {
    /// The segment could not be created.
    #[error("SA ring {path}: {source}")]
    Segment {
        /// Where.
        path: PathBuf,
        /// Why.
        source: SegmentError,
    },
    /// The rings could not be opened.
    #[error("SA ring {path}: {source}")]
    Ring {
        /// Where.
        path: PathBuf,
        /// Why.
        source: RingError,
    },
}

/// Called with every lifetime event the applier takes from the SA database (the live gateway
/// logs them).
pub type EventHook = Box<dyn FnMut(&Event) + Send>;

struct InstalledSa {
    id: SaId,
    name: String,
    fingerprint: u64,
}

/// The ring's SAs by (direction, SPI), each with the generations installed under it: usually
/// one, two while a rekey or a resync reuses an SPI. One probe of one table per command (a
/// separate map of generations per SPI cost a second random miss per install at 10^6 SAs), and
/// the first generation inline, so that most SPIs cost no allocation of their own.
#[derive(Default)]
struct SaTable {
    by_spi: FastMap<(record::Direction, u32), Gens>,
    len: usize,
}

/// The generations under one SPI; never empty (the entry goes with its last generation).
struct Gens {
    first: (u64, InstalledSa),
    rest: Vec<(u64, InstalledSa)>,
}

impl Gens {
    fn iter(&self) -> impl Iterator<Item = &(u64, InstalledSa)> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }
}

impl SaTable {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, r: &SaRef) -> Option<&InstalledSa> {
        self.generations(r.direction, r.spi)
            .find(|(g, _)| *g == r.generation)
            .map(|(_, s)| s)
    }

    /// Adds or replaces the SA under `r`.
    fn insert(&mut self, r: SaRef, sa: InstalledSa) {
        match self.by_spi.entry((r.direction, r.spi)) {
            Entry::Vacant(v) => {
                v.insert(Gens {
                    first: (r.generation, sa),
                    rest: Vec::new(),
                });
                self.len += 1;
            }
            Entry::Occupied(mut o) => {
                let gens = o.get_mut();
                if gens.first.0 == r.generation {
                    gens.first.1 = sa;
                } else if let Some(x) = gens.rest.iter_mut().find(|x| x.0 == r.generation) {
                    x.1 = sa;
                } else {
                    gens.rest.push((r.generation, sa));
                    self.len += 1;
                }
            }
        }
    }

    fn remove(&mut self, r: &SaRef) -> Option<InstalledSa> {
        let Entry::Occupied(mut o) = self.by_spi.entry((r.direction, r.spi)) else {
            return None;
        };
        let sa = if o.get().first.0 == r.generation {
            if o.get().rest.is_empty() {
                o.remove().first.1
            } else {
                let gens = o.get_mut();
                let next = gens.rest.swap_remove(0);
                std::mem::replace(&mut gens.first, next).1
            }
        } else {
            let gens = o.get_mut();
            let at = gens.rest.iter().position(|x| x.0 == r.generation)?;
            gens.rest.swap_remove(at).1
        };
        self.len -= 1;
        Some(sa)
    }

    /// The generations installed under (direction, SPI), with their SAs.
    fn generations(
        &self,
        direction: record::Direction,
        spi: u32,
    ) -> impl Iterator<Item = (u64, &InstalledSa)> {
        self.by_spi
            .get(&(direction, spi))
            .into_iter()
            .flat_map(Gens::iter)
            .map(|(g, s)| (*g, s))
    }

    fn iter(&self) -> impl Iterator<Item = (SaRef, &InstalledSa)> {
        self.by_spi.iter().flat_map(|(&(direction, spi), gens)| {
            gens.iter().map(move |(g, s)| {
                (
                    SaRef {
                        direction,
                        spi,
                        generation: *g,
                    },
                    s,
                )
            })
        })
    }
}

/// What the commands change: the SAs and policies the ring installed.
struct State {
    db: Arc<SaDb>,
    provider: Arc<dyn CryptoProvider>,
    sas: SaTable,
    policies: BTreeMap<u32, PolicySpec>,
    /// How many of `policies` protect with each SA name (so that adding or deleting an SA does
    /// not scan every policy).
    protecting: FastMap<String, u32>,
    /// The SPD's policies when the applier started (the configuration file's).
    base: Spd,
    /// The SAs installed when the applier started (the configuration file's), by name.
    file_sas: HashMap<String, (SaId, Direction)>,
    hasher: std::collections::hash_map::RandomState,
    /// A policy or protected SA changed since the SPD was last published: publish before the
    /// next answer leaves (so `Applied` still means in effect) and before an SA leaves the
    /// database. One SPD per poll instead of one per command: a bulk push of n policies no
    /// longer rebuilds an n-policy SPD n times.
    spd_dirty: bool,
    /// SPDs published (for tests and diagnostics).
    spd_swaps: u64,
}

struct Ends {
    commands: Consumer,
    events: Producer,
    segment: Segment,
}

/// The data plane's end of the SA ring: owns the segment, applies commands, sends events.
pub struct Applier {
    path: PathBuf,
    params: RingParams,
    /// `None` only after a corrupt segment could not be recreated (retried at every poll).
    ring: Option<Ends>,
    outbox: VecDeque<Record>,
    state: State,
    events_lost: u64,
    hook: Option<EventHook>,
    /// When to try again to create a segment that could not be recreated.
    reopen_at_ns: u64,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("path", &self.path)
            .field("sas", &self.state.sas.len())
            .field("policies", &self.state.policies.len())
            .field("events_lost", &self.events_lost)
            .finish_non_exhaustive()
    }
}

impl Applier {
    /// Creates the segment at `path` (default sizes; a stale file is replaced) and an applier
    /// for `db`. The policies now in `db`'s SPD stay in front of the ring's.
    pub fn new(
        path: impl AsRef<Path>,
        db: Arc<SaDb>,
        provider: Arc<dyn CryptoProvider>,
    ) -> Result<Applier, ApplierError> {
        Self::with_params(path, RingParams::default(), db, provider)
    }

    /// [`Applier::new`] with explicit ring sizes.
    pub fn with_params(
        path: impl AsRef<Path>,
        params: RingParams,
        db: Arc<SaDb>,
        provider: Arc<dyn CryptoProvider>,
    ) -> Result<Applier, ApplierError> {
        let path = path.as_ref().to_path_buf();
        let ring = open(&path, params)?;
        let (base, file_sas) = {
            let guard = crossbeam_epoch::pin();
            let sas = db
                .iter(&guard)
                .map(|sa| (sa.name.clone(), (sa.id, sa.direction)))
                .collect();
            (db.spd(&guard).cloned().unwrap_or_default(), sas)
        };
        Ok(Applier {
            path,
            params,
            ring: Some(ring),
            outbox: VecDeque::new(),
            state: State {
                db,
                provider,
                sas: SaTable::default(),
                policies: BTreeMap::new(),
                protecting: FastMap::default(),
                base,
                file_sas,
                hasher: std::collections::hash_map::RandomState::new(),
                spd_dirty: false,
                spd_swaps: 0,
            },
            events_lost: 0,
            hook: None,
            reopen_at_ns: 0,
        })
    }

    /// Calls `hook` for every lifetime event taken from the SA database.
    pub fn set_event_hook(&mut self, hook: EventHook) {
        self.hook = Some(hook);
    }

    /// The segment (for its path and data-plane generation); `None` while a corrupt segment
    /// could not be recreated.
    pub fn segment(&self) -> Option<&Segment> {
        self.ring.as_ref().map(|r| &r.segment)
    }

    /// Lifetime events that could not be queued because the event ring was full.
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// SAs installed through the ring.
    pub fn sa_count(&self) -> usize {
        self.state.sas.len()
    }

    /// SPDs the applier has published since it started.
    pub fn spd_swaps(&self) -> u64 {
        self.state.spd_swaps
    }

    /// The SA database handle of an SA installed through the ring.
    pub fn sa_id(&self, sa: &SaRef) -> Option<SaId> {
        self.state.sas.get(sa).map(|s| s.id)
    }

    /// Sends pending answers and lifetime events, then applies up to
    /// [`MAX_RECORDS_PER_POLL`] commands. Returns how many commands it handled. Never blocks.
    pub fn poll(&mut self, now_ns: u64) -> usize {
        if self.ring.is_none() && now_ns >= self.reopen_at_ns {
            // At most once a second (each failure is logged).
            self.reopen_at_ns = now_ns.saturating_add(1_000_000_000);
            self.reopen();
        }
        self.forward_events();
        let mut handled = 0;
        // Answers go out as commands are applied, except while an SPD change is pending: then
        // they wait for the end of the poll, where the SPD is published once before them.
        while handled < MAX_RECORDS_PER_POLL && (self.state.spd_dirty || self.flush_outbox()) {
            let Some(ring) = self.ring.as_mut() else {
                break;
            };
            let pending = match ring.commands.peek() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    self.recreate(&e);
                    break;
                }
            };
            let seq = pending.seq();
            match pending.record() {
                Ok(rec) => self.state.apply(rec, seq, now_ns, &mut self.outbox),
                Err(e) => self.outbox.push_back(Record::rejected(seq, e)),
            }
            pending.commit();
            handled += 1;
        }
        self.flush_outbox();
        handled
    }

    /// Publishes a pending SPD, then pushes queued answers; true when the queue is empty.
    fn flush_outbox(&mut self) -> bool {
        if self.state.spd_dirty {
            self.state.rebuild_spd();
        }
        while let Some(rec) = self.outbox.front() {
            let Some(ring) = self.ring.as_mut() else {
                return false;
            };
            match ring.events.try_push(rec) {
                Ok(_) => {
                    self.outbox.pop_front();
                }
                Err(PushError::Full) => return false,
                Err(PushError::Ring(e)) => {
                    self.recreate(&e);
                    return self.outbox.is_empty();
                }
                Err(e) => {
                    // Cannot happen for the records the applier builds; never loop on it.
                    tracing::error!("SA ring: answer not sent: {e}");
                    self.outbox.pop_front();
                }
            }
        }
        true
    }

    fn forward_events(&mut self) {
        for e in self.state.db.drain_events() {
            if let Some(hook) = self.hook.as_mut() {
                hook(&e);
            }
            let Some(sa) = self.state.sa_ref_of(e.sa) else {
                continue; // an SA of the configuration file: nobody to tell
            };
            let limit = |l: sa::Limit| match l {
                sa::Limit::Bytes => record::Limit::Bytes,
                sa::Limit::Packets => record::Limit::Packets,
                sa::Limit::Seconds => record::Limit::Seconds,
                sa::Limit::SequenceNumber => record::Limit::SequenceNumber,
            };
            let rec = match e.kind {
                EventKind::SoftExpired { limit: l } => Record::SoftExpired {
                    sa,
                    limit: limit(l),
                },
                EventKind::HardExpired { limit: l } => Record::HardExpired {
                    sa,
                    limit: limit(l),
                },
                EventKind::SeqNearExhaustion => Record::SeqNearExhaustion { sa },
                EventKind::FirstPacket => Record::FirstPacket { sa },
                EventKind::Idle { seconds } => Record::Idle {
                    sa,
                    seconds: u32::try_from(seconds).unwrap_or(u32::MAX),
                },
                EventKind::NatMappingChanged { src, sport } => Record::NatMappingChanged {
                    sa,
                    src,
                    src_port: sport,
                },
            };
            self.send_event(&rec);
        }
        for u in self.state.db.drain_unknown_spi() {
            self.send_event(&Record::UnknownSpi {
                spi: u.spi,
                src: u.src,
                dst: u.dst,
                src_port: u.sport,
                dst_port: u.dport,
            });
        }
    }

    /// Sends an event unless answers are waiting or the ring is full (then it is lost, counted).
    fn send_event(&mut self, rec: &Record) {
        // Answers first: an event never overtakes a queued answer, and a full ring loses the
        // event, not the answer.
        if !self.outbox.is_empty() {
            self.lose_event();
            return;
        }
        let Some(ring) = self.ring.as_mut() else {
            self.lose_event();
            return;
        };
        match ring.events.try_push(rec) {
            Ok(_) => {}
            Err(PushError::Full) => self.lose_event(),
            Err(e) => {
                tracing::warn!("SA ring: event not sent: {e}");
                self.lose_event();
            }
        }
    }

    fn lose_event(&mut self) {
        self.events_lost += 1;
        if let Some(ring) = &self.ring {
            ring.events.count_dropped(1);
        }
    }

    /// The ring's indices are impossible: start a new segment (new data-plane generation; the
    /// control process notices and re-pushes everything).
    fn recreate(&mut self, why: &RingError) {
        tracing::error!(path = %self.path.display(), "SA ring corrupt ({why}); recreating it");
        self.outbox.clear();
        // Unmap the old segment (and release its lock) before creating the new file.
        self.ring = None;
        self.reopen();
    }

    fn reopen(&mut self) {
        match open(&self.path, self.params) {
            Ok(ring) => self.ring = Some(ring),
            Err(e) => tracing::error!("SA ring: {e}"),
        }
    }
}

fn open(path: &Path, params: RingParams) -> Result<Ends, ApplierError> {
    let segment = Segment::create(path, params).map_err(|source| ApplierError::Segment {
        path: path.to_path_buf(),
        source,
    })?;
    let ring_err = |source| ApplierError::Ring {
        path: path.to_path_buf(),
        source,
    };
    let commands = segment.receiver().map_err(ring_err)?;
    let events = segment.sender().map_err(ring_err)?;
    Ok(Ends {
        commands,
        events,
        segment,
    })
}

impl State {
    /// Applies one command; queues the replies in `out`, the last being `Applied` or
    /// `Rejected`.
    fn apply(&mut self, rec: &Record, seq: u64, now_ns: u64, out: &mut VecDeque<Record>) {
        let result = match rec {
            Record::AddSa(spec) => self.add_sa(spec, now_ns),
            Record::UpdateSa(u) => self.update_sa(u, now_ns),
            Record::DeleteSa(sa) => {
                self.delete_sa(sa);
                Ok(())
            }
            Record::AddPolicy(p) => self.add_policy(p),
            Record::DeletePolicy {
                policy_id,
                generation,
            } => {
                if self
                    .policies
                    .get(policy_id)
                    .is_some_and(|p| p.generation == *generation)
                {
                    self.remove_policy(*policy_id);
                    self.spd_dirty = true;
                }
                Ok(())
            }
            Record::Flush { older_than } => {
                self.flush(*older_than);
                Ok(())
            }
            Record::QueryCounters { sa } => self.counters(sa.as_ref(), out),
            Record::Resync { generation } => {
                tracing::info!(generation, "SA ring: resync begins");
                Ok(())
            }
            other => Err(format!(
                "{} records travel from the data plane, not to it",
                other.kind()
            )),
        };
        out.push_back(match result {
            Ok(()) => Record::Applied { seq },
            Err(reason) => Record::rejected(seq, reason),
        });
    }

    /// A keyed hash of the SA's identity: everything but the generation, the initial sequence
    /// number and what an `UpdateSa` may change (peer address, UDP ports, lifetimes). The
    /// fields are hashed straight from the record (no copy of the keys); the destructuring
    /// names every field, so a field added to `SaSpec` must be placed on one side or the other.
    fn fingerprint(&self, spec: &SaSpec) -> u64 {
        use std::hash::{Hash, Hasher};
        let SaSpec {
            generation: _,
            spi,
            direction,
            mode,
            reqid,
            name,
            local,
            remote: _,
            encap,
            enc_alg,
            integ_alg,
            enc_key,
            salt,
            integ_key,
            icv_len,
            esn,
            initial_seq: _,
            replay_window,
            lifetime: _,
            selectors,
            df,
            dscp,
            ecn,
            outer_ttl,
        } = spec;
        let mut h = self.hasher.build_hasher();
        (spi, direction, mode, reqid, name, local).hash(&mut h);
        encap.is_some().hash(&mut h);
        (enc_alg, integ_alg, icv_len, esn, replay_window).hash(&mut h);
        for k in [enc_key, salt, integ_key] {
            k.as_bytes().hash(&mut h);
        }
        (selectors, df, dscp, ecn, outer_ttl).hash(&mut h);
        h.finish()
    }

    fn add_sa(&mut self, spec: &SaSpec, now_ns: u64) -> Result<(), String> {
        let r = spec.sa_ref();
        let fp = self.fingerprint(spec);
        if let Some(existing) = self.sas.get(&r) {
            return if existing.fingerprint == fp {
                // The same record again (read twice after a crash): its peer and limits are
                // absolute values, setting them again is harmless.
                self.set_mutable(
                    existing.id,
                    spec.spi,
                    spec.remote,
                    spec.encap,
                    &spec.lifetime,
                    now_ns,
                )
            } else {
                Err(format!(
                    "{} is already installed with other parameters; delete it first",
                    sa_words(&r)
                ))
            };
        }
        // Adoption: the same SA re-pushed with a new generation (a resync).
        let same = self
            .sas
            .generations(r.direction, r.spi)
            .find(|(_, s)| s.fingerprint == fp)
            .map(|(g, _)| g);
        if let Some(g) = same {
            let old = SaRef { generation: g, ..r };
            if let Some(sa) = self.sas.remove(&old) {
                self.sas.insert(r, sa);
            }
            // The re-pushed peer and limits win (the control process may have updated them
            // while the data plane could not hear it).
            return match self.sas.get(&r) {
                Some(sa) => self.set_mutable(
                    sa.id,
                    spec.spi,
                    spec.remote,
                    spec.encap,
                    &spec.lifetime,
                    now_ns,
                ),
                None => Ok(()),
            };
        }
        let params = sa_params(spec)?;
        let id = self
            .db
            .install(params, self.provider.as_ref(), now_ns)
            .map_err(|e| e.to_string())?; // names the SPI or the name already; ≤ 96 bytes
        self.sas.insert(
            r,
            InstalledSa {
                id,
                name: spec.name.clone(),
                fingerprint: fp,
            },
        );
        if r.direction == record::Direction::Out && self.protects_with(&spec.name) {
            self.spd_dirty = true;
        }
        Ok(())
    }

    /// A new peer address/ports and limits for an installed SA, in place (keys, sequence
    /// numbers, replay window and counters stay). Absolute values, so applying it twice is
    /// harmless.
    fn update_sa(&mut self, u: &SaUpdate, now_ns: u64) -> Result<(), String> {
        let Some(sa) = self.sas.get(&u.sa) else {
            return Err(format!("no such SA: {}", sa_words(&u.sa)));
        };
        let who = sa_words(&u.sa);
        check_addr(&who, "remote", u.remote)?;
        if let Some(e) = u.encap
            && (e.local_port == 0 || e.remote_port == 0)
        {
            return Err(format!("{who}: UDP encapsulation with port 0"));
        }
        self.set_mutable(sa.id, u.sa.spi, u.remote, u.encap, &u.lifetime, now_ns)
    }

    /// Sets an installed SA's peer address, UDP ports and limits (from an `UpdateSa`, or from
    /// an `AddSa` that re-pushes an installed SA).
    fn set_mutable(
        &self,
        id: SaId,
        spi: u32,
        remote: IpAddr,
        encap: Option<record::UdpEncap>,
        limits: &record::Lifetimes,
        now_ns: u64,
    ) -> Result<(), String> {
        let peer = sa::Peer {
            remote,
            encap: encap.map(|e| sa::UdpEncap {
                sport: e.local_port,
                dport: e.remote_port,
            }),
        };
        self.db
            .update(id, peer, lifetime(limits), now_ns)
            .map_err(|e| format!("SA {spi:#010x}: {e}"))
    }

    fn protects_with(&self, name: &str) -> bool {
        self.protecting.get(name).is_some_and(|n| *n > 0)
    }

    /// Adds or replaces a policy, keeping `protecting` in step.
    fn insert_policy(&mut self, p: PolicySpec) {
        self.remove_policy(p.policy_id);
        if let PolicyAction::Protect { sa_name } = &p.action {
            *self.protecting.entry(sa_name.clone()).or_default() += 1;
        }
        self.policies.insert(p.policy_id, p);
    }

    /// Removes a policy (absent: nothing to do), keeping `protecting` in step.
    fn remove_policy(&mut self, policy_id: u32) {
        if let Some(PolicySpec {
            action: PolicyAction::Protect { sa_name },
            ..
        }) = self.policies.remove(&policy_id)
            && let Some(n) = self.protecting.get_mut(&sa_name)
        {
            *n -= 1;
            if *n == 0 {
                self.protecting.remove(&sa_name);
            }
        }
    }

    /// Removes an SA installed through the ring (absent: nothing to do).
    fn delete_sa(&mut self, r: &SaRef) {
        let Some(sa) = self.sas.remove(r) else {
            return;
        };
        // The SPD first, so no new packet picks the SA up; then the SA (its keys are zeroized
        // once the workers have left their current burst). A pending SPD change is published
        // too: the published SPD may still name the SA through a policy deleted in this poll.
        if self.spd_dirty || self.protects_with(&sa.name) {
            self.rebuild_spd();
        }
        self.remove_from_db(&sa);
    }

    fn remove_from_db(&self, sa: &InstalledSa) {
        if let Err(e) = self.db.remove(sa.id) {
            tracing::warn!(sa = %sa.name, "SA ring: removing the SA: {e}");
        }
    }

    /// The ring's name of an SA in the database (`None` for the configuration file's SAs, and
    /// for an SA already deleted): its direction and SPI from the SA itself, the generation
    /// from the few installed under that SPI. Only for events, which are rare; installs do not
    /// pay for a map from database handle to ring name.
    fn sa_ref_of(&self, id: SaId) -> Option<SaRef> {
        let guard = crossbeam_epoch::pin();
        let sa = self.db.get(id, &guard)?;
        let direction = match sa.direction {
            Direction::In => record::Direction::In,
            Direction::Out => record::Direction::Out,
        };
        let spi = sa.spi;
        self.sas
            .generations(direction, spi)
            .find(|(_, s)| s.id == id)
            .map(|(generation, _)| SaRef {
                direction,
                spi,
                generation,
            })
    }

    fn add_policy(&mut self, p: &PolicySpec) -> Result<(), String> {
        if p.direction == record::Direction::In {
            return Err(format!(
                "policy {}: inbound policies are not enforced here; put the selectors on the inbound SA",
                p.policy_id
            ));
        }
        if let Some(old) = self.policies.get(&p.policy_id)
            && old.generation > p.generation
        {
            return Err(format!(
                "policy {} is installed with newer generation {} (this record has {})",
                p.policy_id, old.generation, p.generation
            ));
        }
        if let PolicyAction::Protect { sa_name } = &p.action {
            // Names are unique in the SA database (the ring's SAs and the configuration
            // file's): find the SA by name and see whether it is outbound.
            let out = self.db.id_by_name(sa_name).is_some_and(|id| {
                let guard = crossbeam_epoch::pin();
                self.db
                    .get(id, &guard)
                    .is_some_and(|sa| sa.direction == Direction::Out)
            });
            if !out {
                return Err(format!(
                    "policy {}: no outbound SA named {sa_name:?} is installed; add the SA first",
                    p.policy_id
                ));
            }
        }
        self.insert_policy(p.clone());
        self.spd_dirty = true;
        Ok(())
    }

    fn flush(&mut self, older_than: u64) {
        let before = self.policies.len();
        let stale: Vec<u32> = self
            .policies
            .values()
            .filter(|p| p.generation < older_than)
            .map(|p| p.policy_id)
            .collect();
        for id in stale {
            self.remove_policy(id);
        }
        let old: Vec<SaRef> = self
            .sas
            .iter()
            .map(|(r, _)| r)
            .filter(|r| r.generation < older_than)
            .collect();
        let gone: Vec<InstalledSa> = old.iter().filter_map(|r| self.sas.remove(r)).collect();
        // One SPD for the whole flush, swapped in before any SA leaves the database.
        if self.spd_dirty
            || self.policies.len() != before
            || gone.iter().any(|sa| self.protects_with(&sa.name))
        {
            self.rebuild_spd();
        }
        for sa in &gone {
            self.remove_from_db(sa);
        }
    }

    /// The configuration file's policies, then the ring's by (priority, id); swapped in whole.
    fn rebuild_spd(&mut self) {
        self.spd_dirty = false;
        self.spd_swaps += 1;
        let mut ring: Vec<&PolicySpec> = self.policies.values().collect();
        ring.sort_by_key(|p| (p.priority, p.policy_id));
        let mut policies = self.base.policies().to_vec();
        for p in ring {
            let action = match &p.action {
                PolicyAction::Protect { sa_name } => match self.protecting_sa(sa_name) {
                    Some(id) => Action::Protect(id),
                    // The SA is gone: fail closed.
                    None => Action::Discard,
                },
                PolicyAction::Bypass => Action::Bypass,
                PolicyAction::Discard => Action::Discard,
            };
            policies.push(Policy {
                selector: selector(&p.selector),
                action,
            });
        }
        self.db
            .set_spd(Spd::new(policies, self.base.default_action));
    }

    /// The outbound SA a protect policy naming `sa_name` uses: a ring SA still in `sas` (one
    /// being deleted is gone from there already, though not yet from the database) or one of
    /// the configuration file's. Per policy through the database's name table, so that an SPD
    /// rebuild costs the number of policies, not the number of SAs.
    fn protecting_sa(&self, sa_name: &str) -> Option<SaId> {
        let id = self.db.id_by_name(sa_name)?;
        let ring_out = self
            .sa_ref_of(id)
            .is_some_and(|r| r.direction == record::Direction::Out);
        let file_out = matches!(self.file_sas.get(sa_name), Some((f, Direction::Out)) if *f == id);
        (ring_out || file_out).then_some(id)
    }

    fn counters(&self, sa: Option<&SaRef>, out: &mut VecDeque<Record>) -> Result<(), String> {
        let guard = crossbeam_epoch::pin();
        let one = |r: &SaRef, id: SaId| -> Option<Record> {
            let s = self.db.get(id, &guard)?;
            let drops = s.counters.drops.snapshot();
            Some(Record::CountersReply(SaCounters {
                sa: *r,
                packets: s
                    .counters
                    .packets
                    .load(std::sync::atomic::Ordering::Relaxed),
                bytes: s.counters.bytes.load(std::sync::atomic::Ordering::Relaxed),
                drops: drops.0.iter().sum(),
                replay_drops: drops.get(DropReason::Replay) + drops.get(DropReason::TooOld),
                auth_failures: drops.get(DropReason::AuthFailed),
                last_seq: match s.direction {
                    Direction::Out => s.last_seq(),
                    Direction::In => s.replay.top(),
                },
            }))
        };
        match sa {
            Some(r) => {
                let reply = self.sas.get(r).and_then(|s| one(r, s.id));
                match reply {
                    Some(rec) => out.push_back(rec),
                    None => return Err(format!("no such SA: {}", sa_words(r))),
                }
            }
            None => {
                let mut all: Vec<(SaRef, &InstalledSa)> = self.sas.iter().collect();
                all.sort_by_key(|(r, _)| (r.spi, r.generation, r.direction as u8));
                out.extend(all.into_iter().filter_map(|(r, s)| one(&r, s.id)));
            }
        }
        Ok(())
    }
}

/// "inbound SA 0x00001001 generation 7".
fn sa_words(r: &SaRef) -> String {
    let dir = match r.direction {
        record::Direction::In => "inbound",
        record::Direction::Out => "outbound",
    };
    format!("{dir} SA {:#010x} generation {}", r.spi, r.generation)
}

fn selector(s: &record::Selector) -> policy::Selector {
    policy::Selector {
        src: Prefix::new(s.src.addr, s.src.len),
        dst: Prefix::new(s.dst.addr, s.dst.len),
        protocol: (s.protocol != 0).then_some(s.protocol),
        src_ports: policy::PortRange {
            lo: s.src_ports.first,
            hi: s.src_ports.last,
        },
        dst_ports: policy::PortRange {
            lo: s.dst_ports.first,
            hi: s.dst_ports.last,
        },
    }
}

/// The ring's limits (0 = none) as the SA database's.
fn lifetime(l: &record::Lifetimes) -> Lifetime {
    let limit = |v: u64| (v != 0).then_some(v);
    Lifetime {
        soft_bytes: limit(l.soft_bytes),
        hard_bytes: limit(l.hard_bytes),
        soft_packets: limit(l.soft_packets),
        hard_packets: limit(l.hard_packets),
        soft_seconds: limit(l.soft_seconds),
        hard_seconds: limit(l.hard_seconds),
    }
}

/// `SA "name"` in a rejection reason.
#[derive(Clone, Copy)]
struct SaName<'a>(&'a str);

impl std::fmt::Display for SaName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SA {:?}", self.0)
    }
}

fn check_addr(who: &dyn std::fmt::Display, what: &str, a: IpAddr) -> Result<(), String> {
    let broadcast = matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
    if a.is_unspecified() || a.is_multicast() || broadcast {
        return Err(format!("{who}: {what} address {a} cannot carry ESP"));
    }
    Ok(())
}

/// A decoded `AddSa` as the SA database's parameters, with the checks decoding does not do.
pub fn sa_params(s: &SaSpec) -> Result<SaParams, String> {
    // Only formatted when a check fails: installing is the common case.
    let who = SaName(&s.name);
    check_addr(&who, "local", s.local)?;
    check_addr(&who, "remote", s.remote)?;
    if s.local.is_ipv4() != s.remote.is_ipv4() {
        return Err(format!(
            "{who}: local and remote addresses of different families"
        ));
    }
    if let Some(e) = s.encap
        && (e.local_port == 0 || e.remote_port == 0)
    {
        return Err(format!("{who}: UDP encapsulation with port 0"));
    }
    let l = &s.lifetime;
    for (what, soft, hard) in [
        ("seconds", l.soft_seconds, l.hard_seconds),
        ("bytes", l.soft_bytes, l.hard_bytes),
        ("packets", l.soft_packets, l.hard_packets),
    ] {
        if soft != 0 && hard != 0 && soft > hard {
            return Err(format!(
                "{who}: soft lifetime of {soft} {what} is above the hard one ({hard})"
            ));
        }
    }
    for sel in &s.selectors {
        if sel.src.addr.is_ipv4() != sel.dst.addr.is_ipv4() {
            return Err(format!("{who}: a selector mixes IPv4 and IPv6"));
        }
    }
    use record::{EncAlg, IntegAlg as RI};
    let integ = match s.integ_alg {
        RI::None => None,
        RI::HmacMd5_96 => Some(espgw_crypto::IntegAlg::HmacMd5_96),
        RI::HmacSha1_96 => Some(espgw_crypto::IntegAlg::HmacSha1_96),
        RI::HmacSha2_256_128 => Some(espgw_crypto::IntegAlg::HmacSha256_128),
        RI::HmacSha2_384_192 => Some(espgw_crypto::IntegAlg::HmacSha384_192),
        RI::HmacSha2_512_256 => Some(espgw_crypto::IntegAlg::HmacSha512_256),
    };
    let aead = |alg, icv_len| Transform::Aead { alg, icv_len };
    let cbc = |cipher| match integ {
        Some(integ) => Ok(Transform::CipherAuth { cipher, integ }),
        None => Err(format!("{who}: {} needs an integrity algorithm", s.enc_alg)),
    };
    let transform = match s.enc_alg {
        EncAlg::Aes128Gcm16 => aead(AeadAlg::Aes128Gcm, 16),
        EncAlg::Aes128Gcm12 => aead(AeadAlg::Aes128Gcm, 12),
        EncAlg::Aes128Gcm8 => aead(AeadAlg::Aes128Gcm, 8),
        EncAlg::Aes256Gcm16 => aead(AeadAlg::Aes256Gcm, 16),
        EncAlg::Aes256Gcm12 => aead(AeadAlg::Aes256Gcm, 12),
        EncAlg::Aes256Gcm8 => aead(AeadAlg::Aes256Gcm, 8),
        EncAlg::Aes128Cbc => cbc(CipherAlg::Aes128Cbc)?,
        EncAlg::Aes256Cbc => cbc(CipherAlg::Aes256Cbc)?,
        EncAlg::TripleDesCbc => cbc(CipherAlg::TripleDesCbc)?,
        EncAlg::Null => cbc(CipherAlg::Null)?,
    };
    if s.enc_alg.is_aead() && integ.is_some() {
        return Err(format!(
            "{who}: {} is combined mode and takes no integrity algorithm",
            s.enc_alg
        ));
    }
    if s.enc_key.len() != s.enc_alg.key_len() || s.salt.len() != s.enc_alg.salt_len() {
        return Err(format!(
            "{who}: {} needs a {}-byte key and a {}-byte salt, got {} and {}",
            s.enc_alg,
            s.enc_alg.key_len(),
            s.enc_alg.salt_len(),
            s.enc_key.len(),
            s.salt.len()
        ));
    }
    if s.integ_key.len() != s.integ_alg.key_len() {
        return Err(format!(
            "{who}: {} needs a {}-byte key, got {}",
            s.integ_alg,
            s.integ_alg.key_len(),
            s.integ_key.len()
        ));
    }
    // GCM: the AES key followed by the salt, as the crypto backend takes it.
    let mut enc = Zeroizing::new(Vec::with_capacity(s.enc_key.len() + s.salt.len()));
    enc.extend_from_slice(s.enc_key.as_bytes());
    enc.extend_from_slice(s.salt.as_bytes());
    let keys = SaKeys {
        enc,
        integ: Zeroizing::new(s.integ_key.as_bytes().to_vec()),
    };
    Ok(SaParams {
        name: s.name.clone(),
        direction: match s.direction {
            record::Direction::In => Direction::In,
            record::Direction::Out => Direction::Out,
        },
        spi: s.spi,
        mode: match s.mode {
            record::Mode::Tunnel => Mode::Tunnel,
            record::Mode::Transport => Mode::Transport,
        },
        local: s.local,
        remote: s.remote,
        encap: s.encap.map(|e| sa::UdpEncap {
            sport: e.local_port,
            dport: e.remote_port,
        }),
        transform,
        keys,
        esn: s.esn,
        replay_window: s.replay_window,
        initial_seq: s.initial_seq,
        lifetime: lifetime(l),
        selectors: s.selectors.iter().map(selector).collect(),
        df: match s.df {
            record::DfMode::Copy => DfMode::Copy,
            record::DfMode::Set => DfMode::Set,
            record::DfMode::Clear => DfMode::Clear,
        },
        dscp: match s.dscp {
            record::DscpMode::Copy => DscpMode::Copy,
            record::DscpMode::Set(v) => DscpMode::Set(v),
        },
        ecn: match s.ecn {
            record::EcnMode::Normal => EcnMode::Normal,
            record::EcnMode::Compat => EcnMode::Compat,
        },
        outer_ttl: s.outer_ttl,
        pad_align: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn installed(v: u64) -> InstalledSa {
        InstalledSa {
            id: SaId(v),
            name: format!("sa-{v}"),
            fingerprint: v,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(SaRef, u64),
        Remove(SaRef),
    }

    fn sa_ref() -> impl Strategy<Value = SaRef> {
        // Few SPIs and generations, so that SPIs collect several generations.
        (any::<bool>(), 0x1000u32..0x1004, 1u64..5).prop_map(|(out, spi, generation)| SaRef {
            direction: if out {
                record::Direction::Out
            } else {
                record::Direction::In
            },
            spi,
            generation,
        })
    }

    proptest! {
        /// `SaTable` behaves as a map from `SaRef` to the SA, whatever the order of inserts,
        /// replacements and removals within an SPI.
        #[test]
        fn sa_table_is_a_map_by_sa_ref(
            ops in prop::collection::vec(
                prop_oneof![
                    (sa_ref(), any::<u64>()).prop_map(|(r, v)| Op::Insert(r, v)),
                    sa_ref().prop_map(Op::Remove),
                ],
                1..200,
            )
        ) {
            let mut t = SaTable::default();
            let mut model: HashMap<SaRef, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(r, v) => {
                        t.insert(r, installed(v));
                        model.insert(r, v);
                    }
                    Op::Remove(r) => {
                        let got = t.remove(&r).map(|s| s.fingerprint);
                        prop_assert_eq!(got, model.remove(&r));
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                let mut all: Vec<(SaRef, u64)> = t.iter().map(|(r, s)| (r, s.fingerprint)).collect();
                let mut want: Vec<(SaRef, u64)> = model.iter().map(|(r, v)| (*r, *v)).collect();
                let key = |x: &(SaRef, u64)| (x.0.direction as u8, x.0.spi, x.0.generation);
                all.sort_by_key(key);
                want.sort_by_key(key);
                prop_assert_eq!(all, want);
                for (r, v) in &model {
                    prop_assert_eq!(t.get(r).map(|s| s.fingerprint), Some(*v));
                    prop_assert!(t.generations(r.direction, r.spi).any(|(g, _)| g == r.generation));
                }
            }
        }
    }
}
