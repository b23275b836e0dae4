//! AF_XDP sockets for the live gateway.
//!
//! Each worker owns one UMEM (an anonymous mapping of 2 KiB frames) and one AF_XDP socket per
//! port on its queue: the WAN socket and the LAN socket share the UMEM (`XDP_SHARED_UMEM`), each
//! with its own fill and completion ring. A frame received on one port is therefore transmitted
//! on the other by passing its descriptor, with no copy, and the pipeline rewrites it in place:
//! ESP encapsulation grows the frame into the headroom in front of the received data (the kernel
//! writes received packets 256 bytes into the frame), decapsulation moves the start forward. The
//! TX descriptor carries the new start, which is why the AF_XDP library must let us choose it
//! (see docs/ARCHITECTURE.md, "AF_XDP library").
//!
//! Frames are owned by exactly one of: the worker's free list, a fill ring, an RX ring (kernel
//! filled it, worker has not read it), the worker (between RX and TX/free), a TX ring, a
//! completion ring. Every path returns a frame to the free list; the counts are checked in
//! [`XskWorker::frames_accounted`] each time a worker publishes its counters.
//!
//! This module holds the project's `unsafe` for the UMEM: the mapping itself and the slices of
//! frames the worker owns.

use crate::config::PortId;
use std::ffi::CString;
use std::num::NonZeroU32;
use std::ptr::NonNull;
use xdpilone::xdp::XdpDesc;
use xdpilone::{
    CompletionQueue, FillQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig,
    User,
};

/// Size of a UMEM frame. A frame holds one packet: 256 bytes of headroom (where ESP headers
/// are written in front of received data), up to 1792 bytes of packet and ESP trailer.
pub const FRAME_SIZE: u32 = 2048;

/// Why the sockets could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// The UMEMs would exceed RLIMIT_MEMLOCK.
    #[error(
        "the AF_XDP buffers need {need_kib} KiB of locked memory ({workers} worker(s) x {frames} frames x 2 KiB) but the locked-memory limit (ulimit -l) is {limit_kib} KiB: lower umem_frames or the number of cores, or raise the limit"
    )]
    Memlock {
        /// What the configuration needs.
        need_kib: u64,
        /// RLIMIT_MEMLOCK.
        limit_kib: u64,
        /// Workers.
        workers: usize,
        /// Frames per worker.
        frames: u32,
    },
    /// The kernel refused the UMEM (usually the locked-memory limit).
    #[error(
        "registering {kib} KiB of AF_XDP buffers failed: {err} (the locked-memory limit, ulimit -l, is the usual cause)"
    )]
    Umem {
        /// Size asked for.
        kib: u64,
        /// The error.
        err: std::io::Error,
    },
    /// mmap failed.
    #[error("allocating {kib} KiB for AF_XDP buffers failed: {err}")]
    Mmap {
        /// Size asked for.
        kib: u64,
        /// The error.
        err: std::io::Error,
    },
    /// A socket step failed.
    #[error("AF_XDP socket on {ifname} queue {queue}: {what} failed: {err}{hint}")]
    Socket {
        /// Interface.
        ifname: String,
        /// Queue.
        queue: u32,
        /// The step.
        what: &'static str,
        /// The error.
        err: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

fn errno(e: xdpilone::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.get_raw().abs())
}

/// Did the kernel bind this AF_XDP socket in zero-copy mode (`XDP_OPTIONS_ZEROCOPY`)?
fn bound_zero_copy(fd: i32) -> bool {
    const SOL_XDP: libc::c_int = 283;
    const XDP_OPTIONS: libc::c_int = 8;
    const XDP_OPTIONS_ZEROCOPY: u32 = 1;
    let mut flags: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `flags` and updates `len`; `fd` is
    // an AF_XDP socket this process owns.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_OPTIONS,
            (&mut flags as *mut u32).cast(),
            &mut len,
        )
    };
    rc == 0 && flags & XDP_OPTIONS_ZEROCOPY != 0
}

/// RLIMIT_MEMLOCK in bytes (`None`: unlimited).
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}

/// Check that `workers` UMEMs of `frames` frames fit RLIMIT_MEMLOCK (with a little room for
/// the rings), before anything is created.
pub fn check_memlock(workers: usize, frames: u32) -> Result<(), XskError> {
    let need = workers as u64 * u64::from(frames) * u64::from(FRAME_SIZE);
    match memlock_limit() {
        Some(limit) if need > limit => Err(XskError::Memlock {
            need_kib: need / 1024,
            limit_kib: limit / 1024,
            workers,
            frames,
        }),
        _ => Ok(()),
    }
}

