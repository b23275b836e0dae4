//! The shared-memory segment: a file under `/dev/shm`, its header, and the mapping.
//!
//! **Why a named file and not a memfd handed over a unix socket:** both processes must be able
//! to restart independently and find the segment again. With a named file the control process
//! needs nothing from the data plane to (re)attach — no socket handshake with a process that may
//! be busy or gone — and a control process restarted after a `kill -9` simply opens the path
//! again and continues at the indices it finds. The data plane owns the segment: it creates it
//! (replacing a stale one) at every start with a new generation number, so a control process
//! notices a restarted data plane ([`Segment::is_current`], [`Segment::dp_generation`]). The cost
//! is that the file system is the access control: the file is created with mode 0600 and
//! [`Segment::attach`] refuses one that is not ours or is readable by others.

use crate::record::{MAX_ENCODED_LEN, RingDir};
use crate::ring::{Consumer, Producer};
use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the data plane creates its segment unless told otherwise.
pub const DEFAULT_PATH: &str = "/dev/shm/espgw-ring";

/// The segment format this program speaks.
pub const VERSION: u32 = 1;

/// The first eight bytes of every segment.
pub const MAGIC: [u8; 8] = *b"ESPGWRNG";

/// Offsets in the segment. All header fields are little-endian; the four indices and counters
/// in each ring's control block are native-endian `AtomicU64`s (both processes run on one host).
pub mod layout {
    use crate::record::RingDir;

    use super::RingParams;

    /// Header: `MAGIC` (written last, with release ordering, so a half-created segment is
    /// recognisable).
    pub const MAGIC: usize = 0;
    /// Header: format version (`u32`).
    pub const VERSION: usize = 8;
    /// Header: header length = offset of the first ring (`u32`).
    pub const HEADER_LEN_FIELD: usize = 12;
    /// Header: slot size in bytes (`u32`).
    pub const RECORD_SIZE: usize = 16;
    /// Header: slots of the to-data-plane ring (`u32`, a power of two).
    pub const TO_DP_SLOTS: usize = 20;
    /// Header: slots of the from-data-plane ring (`u32`, a power of two).
    pub const FROM_DP_SLOTS: usize = 24;
    /// Header: flags (`u32`, 0).
    pub const FLAGS: usize = 28;
    /// Header: total segment size in bytes (`u64`).
    pub const SEGMENT_SIZE: usize = 32;
    /// Header: the data plane's generation, new at every create (`u64`).
    pub const DP_GENERATION: usize = 40;
    /// Header: pid of the creating data plane (`u32`, informational).
    pub const DP_PID: usize = 48;
    /// Length of the header; bytes up to it after `DP_PID` are reserved (0).
    pub const HEADER_LEN: usize = 256;

    /// Ring control block: the producer index, the position of the next record the producer
    /// will publish (= records ever published on this ring).
    pub const PRODUCER_INDEX: usize = 0;
    /// Ring control block: records the producer gave up on because the ring was full
    /// (`Producer::count_dropped`), on the producer's cache line.
    pub const DROPPED: usize = 8;
    /// Ring control block: the consumer index, the position of the next record the consumer
    /// will read; on its own 128-byte line (two 64-byte lines: the adjacent-line prefetcher).
    pub const CONSUMER_INDEX: usize = 128;
    /// Length of a ring control block.
    pub const RING_CTL_LEN: usize = 256;

    /// Slot: sequence number (`u64`) = the record's position in the ring.
    pub const SLOT_SEQ: usize = 0;
    /// Slot: payload length (`u32`).
    pub const SLOT_LEN: usize = 8;
    /// Slot: flags (`u32`; bit 0: wiped by the consumer).
    pub const SLOT_FLAGS: usize = 12;
    /// Slot: checksum (`u64`) over sequence number, length, flags and payload.
    pub const SLOT_CHECKSUM: usize = 16;
    /// Slot: the encoded record starts here.
    pub const SLOT_PAYLOAD: usize = 24;
    /// Length of the slot header.
    pub const SLOT_HEADER_LEN: usize = 24;

    /// Offset of a ring's control block.
    pub fn ring_ctl(p: &RingParams, dir: RingDir) -> usize {
        match dir {
            RingDir::ToDataPlane => HEADER_LEN,
            RingDir::FromDataPlane => {
                HEADER_LEN + RING_CTL_LEN + p.record_size as usize * p.to_dp_slots as usize
            }
        }
    }

