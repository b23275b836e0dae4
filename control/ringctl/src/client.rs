//! [`Client`]: one data plane's SA ring seen from the control process, with the desired state
//! it re-pushes after a restart of either side.
//!
//! # Commands and answers
//!
//! Every command is pushed with a sequence number (its ring position); the data plane answers
//! each with exactly one `Applied{seq}` or `Rejected{seq, reason}`, in order, after any replies
//! the command caused (`CountersReply`s). [`Client::submit`]-style methods push and return a
//! [`Ticket`]; [`Client::wait`] reads the event ring until that ticket's answer arrives. The
//! blocking methods ([`Client::add_sa`], …) are submit + wait. Everything else that arrives
//! meanwhile (lifetime events, unknown SPIs, NAT changes, …) is queued for
//! [`Client::next_event`] / [`Client::drain_events`]; answers to commands nobody waits for any
//! more (an earlier control process's, or one that timed out) still update the desired state.
//!
//! # Desired state and generations
//!
//! The client remembers every SA and policy the data plane *applied*: an SA enters the state
//! when its `AddSa` is applied and leaves it when its `DeleteSa` is (or a `Flush` covers it).
//! Each install gets a fresh generation from a counter seeded with the wall clock in
//! nanoseconds at attach time and incremented per install, so a restarted control process
//! starts above everything its predecessor used; it is also raised above every generation the
//! data plane reports (`CountersReply`). SAs are named by their (unique) names across
//! resyncs: a resync gives every SA a new generation, and [`Client::resolve`] maps the
//! [`SaRef`]s of earlier generations (in events, or kept by the caller) to the SA.
//!
//! # Restarts
//!
//! * The data plane restarted: [`Client::ensure_current`] notices (the path names a new file),
//!   reattaches and calls [`Client::resync`].
//! * The control process restarted: [`Client::attach`], then [`Client::restore`] with the SAs
//!   and policies it wants; the data plane adopts SAs with identical content (they keep their
//!   counters and replay state) and the final `Flush` removes what was not re-pushed.
//!
//! A resync is `Resync{G}`, every SA (inbound first, then outbound) and then every policy with
//! new generations ≥ G, then `Flush{older_than: G}`, pipelined. Outbound SAs are re-pushed with
//! `initial_seq` = the last sequence number seen in counters + [`ClientOptions::restart_seq_skip`]:
//! a new data plane does not know how far the old one got, and reusing a sequence number with
//! the same key would reuse an AES-GCM nonce. (An adopted SA keeps its own counter.)

use espgw_ring::{
    Consumer, Direction, Lifetimes, PolicySpec, Producer, PushError, Received, Record, RingError,
    SaCounters, SaRef, SaSpec, SaUpdate, Segment, SegmentError, UdpEncap,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a waiting client checks that the data plane is still alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(100);
/// Most rejections a [`BulkReport`] or [`ResyncReport`] lists (the counts are complete).
const MAX_LISTED_REJECTIONS: usize = 16;

/// Timeouts and sizes of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long [`Client::attach`] retries while the segment does not exist yet or the data
    /// plane has not finished creating it.
    pub attach_timeout: Duration,
    /// How long to wait for the answer to a command (and, in the pipelined paths, for any
    /// answer while the window is full) before giving up with [`ClientError::Timeout`].
    pub command_timeout: Duration,
    /// Commands in flight during a resync.
    pub resync_window: usize,
    /// Added to an outbound SA's last known sequence number when it is re-pushed by a resync
    /// (see the module documentation). Default 2^24.
    pub restart_seq_skip: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            attach_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(5),
            resync_window: 1024,
            restart_seq_skip: 1 << 24,
        }
    }
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The segment could not be attached (not retryable: wrong owner, mode, magic, another
    /// control process attached, …).
    #[error("cannot attach to the SA ring: {0}")]
    Attach(SegmentError),
    /// The data plane did not create the segment in time.
    #[error("the data plane did not create {path} within {waited:?} (last: {last})")]
    AttachTimeout {
        /// The segment's path.
        path: PathBuf,
        /// How long we retried.
        waited: Duration,
        /// The last error.
        last: SegmentError,
    },
    /// The ring is unusable (corrupt indices: the data plane will recreate the segment).
    #[error("SA ring {path}: {source}")]
    Ring {
        /// The segment's path.
        path: PathBuf,
        /// The error.
        source: RingError,
    },
    /// A command could not be pushed (not encodable, or the ring stayed full).
    #[error("{what} cannot be sent to the data plane: {source}")]
    Push {
        /// The command.
        what: String,
        /// Why.
        source: PushError,
    },
    /// The data plane rejected a command.
    #[error("the data plane rejected {what}: {reason}")]
    Rejected {
        /// The command.
        what: String,
        /// Its sequence number.
        seq: u64,
        /// The data plane's reason.
        reason: String,
    },
    /// No answer in time (the data plane is alive but did not answer).
    #[error("no answer from the data plane to {what} within {timeout:?}")]
    Timeout {
        /// The command (or "any command" in the pipelined paths).
        what: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The data plane stopped or restarted while we waited; call [`Client::ensure_current`].
    #[error("the data plane behind {path} {why}; the outcome of {what} is unknown")]
    DataPlaneGone {
        /// The segment's path.
        path: PathBuf,
        /// "stopped" or "restarted".
        why: &'static str,
        /// The command that was in flight.
        what: String,
    },
    /// A caller's mistake (an SA or policy this client does not know, …).
    #[error("{0}")]
    Invalid(String),
}

/// Something the data plane reported that is not the answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An event record: `SoftExpired`, `HardExpired`, `SeqNearExhaustion`, `UnknownSpi`,
    /// `NatMappingChanged`, `FirstPacket` or `Idle` (`CountersReply` only when it answers
    /// nothing we asked for).
    Record(Record),
    /// The data plane could not queue this many events (its event ring was full): some events
    /// were missed; query the counters.
    Lost {
        /// Events lost since the last report.
        count: u64,
    },
    /// A slot of the event ring held no valid record.
    Malformed {
        /// Its sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
}

/// A command pushed and not yet waited for. Wait for it with [`Client::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "wait for the answer with Client::wait"]
pub struct Ticket {
    seq: u64,
    dp_generation: u64,
}

impl Ticket {
    /// The command's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// The outcome of [`Client::add_sas_pipelined`] / [`Client::delete_sas_pipelined`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BulkReport {
    /// Commands pushed.
    pub pushed: u64,
    /// Applied.
    pub applied: u64,
    /// Rejected.
    pub rejected: u64,
    /// The first few rejections: (command, reason).
    pub rejections: Vec<(String, String)>,
    /// From the first push to the last answer.
    pub seconds: f64,
}

/// The outcome of a resync.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResyncReport {
    /// The resync's generation `G`: everything re-pushed has a generation ≥ G.
    pub generation: u64,
    /// The data plane's generation (changes when the data plane restarts).
    pub dp_generation: u64,
    /// SAs re-pushed and applied.
    pub sas: u64,
    /// Policies re-pushed and applied.
    pub policies: u64,
    /// Re-pushed records the data plane rejected: (command, reason). Those SAs and policies
    /// are gone from the data plane (the final flush) and from the desired state.
    pub rejections: Vec<(String, String)>,
    /// Rejections in total.
    pub rejected: u64,
    /// How long it took.
    pub seconds: f64,
}