/// An anonymous, page-aligned mapping that holds a UMEM's frames.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Area {
    fn new(len: usize) -> Result<Area, XskError> {
        let kib = len as u64 / 1024;
        // SAFETY: an anonymous private mapping at an address the kernel chooses; no existing
        // memory is affected. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(XskError::Mmap {
                kib,
                err: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(XskError::Mmap {
            kib,
            err: std::io::Error::other("mmap returned NULL"),
        })?;
        Ok(Area { ptr, len })
    }

    fn as_slice_ptr(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; the sockets and the UMEM that
        // reference the area are dropped before it (field order of `XskWorker`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// One AF_XDP socket: a port's queue, bound to the worker's UMEM.
pub struct PortSocket {
    /// Which gateway port.
    pub port: PortId,
    /// Interface name.
    pub ifname: String,
    /// Queue id.
    pub queue: u32,
    /// Bound in zero-copy mode (else copy mode).
    pub zero_copy: bool,
    rx: RingRx,
    tx: RingTx,
    fill: FillQueue,
    comp: CompletionQueue,
    user: User,
    /// Frames in the fill ring or the RX ring (given to the kernel for receiving).
    in_fill: u32,
    /// Frames in the TX ring or the completion ring.
    in_tx: u32,
    /// Entries per ring.
    ring_size: u32,
    /// How many frames the fill ring is given (a share of the UMEM, leaving room for frames in
    /// transmission).
    fill_target: u32,
}

impl std::fmt::Debug for PortSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortSocket")
            .field("port", &self.port)
            .field("ifname", &self.ifname)
            .field("queue", &self.queue)
            .field("zero_copy", &self.zero_copy)
            .finish_non_exhaustive()
    }
}

impl PortSocket {
    /// The socket's file descriptor (for the XSKMAP and for poll).
    pub fn fd(&self) -> i32 {
        self.rx.as_raw_fd()
    }

    /// Kernel-side statistics (drops for a full RX ring, an empty fill ring, ...).
    pub fn kernel_stats(&self) -> serde_json::Value {
        match self.user.statistics_v2() {
            Ok(s) => serde_json::json!({
                "rx_dropped": s.rx_dropped,
                "rx_invalid_descs": s.rx_invalid_descs,
                "tx_invalid_descs": s.tx_invalid_descs,
                "rx_ring_full": s.rx_ring_full,
                "rx_fill_ring_empty": s.rx_fill_ring_empty_descs,
                "tx_ring_empty": s.tx_ring_empty_descs,
            }),
            Err(e) => serde_json::json!({ "error": errno(e).to_string() }),
        }
    }
}

/// A worker's UMEM and its sockets (one per port).
pub struct XskWorker {
    // Field order is drop order: the sockets and the UMEM go before the memory they use.
    sockets: Vec<PortSocket>,
    /// Never read: held so the UMEM outlives its sockets and is released before the area.
    _umem: Umem,
    free: Vec<u64>,
    frames: u32,
    area: Area,
}