    /// Offset of a ring's first slot.
    pub fn ring_slots(p: &RingParams, dir: RingDir) -> usize {
        ring_ctl(p, dir) + RING_CTL_LEN
    }

    /// Offset of the slot that holds position `pos` of a ring.
    pub fn slot(p: &RingParams, dir: RingDir, pos: u64) -> usize {
        let slots = match dir {
            RingDir::ToDataPlane => p.to_dp_slots,
            RingDir::FromDataPlane => p.from_dp_slots,
        };
        ring_slots(p, dir) + (pos & (u64::from(slots) - 1)) as usize * p.record_size as usize
    }
}

/// Bytes a slot needs at least: the slot header and the longest record, rounded up to 64.
pub const MIN_RECORD_SIZE: u32 =
    ((layout::SLOT_HEADER_LEN + MAX_ENCODED_LEN).div_ceil(64) * 64) as u32;

/// The slot size the data plane uses unless told otherwise.
pub const DEFAULT_RECORD_SIZE: u32 = 512;

const _: () = assert!(
    layout::SLOT_HEADER_LEN + MAX_ENCODED_LEN <= DEFAULT_RECORD_SIZE as usize,
    "the largest record does not fit the default slot"
);
const _: () = assert!(MIN_RECORD_SIZE <= DEFAULT_RECORD_SIZE);

/// Largest slot size accepted.
pub const MAX_RECORD_SIZE: u32 = 65536;
/// Most slots per ring.
pub const MAX_SLOTS: u32 = 1 << 20;
/// Largest segment accepted (1 GiB).
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// Sizes of the two rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingParams {
    /// Bytes per slot: a multiple of 64, at least [`MIN_RECORD_SIZE`].
    pub record_size: u32,
    /// Slots of the control → data plane ring (a power of two, 2…2^20).
    pub to_dp_slots: u32,
    /// Slots of the data plane → control ring (a power of two, 2…2^20).
    pub from_dp_slots: u32,
}

impl Default for RingParams {
    /// 512-byte slots, 4096 each way: 4 MiB.
    fn default() -> Self {
        RingParams {
            record_size: DEFAULT_RECORD_SIZE,
            to_dp_slots: 4096,
            from_dp_slots: 4096,
        }
    }
}

impl RingParams {
    /// Checks the sizes; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.record_size < MIN_RECORD_SIZE
            || self.record_size > MAX_RECORD_SIZE
            || !self.record_size.is_multiple_of(64)
        {
            return Err(format!(
                "record size {} is not a multiple of 64 in {MIN_RECORD_SIZE}…{MAX_RECORD_SIZE}",
                self.record_size
            ));
        }
        for (name, n) in [
            ("to-data-plane", self.to_dp_slots),
            ("from-data-plane", self.from_dp_slots),
        ] {
            if !n.is_power_of_two() || !(2..=MAX_SLOTS).contains(&n) {
                return Err(format!(
                    "{name} ring: {n} slots is not a power of two in 2…{MAX_SLOTS}"
                ));
            }
        }
        if self.segment_size() > MAX_SEGMENT_SIZE {
            return Err(format!(
                "segment of {} bytes exceeds {MAX_SEGMENT_SIZE}",
                self.segment_size()
            ));
        }
        Ok(())
    }

    /// Size of the whole segment in bytes.
    pub fn segment_size(&self) -> u64 {
        (layout::HEADER_LEN + 2 * layout::RING_CTL_LEN) as u64
            + u64::from(self.record_size)
                * (u64::from(self.to_dp_slots) + u64::from(self.from_dp_slots))
    }

    pub(crate) fn slots(&self, dir: RingDir) -> u32 {
        match dir {
            RingDir::ToDataPlane => self.to_dp_slots,
            RingDir::FromDataPlane => self.from_dp_slots,
        }
    }
}

/// Which process this mapping belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The data plane: created the segment, consumes commands, produces events.
    DataPlane,
    /// The control process: attached, produces commands, consumes events.
    Control,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::DataPlane => "data plane",
            Side::Control => "control",
        }
    }
    /// The byte of the file this side holds an OFD write lock on while it is attached.
    fn lock_byte(self) -> i64 {
        match self {
            Side::DataPlane => 0,
            Side::Control => 1,
        }
    }
    fn peer(self) -> Side {
        match self {
            Side::DataPlane => Side::Control,
            Side::Control => Side::DataPlane,
        }
    }
    /// The ring this side produces on.
    pub fn sends_on(self) -> RingDir {
        match self {
            Side::DataPlane => RingDir::FromDataPlane,
            Side::Control => RingDir::ToDataPlane,
        }
    }
    /// The ring this side consumes.
    pub fn receives_on(self) -> RingDir {
        match self {
            Side::DataPlane => RingDir::ToDataPlane,
            Side::Control => RingDir::FromDataPlane,
        }
    }
}