/// What [`Client::ensure_current`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// The data plane we are attached to is alive and current.
    Current,
    /// The data plane died and left its segment behind; no new one yet. Forwarding has
    /// stopped; call again later.
    DataPlaneDown,
    /// The data plane removed its segment (clean exit) or a new one is being created; call
    /// again later.
    Waiting(String),
    /// A new data plane: reattached and re-pushed the desired state.
    Resynced(ResyncReport),
}

/// One SA of the desired state.
#[derive(Debug, Clone)]
struct DesiredSa {
    spec: SaSpec,
    /// Generations this SA had before resyncs renumbered it.
    former: Vec<u64>,
    /// The last sequence number seen in its counters.
    last_seq: u64,
}

/// What a pushed command changes in the desired state once applied.
#[derive(Debug)]
enum Op {
    AddSa(Box<SaSpec>),
    UpdateSa {
        name: String,
        update: SaUpdate,
    },
    DeleteSa {
        name: String,
        generation: u64,
    },
    AddPolicy(Box<PolicySpec>),
    DeletePolicy {
        policy_id: u32,
        generation: u64,
    },
    Flush {
        older_than: u64,
    },
    /// QueryCounters and Resync: nothing to change.
    Nothing,
    /// A resync's re-push of an SA under a new generation.
    ReaddSa {
        name: String,
        generation: u64,
    },
    /// A resync's re-push of a policy.
    ReaddPolicy {
        policy_id: u32,
        generation: u64,
    },
}

/// Who wants a command's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiter {
    /// A caller holds a ticket: keep the answer in `answered`.
    Ticket,
    /// The running pipelined batch: count it in `tally`.
    Batch,
    /// Nobody any more (the caller timed out): only the desired state is updated.
    Nobody,
}

#[derive(Debug)]
struct Inflight {
    op: Op,
    what: String,
    waiter: Waiter,
}

type Answer = Result<Vec<SaCounters>, String>;

#[derive(Debug, Default)]
struct Tally {
    applied: u64,
    rejected: u64,
    rejections: Vec<(String, String)>,
}

struct Ends {
    segment: Segment,
    tx: Producer,
    rx: Consumer,
}

/// One data plane's SA ring, seen from the control process. See the module documentation.
///
/// Only one control process may attach to a segment at a time: a second one gets
/// [`ClientError::Attach`] with [`SegmentError::Busy`].
pub struct Client {
    path: PathBuf,
    opts: ClientOptions,
    ends: Ends,
    next_gen: u64,
    sas: BTreeMap<String, DesiredSa>,
    /// (direction, SPI, generation) → name, for current and former generations.
    by_ref: HashMap<(Direction, u32, u64), String>,
    /// SPI → SAs of the desired state using it (any direction).
    spis: HashMap<u32, u32>,
    policies: BTreeMap<u32, PolicySpec>,
    inflight: BTreeMap<u64, Inflight>,
    answered: HashMap<u64, (String, Answer)>,
    /// CountersReplies waiting for the Applied that ends them.
    counters: Vec<SaCounters>,
    events: VecDeque<Event>,
    dropped_seen: u64,
    tally: Tally,
    /// A new data plane has not received the desired state yet (a resync after a restart
    /// failed, e.g. timed out): [`Client::ensure_current`] tries again.
    resync_owed: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("path", &self.path)
            .field("dp_generation", &self.ends.segment.dp_generation())
            .field("sas", &self.sas.len())
            .field("policies", &self.policies.len())
            .field("inflight", &self.inflight.len())
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

/// Nanoseconds since the epoch (0 if the clock is before it).
fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether an attach error means "the data plane is (re)creating the segment: retry".
fn retryable(e: &SegmentError) -> bool {
    match e {
        SegmentError::NotReady { .. } => true,
        SegmentError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
        // The file was caught between `ftruncate` and the header (size 0 is NotReady, but a
        // size below the header is possible for an instant).
        SegmentError::Size { .. } => true,
        _ => false,
    }
}

fn open(path: &Path) -> Result<Ends, SegmentError> {
    let segment = Segment::attach(path)?;
    let ring_err = |e: RingError| SegmentError::BadHeader {
        path: path.to_path_buf(),
        what: e.to_string(),
    };
    let tx = segment.sender().map_err(ring_err)?;
    let rx = segment.receiver().map_err(ring_err)?;
    Ok(Ends { segment, tx, rx })
}

fn dir_word(d: Direction) -> &'static str {
    match d {
        Direction::In => "inbound",
        Direction::Out => "outbound",
    }
}