impl std::fmt::Debug for XskWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskWorker")
            .field("sockets", &self.sockets)
            .field("frames", &self.frames)
            .field("free", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl XskWorker {
    /// A UMEM of `frames` frames and one socket per `(port, interface)` on `queue`, each with
    /// rings of `ring_size` entries, bound zero-copy where the driver can and in copy mode
    /// otherwise. The fill rings are primed; nothing is received until the sockets are put in
    /// the XDP program's XSKMAP.
    pub fn open(
        ports: &[(PortId, &str)],
        queue: u32,
        frames: u32,
        ring_size: u32,
    ) -> Result<XskWorker, XskError> {
        let len = frames as usize * FRAME_SIZE as usize;
        let area = Area::new(len)?;
        let cfg = UmemConfig {
            fill_size: ring_size,
            complete_size: ring_size,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is a fresh page-aligned mapping of `len` bytes, used for nothing
        // else, and outlives the UMEM (it is dropped after it, see the field order).
        let umem = unsafe { Umem::new(cfg, area.as_slice_ptr()) }.map_err(|e| XskError::Umem {
            kib: len as u64 / 1024,
            err: errno(e),
        })?;
        let ring = NonZeroU32::new(ring_size).unwrap_or(NonZeroU32::MIN);
        let mut sockets = Vec::with_capacity(ports.len());
        for (i, (port, ifname)) in ports.iter().enumerate() {
            let fail =
                |what: &'static str, err: std::io::Error, hint: &'static str| XskError::Socket {
                    ifname: (*ifname).to_string(),
                    queue,
                    what,
                    err,
                    hint,
                };
            let name = CString::new(*ifname)
                .map_err(|_| fail("interface name", std::io::Error::other("contains NUL"), ""))?;
            let mut info = IfInfo::invalid();
            info.from_name(&name).map_err(|e| {
                fail(
                    "looking up the interface",
                    errno(e),
                    ": does the interface exist?",
                )
            })?;
            info.set_queue(queue);
            // The first socket uses the UMEM's own file descriptor; the others share the UMEM.
            let sock = if i == 0 {
                Socket::with_shared(&info, &umem)
            } else {
                Socket::new(&info)
            }
            .map_err(|e| {
                fail(
                    "socket()",
                    errno(e),
                    ": AF_XDP needs root (CAP_NET_RAW, CAP_BPF)",
                )
            })?;
            let device = umem
                .fq_cq(&sock)
                .map_err(|e| fail("creating the fill/completion rings", errno(e), ""))?;
            // No mode flag: the kernel binds zero-copy where the driver supports it and falls
            // back to copy mode otherwise; XDP_OPTIONS tells which it chose. Sockets sharing the
            // UMEM may pass no flags at all: they inherit need_wakeup from the first.
            let sc = SocketConfig {
                rx_size: Some(ring),
                tx_size: Some(ring),
                bind_flags: if i == 0 {
                    SocketConfig::XDP_BIND_NEED_WAKEUP
                } else {
                    0
                },
            };
            let user = umem
                .rx_tx(&sock, &sc)
                .map_err(|e| fail("creating the RX/TX rings", errno(e), ""))?;
            if let Err(e) = umem.bind(&user) {
                let err = errno(e);
                let hint = if err.raw_os_error() == Some(libc::EINVAL) {
                    ": does the interface have that many queues? (ethtool -l; veth: numrxqueues/numtxqueues)"
                } else {
                    ""
                };
                return Err(fail("bind", err, hint));
            }
            let zero_copy = bound_zero_copy(user.as_raw_fd());
            let rx = user
                .map_rx()
                .map_err(|e| fail("mapping the RX ring", errno(e), ""))?;
            let tx = user
                .map_tx()
                .map_err(|e| fail("mapping the TX ring", errno(e), ""))?;
            let (fill, comp) = device.into_parts();
            tracing::info!(
                ifname,
                queue,
                mode = if zero_copy { "zero-copy" } else { "copy" },
                "AF_XDP socket bound"
            );
            sockets.push(PortSocket {
                port: *port,
                ifname: (*ifname).to_string(),
                queue,
                zero_copy,
                rx,
                tx,
                fill,
                comp,
                user,
                in_fill: 0,
                in_tx: 0,
                ring_size,
                fill_target: (frames / (2 * ports.len() as u32).max(1)).clamp(1, ring_size),
            });
        }
        let free = (0..u64::from(frames))
            .rev()
            .map(|i| i * u64::from(FRAME_SIZE))
            .collect();
        let mut w = XskWorker {
            sockets,
            _umem: umem,
            free,
            frames,
            area,
        };
        for i in 0..w.sockets.len() {
            w.refill(i);
        }
        Ok(w)
    }

    /// The sockets, in the order given to [`XskWorker::open`].
    pub fn sockets(&self) -> &[PortSocket] {
        &self.sockets
    }

    /// Frames on the free list.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Every frame is on the free list, in a ring, or nowhere lost: free + fill/RX + TX/completion
    /// equals the UMEM (call between bursts, when the worker holds none).
    pub fn frames_accounted(&self) -> bool {
        let held: u64 = self
            .sockets
            .iter()
            .map(|s| u64::from(s.in_fill) + u64::from(s.in_tx))
            .sum();
        held + self.free.len() as u64 == u64::from(self.frames)
    }

    /// Top up the fill ring of socket `i` to its share of the UMEM (half the frames are split
    /// between the fill rings, the other half is for frames in flight), and wake the kernel if it
    /// asks.
    pub fn refill(&mut self, i: usize) {
        let Some(s) = self.sockets.get_mut(i) else {
            return;
        };
        let want = s.fill_target.saturating_sub(s.in_fill);
        if want > 0 && !self.free.is_empty() {
            let n = want.min(self.free.len() as u32);
            let mut w = s.fill.fill(n);
            let start = self.free.len();
            let k = w.insert(self.free[start - n as usize..].iter().rev().copied());
            w.commit();
            drop(w);
            self.free.truncate(start - k as usize);
            s.in_fill += k;
        }
        if s.fill.needs_wakeup() {
            s.fill.wake();
        }
    }

    /// Move completed transmissions of every socket back to the free list.
    pub fn reclaim(&mut self) {
        for s in &mut self.sockets {
            let mut c = s.comp.complete(s.ring_size);
            let mut n = 0;
            while let Some(addr) = c.read() {
                self.free.push(addr - addr % u64::from(FRAME_SIZE));
                n += 1;
            }
            c.release();
            s.in_tx = s.in_tx.saturating_sub(n);
        }
    }

    /// Take up to `max` received descriptors from socket `i`.
    pub fn receive(&mut self, i: usize, max: u32, out: &mut Vec<XdpDesc>) {
        out.clear();
        let Some(s) = self.sockets.get_mut(i) else {
            return;
        };
        let mut r = s.rx.receive(max);
        while let Some(d) = r.read() {
            out.push(d);
        }
        r.release();
        s.in_fill = s.in_fill.saturating_sub(out.len() as u32);
    }

    /// Take a frame from the free list (its base address), for a packet the worker writes.
    pub fn alloc(&mut self) -> Option<u64> {
        self.free.pop()
    }

    /// The whole 2 KiB frame at `base` (from [`XskWorker::alloc`] or a received descriptor the
    /// worker still holds), or `None` if `base` is not a frame of this UMEM.
    pub fn frame(&mut self, base: u64) -> Option<&mut [u8]> {
        let fs = FRAME_SIZE as usize;
        let base = usize::try_from(base).ok()?;
        if base % fs != 0 || base.checked_add(fs)? > self.area.len {
            return None;
        }
        // SAFETY: the range lies inside the mapping (checked above). The caller holds this frame
        // (it is in no ring and on no free list while it is used), and the `&mut self` borrow
        // keeps any other frame slice from being made meanwhile.
        Some(unsafe { std::slice::from_raw_parts_mut(self.area.ptr.as_ptr().add(base), fs) })
    }

    /// Return a frame the worker holds to the free list.
    pub fn release(&mut self, addr: u64) {
        self.free.push(addr - addr % u64::from(FRAME_SIZE));
    }

    /// Queue frames for transmission on socket `i` and kick the kernel if it asks. Descriptors
    /// that do not fit the TX ring are freed; their number is returned.
    pub fn transmit(&mut self, i: usize, descs: &[XdpDesc]) -> usize {
        let Some(s) = self.sockets.get_mut(i) else {
            for d in descs {
                self.free.push(d.addr - d.addr % u64::from(FRAME_SIZE));
            }
            return descs.len();
        };
        let mut sent = 0;
        // A full ring is usually a kernel that has not been kicked for a while (copy mode sends
        // in the sendto() of the wakeup): kick, take back what completed, and try again before
        // giving up on the rest.
        for attempt in 0..3 {
            if sent < descs.len() {
                let mut w = s.tx.transmit((descs.len() - sent) as u32);
                let n = w.insert(descs[sent..].iter().copied()) as usize;
                w.commit();
                sent += n;
                s.in_tx += n as u32;
            }
            if s.in_tx > 0 && (s.tx.needs_wakeup() || sent < descs.len()) {
                s.tx.wake();
            }
            if sent == descs.len() || attempt == 2 {
                break;
            }
            let mut c = s.comp.complete(s.ring_size);
            let mut done = 0;
            while let Some(addr) = c.read() {
                self.free.push(addr - addr % u64::from(FRAME_SIZE));
                done += 1;
            }
            c.release();
            s.in_tx = s.in_tx.saturating_sub(done);
        }
        for d in &descs[sent..] {
            self.free.push(d.addr - d.addr % u64::from(FRAME_SIZE));
        }
        descs.len() - sent
    }

    /// Kick every TX ring that still holds frames (copy mode sends only when woken).
    pub fn kick(&mut self) {
        for s in &mut self.sockets {
            if s.in_tx > 0 && s.tx.needs_wakeup() {
                s.tx.wake();
            }
        }
    }

    /// The frame buffers behind `descs`, as `(whole 2 KiB frame, offset of the packet in it,
    /// packet length)`, for the pipeline to work on in place. A descriptor that does not
    /// describe a packet inside one of this UMEM's frames is returned as `None` (the kernel never
    /// produces one; it would be dropped).
    pub fn frames_mut<'a>(
        &'a mut self,
        descs: &[XdpDesc],
        out: &mut Vec<Option<(&'a mut [u8], usize, usize)>>,
    ) {
        out.clear();
        let fs = FRAME_SIZE as usize;
        let base = self.area.ptr;
        let total = self.area.len;
        for d in descs {
            let addr = usize::try_from(d.addr).unwrap_or(usize::MAX);
            let chunk = addr - addr % fs;
            let off = addr % fs;
            let len = d.len as usize;
            if chunk.saturating_add(fs) > total || off + len > fs {
                out.push(None);
                continue;
            }
            // SAFETY: `chunk..chunk + fs` lies inside the mapping (checked above). The frame
            // came from this worker's RX ring, so the kernel has finished with it and it is in
            // no ring; the kernel hands each frame out once per fill, so the descriptors of one
            // burst name distinct frames and the slices do not overlap. They live as long as the
            // `&mut self` borrow, during which no frame can be given back to a ring.
            let frame = unsafe { std::slice::from_raw_parts_mut(base.as_ptr().add(chunk), fs) };
            out.push(Some((frame, off, len)));
        }
    }
}