/// Why a segment could not be created or attached.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A system call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The segment's path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The sizes are not acceptable.
    #[error("bad ring parameters: {0}")]
    Params(String),
    /// The file is not a regular file.
    #[error("{path}: not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file belongs to another user.
    #[error(
        "{path}: owned by uid {owner}, we are uid {ours}; refusing a segment another user controls"
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// The file's owner.
        owner: u32,
        /// Our effective uid.
        ours: u32,
    },
    /// Others may read or write the file.
    #[error(
        "{path}: mode {mode:04o} is wider than 0600; refusing a segment others can read (it carries keys)"
    )]
    Mode {
        /// The path.
        path: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// The magic is zero: the data plane is still creating the segment. Retry shortly.
    #[error("{path}: the data plane has not finished creating the segment yet; retry")]
    NotReady {
        /// The path.
        path: PathBuf,
    },
    /// The magic is wrong.
    #[error("{path}: not an espgw ring (magic {found:02x?})")]
    NotARing {
        /// The path.
        path: PathBuf,
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// Another format version.
    #[error("{path}: version {found}, this program speaks {ours}")]
    Version {
        /// The path.
        path: PathBuf,
        /// The segment's version.
        found: u32,
        /// Ours ([`VERSION`]).
        ours: u32,
    },
    /// The header's sizes are invalid.
    #[error("{path}: bad header: {what}")]
    BadHeader {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The file's size is not what the header describes.
    #[error("{path}: the file has {size} bytes, the header describes {expected}")]
    Size {
        /// The path.
        path: PathBuf,
        /// The file's size.
        size: u64,
        /// What the header implies.
        expected: u64,
    },
    /// Another process of the same side holds the segment.
    #[error("{path}: another {side} process is attached to this segment")]
    Busy {
        /// The path.
        path: PathBuf,
        /// Which side.
        side: &'static str,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The mapping and everything known about it; shared by the [`Segment`] handles and the
/// producers and consumers made from it.
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// Kept open: the mapping's file, and the OFD lock of our side (released on close, also
    /// when the process is killed).
    file: File,
    side: Side,
    path: PathBuf,
    params: RingParams,
    generation: u64,
    dev: u64,
    ino: u64,
    /// A producer and a consumer exist for … (index: `RingDir as usize`).
    claimed_producer: [AtomicBool; 2],
    claimed_consumer: [AtomicBool; 2],
}

// SAFETY: the mapping is plain shared memory that lives until `Mapping` is dropped (munmap in
// `Drop`). Every access to it goes through the methods below: atomics for the indices, and
// slot accesses whose exclusivity the ring protocol guarantees (a slot belongs either to the
// one producer or to the one consumer of its ring, enforced per mapping by the claim flags).
// Nothing in it is tied to a thread.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; shared references only hand out atomics or copy bytes in and out under
// the ring protocol.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(file: &File, len: usize, path: &Path) -> Result<NonNull<u8>, SegmentError> {
        // SAFETY: mmap of a file descriptor we own, length > 0 (checked by the callers),
        // shared read/write; the kernel picks the address. The result is checked below and
        // unmapped in `Drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io_err(path, "mmap")(io::Error::last_os_error()));
        }
        NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io_err(path, "mmap")(io::Error::other("mmap returned a null address")))
    }

    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "segment access {off}+{len} outside {} bytes",
            self.len
        );
    }

    /// The `AtomicU64` at `off` (8-aligned).
    pub(crate) fn atomic(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert!(off.is_multiple_of(8));
        // SAFETY: in bounds (checked), 8-aligned (the mapping is page-aligned and `off` is a
        // multiple of 8), valid for as long as `self` (unmapped only in `Drop`). `AtomicU64`
        // has the layout of `u64`, and atomic operations on shared mappings are coherent
        // between processes. The indices are only ever accessed as atomics.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The `AtomicU32` at `off` (4-aligned): a slot's flags.
    pub(crate) fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4);
        assert!(off.is_multiple_of(4));
        // SAFETY: as for `atomic`, with 4-byte alignment. The slot flags are otherwise
        // accessed by plain copies, but only by the slot's current owner (the consumer that
        // wipes it, or the producer after the consumer index was released to it).
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// Copies `dst.len()` bytes from the segment at `off`.
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: in bounds (checked); `dst` is our own memory and cannot overlap the mapping.
        // The ring protocol gives the caller the bytes read (nobody writes them meanwhile); a
        // stray writer can at worst change the bytes copied, which the checksum catches.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Copies `src` into the segment at `off`.
    pub(crate) fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: in bounds (checked), no overlap (see `read`); the caller owns these bytes
        // under the ring protocol (a producer's free slot, a consumer's slot being released,
        // the header before the magic is published).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(off), src.len())
        }
    }

    /// Zeroes `len` bytes at `off`.
    pub(crate) fn zero(&self, off: usize, len: usize) {
        self.check(off, len);
        // SAFETY: in bounds (checked); the caller owns these bytes (see `write`). The writes go
        // to shared memory that another process maps, and are followed by a release store of
        // an index, so the compiler cannot elide them as dead stores.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(off), 0, len) }
    }

    /// Runs `f` on `len` bytes at `off` as a mutable slice.
    ///
    /// Only for a producer encoding straight into a slot it owns.
    pub(crate) fn with_slice_mut<R>(
        &self,
        off: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        self.check(off, len);
        // SAFETY: in bounds (checked), valid and aligned for `u8`. The slice lives only during
        // `f` and covers a free slot that belongs to this mapping's one producer of the ring
        // (claim flag in this process, OFD lock across processes); the consumer does not read
        // it until the producer index is published after `f` returns.
        let s = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(off), len) };
        f(s)
    }

    pub(crate) fn params(&self) -> &RingParams {
        &self.params
    }

    pub(crate) fn claim(&self, dir: RingDir, producer: bool) -> bool {
        let flags = if producer {
            &self.claimed_producer
        } else {
            &self.claimed_consumer
        };
        !flags[dir as usize].swap(true, Ordering::AcqRel)
    }

    pub(crate) fn release(&self, dir: RingDir, producer: bool) {
        let flags = if producer {
            &self.claimed_producer
        } else {
            &self.claimed_consumer
        };
        flags[dir as usize].store(false, Ordering::Release);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned; every reference into the
        // mapping borrows a `Mapping` (or holds an `Arc` of it), so none outlives this call.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
        if self.side == Side::DataPlane && same_file(&self.path, self.dev, self.ino) {
            // Our segment, not a newer data plane's: remove it so a control process sees we
            // are gone (`is_current`). A data plane killed outright leaves it; the next one
            // replaces it.
            let _ = std::fs::remove_file(&self.path);
        }
        // `file` closes after this, releasing our OFD lock.
    }
}