/// "AddSa \"t-a-in-1\" (inbound SPI 0x12345678)" and the like: how errors name a command.
pub fn describe(rec: &Record) -> String {
    let sa = |r: &SaRef| {
        format!(
            "{} SA {:#010x} generation {}",
            dir_word(r.direction),
            r.spi,
            r.generation
        )
    };
    match rec {
        Record::AddSa(s) => format!(
            "AddSa {:?} ({} SPI {:#010x})",
            s.name,
            dir_word(s.direction),
            s.spi
        ),
        Record::UpdateSa(u) => format!("UpdateSa of {}", sa(&u.sa)),
        Record::DeleteSa(r) => format!("DeleteSa of {}", sa(r)),
        Record::AddPolicy(p) => format!("AddPolicy {} ({:?})", p.policy_id, p.action),
        Record::DeletePolicy { policy_id, .. } => format!("DeletePolicy {policy_id}"),
        Record::Flush { older_than } if *older_than == u64::MAX => "Flush (everything)".into(),
        Record::Flush { older_than } => format!("Flush of generations below {older_than}"),
        Record::QueryCounters { sa: Some(r) } => format!("QueryCounters of {}", sa(r)),
        Record::QueryCounters { sa: None } => "QueryCounters".into(),
        Record::Resync { generation } => format!("Resync {generation}"),
        other => other.kind().to_string(),
    }
}

impl Client {
    /// Attaches to the data plane's segment at `path`, retrying for
    /// [`ClientOptions::attach_timeout`] while it does not exist yet or is being created.
    /// Other errors (another control process attached, wrong owner or mode, not a ring) are
    /// returned at once. The desired state starts empty; see [`Client::restore`].
    pub fn attach(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let ends = attach_retrying(&path, opts.attach_timeout)?;
        let first_seq = ends.tx.next_seq();
        tracing::debug!(path = %path.display(), dp_generation = ends.segment.dp_generation(), first_seq, "attached");
        let dropped_seen = ends.rx.dropped();
        Ok(Client {
            path,
            opts,
            ends,
            next_gen: wall_ns(),
            sas: BTreeMap::new(),
            by_ref: HashMap::new(),
            spis: HashMap::new(),
            policies: BTreeMap::new(),
            inflight: BTreeMap::new(),
            answered: HashMap::new(),
            counters: Vec::new(),
            events: VecDeque::new(),
            dropped_seen,
            tally: Tally::default(),
            resync_owed: false,
        })
    }

    /// A restarted control process: [`Client::attach`], then [`Client::restore`] with the SAs
    /// and policies it wants installed.
    pub fn attach_with_state(
        path: impl AsRef<Path>,
        opts: ClientOptions,
        sas: Vec<SaSpec>,
        policies: Vec<PolicySpec>,
    ) -> Result<(Client, ResyncReport), ClientError> {
        let mut c = Client::attach(path, opts)?;
        let report = c.restore(sas, policies)?;
        Ok((c, report))
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The segment (its data-plane generation, liveness).
    pub fn segment(&self) -> &Segment {
        &self.ends.segment
    }

    /// The generation of the data plane we are attached to.
    pub fn dp_generation(&self) -> u64 {
        self.ends.segment.dp_generation()
    }

    /// The options.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// A fresh generation: larger than every one this client handed out or saw before.
    pub fn next_generation(&mut self) -> u64 {
        self.next_gen = self.next_gen.saturating_add(1);
        self.next_gen
    }

    fn saw_generation(&mut self, g: u64) {
        if g > self.next_gen && g != u64::MAX {
            self.next_gen = g;
        }
    }

    // ----- desired state --------------------------------------------------------------------

    /// The SAs of the desired state, by name.
    pub fn sas(&self) -> impl Iterator<Item = &SaSpec> + '_ {
        self.sas.values().map(|d| &d.spec)
    }

    /// The SA of this name.
    pub fn sa(&self, name: &str) -> Option<&SaSpec> {
        self.sas.get(name).map(|d| &d.spec)
    }