fn same_file(path: &Path, dev: u64, ino: u64) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// What an open-file-description lock probe found.
fn ofd_lock(file: &File, byte: i64, probe: bool) -> io::Result<bool> {
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    let cmd = if probe {
        libc::F_OFD_GETLK
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: fcntl on a descriptor we own with a pointer to a properly initialised `flock`
    // that lives across the call; the kernel writes only into that struct (F_OFD_GETLK).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r == -1 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) if !probe => Ok(false),
            _ => Err(e),
        };
    }
    if probe {
        // true: someone holds a conflicting lock.
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    } else {
        Ok(true)
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn new_generation() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // RandomState is seeded from the OS's random source once per process and varies per
    // instance; mixed with the time and pid, every create gets a new number.
    let g = RandomState::new().hash_one((now, std::process::id()));
    g.max(1)
}

fn le_u32(h: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[off..off + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(h: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[off..off + 8]);
    u64::from_le_bytes(b)
}

/// A mapped segment. Cheap to clone (the mapping is shared); unmapped when the last clone and
/// every [`Producer`]/[`Consumer`] made from it are gone. The data plane's segment also removes
/// its file then (if the path still names it).
#[derive(Clone)]
pub struct Segment {
    map: Arc<Mapping>,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.map.path)
            .field("side", &self.map.side)
            .field("params", &self.map.params)
            .field("dp_generation", &self.map.generation)
            .finish()
    }
}