    /// The policies of the desired state, by id.
    pub fn policies(&self) -> impl Iterator<Item = &PolicySpec> + '_ {
        self.policies.values()
    }

    /// The policy with this id.
    pub fn policy(&self, policy_id: u32) -> Option<&PolicySpec> {
        self.policies.get(&policy_id)
    }

    /// The SA an `SaRef` names, also under a generation it had before a resync.
    pub fn resolve(&self, r: &SaRef) -> Option<&SaSpec> {
        let name = self.by_ref.get(&(r.direction, r.spi, r.generation))?;
        self.sa(name)
    }

    /// Whether an SA of the desired state, or one being added, uses this SPI (either
    /// direction).
    pub fn spi_in_use(&self, spi: u32) -> bool {
        self.spis.contains_key(&spi)
            || self
                .inflight
                .values()
                .any(|i| matches!(&i.op, Op::AddSa(s) if s.spi == spi))
    }

    /// The last sequence number seen for an SA in its counters (0 if never queried).
    pub fn last_seq(&self, name: &str) -> Option<u64> {
        self.sas.get(name).map(|d| d.last_seq)
    }

    fn insert_sa(&mut self, spec: SaSpec, former: Vec<u64>, last_seq: u64) {
        let name = spec.name.clone();
        if let Some(old) = self.sas.remove(&name) {
            self.unindex(&old);
        }
        self.by_ref
            .insert((spec.direction, spec.spi, spec.generation), name.clone());
        for g in &former {
            self.by_ref
                .insert((spec.direction, spec.spi, *g), name.clone());
        }
        *self.spis.entry(spec.spi).or_insert(0) += 1;
        self.sas.insert(
            name,
            DesiredSa {
                spec,
                former,
                last_seq,
            },
        );
    }

    fn unindex(&mut self, d: &DesiredSa) {
        let s = &d.spec;
        self.by_ref.remove(&(s.direction, s.spi, s.generation));
        for g in &d.former {
            self.by_ref.remove(&(s.direction, s.spi, *g));
        }
        if let Some(n) = self.spis.get_mut(&s.spi) {
            *n -= 1;
            if *n == 0 {
                self.spis.remove(&s.spi);
            }
        }
    }

    fn remove_sa(&mut self, name: &str) {
        if let Some(d) = self.sas.remove(name) {
            self.unindex(&d);
        }
    }

    /// Applies an applied command to the desired state.
    fn commit(&mut self, op: Op) {
        match op {
            Op::AddSa(spec) => self.insert_sa(*spec, Vec::new(), 0),
            Op::UpdateSa { name, update } => {
                if let Some(d) = self.sas.get_mut(&name)
                    && d.spec.generation == update.sa.generation
                {
                    d.spec.remote = update.remote;
                    d.spec.encap = update.encap;
                    d.spec.lifetime = update.lifetime;
                }
            }
            Op::DeleteSa { name, generation } => {
                if self
                    .sas
                    .get(&name)
                    .is_some_and(|d| d.spec.generation == generation)
                {
                    self.remove_sa(&name);
                }
            }
            Op::AddPolicy(p) => {
                let newer = self
                    .policies
                    .get(&p.policy_id)
                    .is_none_or(|old| old.generation <= p.generation);
                if newer {
                    self.policies.insert(p.policy_id, *p);
                }
            }
            Op::DeletePolicy {
                policy_id,
                generation,
            } => {
                if self
                    .policies
                    .get(&policy_id)
                    .is_some_and(|p| p.generation == generation)
                {
                    self.policies.remove(&policy_id);
                }
            }
            Op::Flush { older_than } => {
                let old: Vec<String> = self
                    .sas
                    .iter()
                    .filter(|(_, d)| d.spec.generation < older_than)
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in old {
                    self.remove_sa(&n);
                }
                self.policies.retain(|_, p| p.generation >= older_than);
            }
            Op::Nothing => {}
            Op::ReaddSa { name, generation } => {
                if let Some(mut d) = self.sas.remove(&name) {
                    self.unindex(&d);
                    d.former.push(d.spec.generation);
                    d.spec.generation = generation;
                    self.insert_sa(d.spec, d.former, d.last_seq);
                }
            }
            Op::ReaddPolicy {
                policy_id,
                generation,
            } => {
                if let Some(p) = self.policies.get_mut(&policy_id) {
                    p.generation = generation;
                }
            }
        }
    }

    // ----- receiving ------------------------------------------------------------------------

    fn ring_err(&self, source: RingError) -> ClientError {
        ClientError::Ring {
            path: self.path.clone(),
            source,
        }
    }

    /// Handles one record from the event ring.
    fn handle(&mut self, r: Received) {
        let dropped = self.ends.rx.dropped();
        if dropped > self.dropped_seen {
            self.events.push_back(Event::Lost {
                count: dropped - self.dropped_seen,
            });
            self.dropped_seen = dropped;
        }
        match r.record {
            Err(e) => {
                tracing::warn!(seq = r.seq, "SA ring: malformed event record: {e}");
                self.events.push_back(Event::Malformed {
                    seq: r.seq,
                    reason: e.to_string(),
                });
            }
            Ok(Record::Applied { seq }) => self.answer(seq, Ok(())),
            Ok(Record::Rejected { seq, reason }) => self.answer(seq, Err(reason)),
            Ok(Record::CountersReply(c)) => {
                self.saw_generation(c.sa.generation);
                if let Some(name) = self
                    .by_ref
                    .get(&(c.sa.direction, c.sa.spi, c.sa.generation))
                    && let Some(d) = self.sas.get_mut(name)
                {
                    d.last_seq = d.last_seq.max(c.last_seq);
                }
                self.counters.push(c);
            }
            Ok(other) => self.events.push_back(Event::Record(other)),
        }
    }

    fn answer(&mut self, seq: u64, result: Result<(), String>) {
        let counters = std::mem::take(&mut self.counters);
        let Some(inf) = self.inflight.remove(&seq) else {
            tracing::debug!(
                seq,
                "SA ring: answer to a command this client is not waiting for"
            );
            return;
        };
        match &result {
            Ok(()) => {
                self.commit(inf.op);
            }
            Err(reason) => {
                tracing::debug!(seq, what = %inf.what, "rejected: {reason}");
            }
        }
        match inf.waiter {
            Waiter::Ticket => {
                self.answered
                    .insert(seq, (inf.what, result.map(|()| counters)));
            }
            Waiter::Nobody => {}
            Waiter::Batch => match result {
                Ok(()) => self.tally.applied += 1,
                Err(reason) => {
                    self.tally.rejected += 1;
                    if self.tally.rejections.len() < MAX_LISTED_REJECTIONS {
                        self.tally.rejections.push((inf.what, reason));
                    }
                }
            },
        }
    }

    /// Handles everything available now, without waiting. Returns how many records.
    fn receive_now(&mut self) -> Result<usize, ClientError> {
        let mut n = 0;
        while let Some(r) = self.ends.rx.try_pop().map_err(|e| self.ring_err(e))? {
            self.handle(r);
            n += 1;
        }
        Ok(n)
    }

    /// Waits up to `timeout` for one record and handles it (and everything behind it).
    fn receive_wait(&mut self, timeout: Duration) -> Result<usize, ClientError> {
        match self
            .ends
            .rx
            .pop_wait(timeout)
            .map_err(|e| self.ring_err(e))?
        {
            Some(r) => {
                self.handle(r);
                Ok(1 + self.receive_now()?)
            }
            None => Ok(0),
        }
    }

    /// `Err(DataPlaneGone)` if the data plane stopped or was replaced.
    fn check_alive(&self, what: &str) -> Result<(), ClientError> {
        let gone = |why| ClientError::DataPlaneGone {
            path: self.path.clone(),
            why,
            what: what.to_string(),
        };
        if !self.ends.segment.is_current() {
            return Err(gone("restarted or stopped"));
        }
        match self.ends.segment.peer_alive() {
            Ok(true) => Ok(()),
            Ok(false) => Err(gone("stopped")),
            // Cannot tell: keep waiting (the timeout still applies).
            Err(_) => Ok(()),
        }
    }

    /// Waits until some answer or event arrives, the data plane is gone, or `timeout`.
    fn receive_or_fail(&mut self, what: &str, deadline: Instant) -> Result<(), ClientError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.check_alive(what)?;
                return Err(ClientError::Timeout {
                    what: what.to_string(),
                    timeout: self.opts.command_timeout,
                });
            }
            let step = (deadline - now).min(LIVENESS_EVERY);
            if self.receive_wait(step)? > 0 {
                return Ok(());
            }
            self.check_alive(what)?;
        }
    }

    // ----- sending --------------------------------------------------------------------------

    /// Pushes a command (waiting, and reading answers, while the ring is full).
    fn push(&mut self, rec: &Record, op: Op, waiter: Waiter) -> Result<u64, ClientError> {
        let deadline = Instant::now() + self.opts.command_timeout;
        loop {
            match self.ends.tx.try_push(rec) {
                Ok(seq) => {
                    self.inflight.insert(
                        seq,
                        Inflight {
                            op,
                            what: describe(rec),
                            waiter,
                        },
                    );
                    return Ok(seq);
                }
                Err(PushError::Full) => {
                    // The data plane may be waiting for us to read its answers.
                    let what = describe(rec);
                    self.receive_or_fail(&what, deadline)?;
                }
                Err(source) => {
                    return Err(ClientError::Push {
                        what: describe(rec),
                        source,
                    });
                }
            }
        }
    }

    fn submit(&mut self, rec: &Record, op: Op) -> Result<Ticket, ClientError> {
        let seq = self.push(rec, op, Waiter::Ticket)?;
        Ok(Ticket {
            seq,
            dp_generation: self.dp_generation(),
        })
    }

    /// Waits for a ticket's answer: the `CountersReply`s it caused (none for anything but
    /// `QueryCounters`), or [`ClientError::Rejected`] with the data plane's reason.
    pub fn wait(&mut self, ticket: Ticket) -> Result<Vec<SaCounters>, ClientError> {
        let deadline = Instant::now() + self.opts.command_timeout;
        loop {
            if let Some((what, answer)) = self.answered.remove(&ticket.seq) {
                return answer.map_err(|reason| ClientError::Rejected {
                    what,
                    seq: ticket.seq,
                    reason,
                });
            }
            let what = match self.inflight.get(&ticket.seq) {
                Some(i) if ticket.dp_generation == self.dp_generation() => i.what.clone(),
                _ => {
                    return Err(ClientError::DataPlaneGone {
                        path: self.path.clone(),
                        why: "restarted",
                        what: format!("command {}", ticket.seq),
                    });
                }
            };
            if let Err(e) = self.receive_or_fail(&what, deadline) {
                // Nobody will collect the answer now; it still updates the desired state.
                if let Some(i) = self.inflight.get_mut(&ticket.seq) {
                    i.waiter = Waiter::Nobody;
                }
                return Err(e);
            }
        }
    }

    // ----- commands -------------------------------------------------------------------------

    /// Pushes an `AddSa` with a fresh generation (the spec's is replaced) without waiting.
    /// Returns the ticket and the reference that names the SA.
    pub fn submit_add_sa(&mut self, mut spec: SaSpec) -> Result<(Ticket, SaRef), ClientError> {
        spec.generation = self.next_generation();
        let r = spec.sa_ref();
        let op = Op::AddSa(Box::new(spec.clone()));
        let rec = Record::AddSa(Box::new(spec));
        Ok((self.submit(&rec, op)?, r))
    }

    /// Installs an SA (a fresh generation replaces the spec's) and waits until the data plane
    /// applied it. Its name must be unique among the data plane's SAs.
    pub fn add_sa(&mut self, spec: SaSpec) -> Result<SaRef, ClientError> {
        let (t, r) = self.submit_add_sa(spec)?;
        self.wait(t)?;
        Ok(r)
    }

    fn name_of(&self, r: &SaRef) -> Result<String, ClientError> {
        self.by_ref
            .get(&(r.direction, r.spi, r.generation))
            .cloned()
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "{} SA {:#010x} generation {} is not installed by this client",
                    dir_word(r.direction),
                    r.spi,
                    r.generation
                ))
            })
    }

    fn current_ref(&self, name: &str) -> Result<SaRef, ClientError> {
        self.sa(name).map(SaSpec::sa_ref).ok_or_else(|| {
            ClientError::Invalid(format!("no SA named {name:?} is installed by this client"))
        })
    }

    /// Changes an installed SA's peer address, encapsulation and lifetimes. `update.sa` may
    /// carry a generation from before a resync. (The data plane may not support this yet and
    /// reject it: delete and re-add instead.)
    pub fn update_sa(&mut self, mut update: SaUpdate) -> Result<(), ClientError> {
        let name = self.name_of(&update.sa)?;
        update.sa = self.current_ref(&name)?;
        let rec = Record::UpdateSa(update);
        let t = self.submit(&rec, Op::UpdateSa { name, update })?;
        self.wait(t).map(drop)
    }

    /// [`Client::update_sa`] by name.
    pub fn update_sa_named(
        &mut self,
        name: &str,
        remote: IpAddr,
        encap: Option<UdpEncap>,
        lifetime: Lifetimes,
    ) -> Result<(), ClientError> {
        let sa = self.current_ref(name)?;
        self.update_sa(SaUpdate {
            sa,
            remote,
            encap,
            lifetime,
        })
    }

    /// Pushes a `DeleteSa` of the named SA without waiting.
    pub fn submit_delete_sa_named(&mut self, name: &str) -> Result<Ticket, ClientError> {
        let r = self.current_ref(name)?;
        let op = Op::DeleteSa {
            name: name.to_string(),
            generation: r.generation,
        };
        self.submit(&Record::DeleteSa(r), op)
    }

    /// Deletes an SA (also named by a generation from before a resync) and waits.
    pub fn delete_sa(&mut self, sa: &SaRef) -> Result<(), ClientError> {
        let name = self.name_of(sa)?;
        self.delete_sa_named(&name)
    }

    /// Deletes the named SA and waits.
    pub fn delete_sa_named(&mut self, name: &str) -> Result<(), ClientError> {
        let t = self.submit_delete_sa_named(name)?;
        self.wait(t).map(drop)
    }

    /// Pushes an `AddPolicy` with a fresh generation without waiting; it replaces the policy
    /// with the same id (the data plane swaps its SPD whole). A protect policy must name an
    /// outbound SA that is installed (or pushed before it). Returns the ticket and the
    /// generation.
    pub fn submit_add_policy(&mut self, mut p: PolicySpec) -> Result<(Ticket, u64), ClientError> {
        p.generation = self.next_generation();
        let g = p.generation;
        let op = Op::AddPolicy(Box::new(p.clone()));
        let rec = Record::AddPolicy(Box::new(p));
        Ok((self.submit(&rec, op)?, g))
    }

    /// Adds or replaces a policy (fresh generation) and waits; returns the generation.
    pub fn add_policy(&mut self, p: PolicySpec) -> Result<u64, ClientError> {
        let (t, g) = self.submit_add_policy(p)?;
        self.wait(t)?;
        Ok(g)
    }

    /// Deletes a policy this client installed and waits.
    pub fn delete_policy(&mut self, policy_id: u32) -> Result<(), ClientError> {
        let generation = self
            .policies
            .get(&policy_id)
            .map(|p| p.generation)
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "policy {policy_id} is not installed by this client"
                ))
            })?;
        let rec = Record::DeletePolicy {
            policy_id,
            generation,
        };
        let t = self.submit(
            &rec,
            Op::DeletePolicy {
                policy_id,
                generation,
            },
        )?;
        self.wait(t).map(drop)
    }

    /// Removes every SA and policy installed through the ring (`Flush{older_than: MAX}`),
    /// ours and anyone else's, and waits. The desired state becomes empty.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let older_than = u64::MAX;
        let t = self.submit(&Record::Flush { older_than }, Op::Flush { older_than })?;
        self.wait(t).map(drop)
    }

    /// The counters of one SA (also by a generation from before a resync), or of every SA
    /// installed through the ring (`None`). Updates the last sequence numbers the client
    /// knows (see [`ClientOptions::restart_seq_skip`]).
    pub fn query_counters(&mut self, sa: Option<&SaRef>) -> Result<Vec<SaCounters>, ClientError> {
        let sa = match sa {
            Some(r) => {
                let name = self.name_of(r)?;
                Some(self.current_ref(&name)?)
            }
            None => None,
        };
        let t = self.submit(&Record::QueryCounters { sa }, Op::Nothing)?;
        self.wait(t)
    }

    // ----- events ---------------------------------------------------------------------------

    /// The next event, waiting up to `timeout` (answers arriving meanwhile are handled).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.receive_wait((deadline - now).min(LIVENESS_EVERY))?;
        }
    }

    /// Every event that has arrived, without waiting.
    pub fn drain_events(&mut self) -> Result<Vec<Event>, ClientError> {
        self.receive_now()?;
        Ok(self.events.drain(..).collect())
    }

    // ----- pipelined bulk path --------------------------------------------------------------

    /// Pushes records with at most `window` unanswered, reading answers as they come, until
    /// every one is answered.
    fn pipeline(
        &mut self,
        items: impl IntoIterator<Item = (Record, Op)>,
        window: usize,
    ) -> Result<BulkReport, ClientError> {
        self.forget_batch();
        let result = self.pipeline_inner(items, window);
        // After an error nobody counts the rest: their answers only update the desired state.
        self.forget_batch();
        result
    }

    fn forget_batch(&mut self) {
        for i in self.inflight.values_mut() {
            if i.waiter == Waiter::Batch {
                i.waiter = Waiter::Nobody;
            }
        }
    }

    fn pipeline_inner(
        &mut self,
        items: impl IntoIterator<Item = (Record, Op)>,
        window: usize,
    ) -> Result<BulkReport, ClientError> {
        let window = window.max(1) as u64;
        self.tally = Tally::default();
        let start = Instant::now();
        let mut pushed = 0u64;
        let answered = |t: &Tally| t.applied + t.rejected;
        for (rec, op) in items {
            while pushed.saturating_sub(answered(&self.tally)) >= window {
                let deadline = Instant::now() + self.opts.command_timeout;
                self.receive_or_fail("a pipelined command", deadline)?;
            }
            self.push(&rec, op, Waiter::Batch)?;
            pushed += 1;
            if pushed.is_multiple_of(64) {
                self.receive_now()?;
            }
        }
        while answered(&self.tally) < pushed {
            let deadline = Instant::now() + self.opts.command_timeout;
            self.receive_or_fail("a pipelined command", deadline)?;
        }
        let t = std::mem::take(&mut self.tally);
        Ok(BulkReport {
            pushed,
            applied: t.applied,
            rejected: t.rejected,
            rejections: t.rejections,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Installs many SAs without waiting for each: at most `window` unanswered commands,
    /// answers read as they come; returns when all are answered, with the counts. Each SA gets
    /// a fresh generation; the applied ones join the desired state.
    pub fn add_sas_pipelined(
        &mut self,
        specs: impl IntoIterator<Item = SaSpec>,
        window: usize,
    ) -> Result<BulkReport, ClientError> {
        let mut items = Vec::new();
        for mut spec in specs {
            spec.generation = self.next_generation();
            let op = Op::AddSa(Box::new(spec.clone()));
            items.push((Record::AddSa(Box::new(spec)), op));
        }
        self.pipeline(items, window)
    }

    /// Deletes many SAs of the desired state by name, pipelined like
    /// [`Client::add_sas_pipelined`].
    pub fn delete_sas_pipelined<'n>(
        &mut self,
        names: impl IntoIterator<Item = &'n str>,
        window: usize,
    ) -> Result<BulkReport, ClientError> {
        let mut items = Vec::new();
        for name in names {
            let r = self.current_ref(name)?;
            items.push((
                Record::DeleteSa(r),
                Op::DeleteSa {
                    name: name.to_string(),
                    generation: r.generation,
                },
            ));
        }
        self.pipeline(items, window)
    }

    // ----- resync ---------------------------------------------------------------------------

    /// A restarted control process: makes `sas` and `policies` the desired state and pushes
    /// it with [`Client::resync`]. The data plane adopts SAs it already has with identical
    /// content (they keep their counters and replay state) and flushes everything that was
    /// not re-pushed. Generations in the specs are ignored; names must be unique.
    pub fn restore(
        &mut self,
        sas: Vec<SaSpec>,
        policies: Vec<PolicySpec>,
    ) -> Result<ResyncReport, ClientError> {
        let mut seen = std::collections::HashSet::new();
        for s in &sas {
            if !seen.insert(s.name.clone()) {
                return Err(ClientError::Invalid(format!(
                    "two SAs named {:?} in the state to restore",
                    s.name
                )));
            }
        }
        self.sas.clear();
        self.by_ref.clear();
        self.spis.clear();
        self.policies.clear();
        for s in sas {
            // The caller's generations stay resolvable; the new ones are above them.
            self.saw_generation(s.generation);
            let last_seq = s.initial_seq;
            self.insert_sa(s, Vec::new(), last_seq);
        }
        for p in policies {
            self.saw_generation(p.generation);
            self.policies.insert(p.policy_id, p);
        }
        self.resync()
    }

    /// Re-pushes the whole desired state: `Resync{G}`, every SA (inbound first) and policy
    /// with new generations ≥ G, `Flush{older_than: G}`; pipelined. Before that it asks for
    /// the counters, to raise its generation counter above what the data plane has and learn
    /// the last sequence numbers. The desired state takes the new generations; what the data
    /// plane rejected is dropped from it (the flush removed it there too).
    pub fn resync(&mut self) -> Result<ResyncReport, ClientError> {
        let start = Instant::now();
        // Answers from before still count; a fresh tally below.
        self.receive_now()?;
        self.query_counters(None)?;
        let g = self.next_generation();
        let skip = self.opts.restart_seq_skip;
        let mut items: Vec<(Record, Op)> = Vec::with_capacity(self.sas.len() + 2);
        items.push((Record::Resync { generation: g }, Op::Nothing));
        let mut names: Vec<(Direction, String)> = self
            .sas
            .values()
            .map(|d| (d.spec.direction, d.spec.name.clone()))
            .collect();
        // Inbound first: a peer may already send with an SA whose outbound half we re-push.
        names.sort_by_key(|(d, _)| *d == Direction::Out);
        for (_, name) in names {
            let generation = self.next_generation();
            let Some(d) = self.sas.get(&name) else {
                continue;
            };
            let mut spec = d.spec.clone();
            spec.generation = generation;
            if spec.direction == Direction::Out {
                let limit = if spec.esn {
                    u64::MAX
                } else {
                    u64::from(u32::MAX)
                };
                spec.initial_seq = spec
                    .initial_seq
                    .max(d.last_seq)
                    .saturating_add(skip)
                    .min(limit);
            }
            items.push((
                Record::AddSa(Box::new(spec)),
                Op::ReaddSa { name, generation },
            ));
        }
        let ids: Vec<u32> = self.policies.keys().copied().collect();
        for policy_id in ids {
            let generation = self.next_generation();
            let Some(p) = self.policies.get(&policy_id) else {
                continue;
            };
            let mut p = p.clone();
            p.generation = generation;
            items.push((
                Record::AddPolicy(Box::new(p)),
                Op::ReaddPolicy {
                    policy_id,
                    generation,
                },
            ));
        }
        items.push((Record::Flush { older_than: g }, Op::Flush { older_than: g }));
        let mut sas = 0;
        let mut policies = 0;
        for (rec, _) in &items {
            match rec {
                Record::AddSa(_) => sas += 1,
                Record::AddPolicy(_) => policies += 1,
                _ => {}
            }
        }
        let window = self.opts.resync_window;
        let bulk = self.pipeline(items, window)?;
        let mut rejected_sas = 0;
        let mut rejected_policies = 0;
        for (what, _) in &bulk.rejections {
            if what.starts_with("AddSa") {
                rejected_sas += 1;
            } else if what.starts_with("AddPolicy") {
                rejected_policies += 1;
            }
        }
        let report = ResyncReport {
            generation: g,
            dp_generation: self.dp_generation(),
            sas: sas - rejected_sas,
            policies: policies - rejected_policies,
            rejections: bulk.rejections,
            rejected: bulk.rejected,
            seconds: start.elapsed().as_secs_f64(),
        };
        if report.rejected > 0 {
            tracing::warn!(
                rejected = report.rejected,
                "resync: the data plane rejected re-pushed records"
            );
        }
        Ok(report)
    }

    /// Cheap enough to call often (a `stat` and a lock probe): whether the data plane we are
    /// attached to is still there. If the path names a new segment (a restarted data plane),
    /// reattaches and re-pushes the desired state ([`Client::resync`]). Events still unread in
    /// the old segment are queued first; commands in flight there are forgotten (their
    /// outcome does not matter: the new data plane gets the desired state).
    ///
    /// A resync that fails (the new data plane stalled, an answer timed out) is owed: every
    /// later call tries it again until one succeeds, so the new data plane always ends up
    /// with the desired state.
    pub fn ensure_current(&mut self) -> Result<Health, ClientError> {
        if self.ends.segment.is_current() {
            return match self.ends.segment.peer_alive() {
                Ok(false) => Ok(Health::DataPlaneDown),
                _ if self.resync_owed => self.owed_resync(),
                _ => Ok(Health::Current),
            };
        }
        let ends = match open(&self.path) {
            Ok(e) => e,
            Err(e) if retryable(&e) => return Ok(Health::Waiting(e.to_string())),
            Err(e) => return Err(ClientError::Attach(e)),
        };
        // Whatever the old data plane said last.
        if let Err(e) = self.receive_now() {
            tracing::warn!("reading the old segment's last events: {e}");
        }
        tracing::info!(
            path = %self.path.display(),
            old = self.dp_generation(),
            new = ends.segment.dp_generation(),
            "the data plane restarted: reattaching and re-pushing the desired state"
        );
        self.ends = ends;
        self.inflight.clear();
        self.answered.clear();
        self.counters.clear();
        self.dropped_seen = self.ends.rx.dropped();
        self.resync_owed = true;
        self.owed_resync()
    }

    fn owed_resync(&mut self) -> Result<Health, ClientError> {
        let report = self.resync()?;
        self.resync_owed = false;
        Ok(Health::Resynced(report))
    }
}

fn attach_retrying(path: &Path, timeout: Duration) -> Result<Ends, ClientError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match open(path) {
            Ok(e) => return Ok(e),
            Err(e) if retryable(&e) => {
                let waited = start.elapsed();
                if waited >= timeout {
                    return Err(ClientError::AttachTimeout {
                        path: path.to_path_buf(),
                        waited,
                        last: e,
                    });
                }
                thread::sleep(pause.min(timeout - waited));
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(ClientError::Attach(e)),
        }
    }
}