impl Segment {
    /// Data plane: creates the segment at `path`, replacing a stale one (but not one a live
    /// data plane still holds: [`SegmentError::Busy`]): unlink, then
    /// `O_CREAT|O_EXCL|O_NOFOLLOW` with mode 0600 (set again with `fchmod`, whatever the
    /// umask), `ftruncate`, `mmap(MAP_SHARED)`, and the header, whose magic is written last.
    /// A new data-plane generation is drawn. Holds the data plane's lock (byte 0 of the file,
    /// an OFD lock) until dropped, so a control process can tell whether it is alive.
    pub fn create(path: impl AsRef<Path>, params: RingParams) -> Result<Segment, SegmentError> {
        let path = path.as_ref();
        params.validate().map_err(SegmentError::Params)?;
        // A live data plane holds its lock on the file at this path: do not pull the segment
        // from under it (two data planes configured with one path).
        if let Ok(old) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            && ofd_lock(&old, Side::DataPlane.lock_byte(), true).unwrap_or(false)
        {
            return Err(SegmentError::Busy {
                path: path.to_path_buf(),
                side: Side::DataPlane.name(),
            });
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, "remove stale segment")(e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err(path, "create"))?;
        // From here on a failure must not leave the file behind.
        let result = Self::init(path, file, params);
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn init(path: &Path, file: File, params: RingParams) -> Result<Segment, SegmentError> {
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(io_err(path, "fchmod"))?;
        if !ofd_lock(&file, Side::DataPlane.lock_byte(), false).map_err(io_err(path, "lock"))? {
            return Err(SegmentError::Busy {
                path: path.to_path_buf(),
                side: Side::DataPlane.name(),
            });
        }
        let size = params.segment_size();
        file.set_len(size).map_err(io_err(path, "ftruncate"))?;
        let meta = file.metadata().map_err(io_err(path, "fstat"))?;
        let len = size as usize;
        let base = Mapping::map(&file, len, path)?;
        let generation = new_generation();
        let map = Mapping {
            base,
            len,
            file,
            side: Side::DataPlane,
            path: path.to_path_buf(),
            params,
            generation,
            dev: meta.dev(),
            ino: meta.ino(),
            claimed_producer: [AtomicBool::new(false), AtomicBool::new(false)],
            claimed_consumer: [AtomicBool::new(false), AtomicBool::new(false)],
        };
        // The file is new, so everything (indices, slots) is zero. Header fields first ...
        let mut h = [0u8; layout::HEADER_LEN];
        h[layout::VERSION..][..4].copy_from_slice(&VERSION.to_le_bytes());
        h[layout::HEADER_LEN_FIELD..][..4]
            .copy_from_slice(&(layout::HEADER_LEN as u32).to_le_bytes());
        h[layout::RECORD_SIZE..][..4].copy_from_slice(&params.record_size.to_le_bytes());
        h[layout::TO_DP_SLOTS..][..4].copy_from_slice(&params.to_dp_slots.to_le_bytes());
        h[layout::FROM_DP_SLOTS..][..4].copy_from_slice(&params.from_dp_slots.to_le_bytes());
        h[layout::SEGMENT_SIZE..][..8].copy_from_slice(&size.to_le_bytes());
        h[layout::DP_GENERATION..][..8].copy_from_slice(&generation.to_le_bytes());
        h[layout::DP_PID..][..4].copy_from_slice(&std::process::id().to_le_bytes());
        map.write(8, &h[8..]);
        // ... then the magic, released: whoever sees it sees the rest.
        map.atomic(layout::MAGIC)
            .store(u64::from_ne_bytes(MAGIC), Ordering::Release);
        Ok(Segment { map: Arc::new(map) })
    }

    /// Control process: attaches to the data plane's segment at `path`. Refuses a file that
    /// is not a regular file (symlinks are not followed), not owned by our effective uid, has
    /// any permission bit beyond 0600, has a wrong magic, version or header, or whose size is
    /// not what the header says. Takes the control lock (byte 1, an OFD lock, released when
    /// the process dies): a second control process gets [`SegmentError::Busy`].
    ///
    /// Right after the data plane (re)starts, [`SegmentError::NotReady`] or a not-found
    /// [`SegmentError::Io`] mean "retry shortly".
    pub fn attach(path: impl AsRef<Path>) -> Result<Segment, SegmentError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let meta = file.metadata().map_err(io_err(path, "fstat"))?;
        let p = || path.to_path_buf();
        if !meta.file_type().is_file() {
            return Err(SegmentError::NotAFile { path: p() });
        }
        if meta.uid() != euid() {
            return Err(SegmentError::Owner {
                path: p(),
                owner: meta.uid(),
                ours: euid(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & !0o600 != 0 {
            return Err(SegmentError::Mode { path: p(), mode });
        }
        let size = meta.len();
        if size < layout::HEADER_LEN as u64 {
            if size == 0 {
                return Err(SegmentError::NotReady { path: p() });
            }
            return Err(SegmentError::Size {
                path: p(),
                size,
                expected: layout::HEADER_LEN as u64,
            });
        }
        if size > MAX_SEGMENT_SIZE {
            return Err(SegmentError::BadHeader {
                path: p(),
                what: format!("{size} bytes is larger than any segment ({MAX_SEGMENT_SIZE})"),
            });
        }
        if !ofd_lock(&file, Side::Control.lock_byte(), false).map_err(io_err(path, "lock"))? {
            return Err(SegmentError::Busy {
                path: p(),
                side: Side::Control.name(),
            });
        }
        let len = size as usize;
        let base = Mapping::map(&file, len, path)?;
        let mut map = Mapping {
            base,
            len,
            file,
            side: Side::Control,
            path: p(),
            params: RingParams::default(),
            generation: 0,
            dev: meta.dev(),
            ino: meta.ino(),
            claimed_producer: [AtomicBool::new(false), AtomicBool::new(false)],
            claimed_consumer: [AtomicBool::new(false), AtomicBool::new(false)],
        };
        let magic = map
            .atomic(layout::MAGIC)
            .load(Ordering::Acquire)
            .to_ne_bytes();
        if magic == [0; 8] {
            return Err(SegmentError::NotReady { path: p() });
        }
        if magic != MAGIC {
            return Err(SegmentError::NotARing {
                path: p(),
                found: magic,
            });
        }
        let mut h = [0u8; layout::HEADER_LEN];
        map.read(0, &mut h);
        let version = le_u32(&h, layout::VERSION);
        if version != VERSION {
            return Err(SegmentError::Version {
                path: p(),
                found: version,
                ours: VERSION,
            });
        }
        let bad = |what: String| SegmentError::BadHeader { path: p(), what };
        let header_len = le_u32(&h, layout::HEADER_LEN_FIELD);
        if header_len as usize != layout::HEADER_LEN {
            return Err(bad(format!(
                "header length {header_len}, expected {}",
                layout::HEADER_LEN
            )));
        }
        let flags = le_u32(&h, layout::FLAGS);
        if flags != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let params = RingParams {
            record_size: le_u32(&h, layout::RECORD_SIZE),
            to_dp_slots: le_u32(&h, layout::TO_DP_SLOTS),
            from_dp_slots: le_u32(&h, layout::FROM_DP_SLOTS),
        };
        params.validate().map_err(bad)?;
        let declared = le_u64(&h, layout::SEGMENT_SIZE);
        if declared != params.segment_size() {
            return Err(bad(format!(
                "segment size field {declared} does not match the ring sizes ({})",
                params.segment_size()
            )));
        }
        if size != declared {
            return Err(SegmentError::Size {
                path: p(),
                size,
                expected: declared,
            });
        }
        map.params = params;
        map.generation = le_u64(&h, layout::DP_GENERATION);
        Ok(Segment { map: Arc::new(map) })
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.map.path
    }

    /// Which side this mapping belongs to.
    pub fn side(&self) -> Side {
        self.map.side
    }

    /// The ring sizes.
    pub fn params(&self) -> RingParams {
        self.map.params
    }

    /// The generation the data plane drew when it created the segment: a different value
    /// means a different (restarted) data plane, which has none of the SAs.
    pub fn dp_generation(&self) -> u64 {
        self.map.generation
    }

    /// Whether the path still names this segment (false once the data plane removed it or
    /// a restarted data plane replaced it: reattach and re-push everything).
    pub fn is_current(&self) -> bool {
        same_file(&self.map.path, self.map.dev, self.map.ino)
    }

    /// Whether the other side holds its lock on this segment: for the control process, "the
    /// data plane that created it is alive"; for the data plane, "a control process is
    /// attached". Locks die with their process, `kill -9` included.
    pub fn peer_alive(&self) -> io::Result<bool> {
        ofd_lock(&self.map.file, self.map.side.peer().lock_byte(), true)
    }

    /// The producer of the ring this side sends on (control: to the data plane; data plane:
    /// events). One per ring and mapping at a time.
    pub fn sender(&self) -> Result<Producer, crate::ring::RingError> {
        Producer::new(self.map.clone(), self.map.side.sends_on())
    }

    /// The consumer of the ring this side receives on. One per ring and mapping at a time.
    pub fn receiver(&self) -> Result<Consumer, crate::ring::RingError> {
        Consumer::new(self.map.clone(), self.map.side.receives_on())
    }
}
