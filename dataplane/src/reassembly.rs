//! Reassembly of outer IP fragments of ESP, per worker.
//!
//! ESP arrives fragmented when a link between the peers has a smaller MTU than the sender
//! assumed (seed 004). The kernel cannot help here: it has no ESP, and a datagram it reassembled
//! would never come back to the data plane. So the XDP program steers ESP fragments to the
//! AF_XDP socket like whole ESP packets, and the worker reassembles them before the pipeline
//! sees them (as Cisco and VPP do: reassemble, then decrypt).
//!
//! The table is small and fixed: [`SLOTS`] datagrams in progress per worker, each up to
//! [`MAX_DATAGRAM`] bytes, no allocation after start. A datagram not complete within
//! [`TIMEOUT_NS`] is dropped (`fragment_timeout`); overlapping fragments drop the whole datagram
//! (RFC 5722 for IPv6; the same for IPv4, where overlaps only serve evasion); a datagram that
//! would not fit a frame is dropped (`fragment_too_big`). Fragments of one datagram must reach
//! the same worker: NICs hash fragments on addresses only, so they do.
//!
//! IPv6 fragments are reassembled when the Fragment header directly follows the fixed header
//! (what senders produce for ESP); other layouts are dropped as `unsupported`.

use crate::counters::DropReason;

/// Datagrams in progress per worker.
pub const SLOTS: usize = 16;
/// Largest reassembled IP datagram (it must fit a 2 KiB UMEM frame after the headroom).
pub const MAX_DATAGRAM: usize = 1760;
/// How long a datagram may take to complete.
pub const TIMEOUT_NS: u64 = 2_000_000_000;

const ETH: usize = 14;
const ETH_VLAN: usize = 18;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Key {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    id: u32,
    proto: u8,
}

#[derive(Clone, Copy, Debug)]
struct Range {
    start: u16,
    end: u16,
}

struct Slot {
    key: Key,
    used: bool,
    started_ns: u64,
    /// The Ethernet header and the unfragmentable IP header (from the first fragment).
    head: [u8; 18 + 60],
    eth_len: u8,
    ip_hdr_len: u8,
    have_first: bool,
    /// Payload length once the last fragment (MF=0) arrived.
    total: Option<u16>,
    ranges: arrayvec::ArrayVec<Range, 32>,
    payload: Box<[u8; MAX_DATAGRAM]>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            key: Key::default(),
            used: false,
            started_ns: 0,
            head: [0; 78],
            eth_len: 0,
            ip_hdr_len: 0,
            have_first: false,
            total: None,
            ranges: arrayvec::ArrayVec::new(),
            payload: Box::new([0; MAX_DATAGRAM]),
        }
    }
}

/// What became of a frame given to [`Reassembler::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not a fragment: process the frame as it is.
    NotFragment,
    /// Kept (copied); the frame can be released.
    Held,
    /// The datagram is complete and was written into the frame's buffer at
    /// `(start, len)` (Ethernet header included), ready for the pipeline.
    Complete(usize, usize),
    /// Dropped, counted under the reason (the frame can be released).
    Drop(DropReason),
}

/// Counters of one worker's reassembly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReassemblyStats {
    /// Fragments received.
    pub fragments: u64,
    /// Datagrams completed.
    pub reassembled: u64,
    /// Datagrams that timed out (each counted once, with its fragments).
    pub timeouts: u64,
}

/// One worker's reassembly table.
pub struct Reassembler {
    slots: Vec<Slot>,
    /// Counters.
    pub stats: ReassemblyStats,
    /// Fragments dropped with their datagram on timeout (added to `fragment_timeout`).
    pending_timeout_drops: u64,
}

impl std::fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reassembler")
            .field("in_progress", &self.slots.iter().filter(|s| s.used).count())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the fragment's pieces are.
struct Frag {
    key: Key,
    eth_len: usize,
    /// Unfragmentable IP header length (IPv4 header; IPv6 fixed header).
    hdr_len: usize,
    /// Where the fragment's payload starts (after the IPv6 Fragment header).
    data_at: usize,
    data_len: usize,
    offset: usize,
    more: bool,
    /// IPv6: the Fragment header's next header (what the reassembled packet carries).
    next: u8,
}

impl Reassembler {
    /// An empty table (allocates its buffers now, once).
    pub fn new() -> Reassembler {
        Reassembler {
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            stats: ReassemblyStats::default(),
            pending_timeout_drops: 0,
        }
    }

    /// Fragments dropped by timeouts since the last call (for the drop counters).
    pub fn take_timeout_drops(&mut self) -> u64 {
        std::mem::take(&mut self.pending_timeout_drops)
    }

    /// Drop datagrams older than [`TIMEOUT_NS`].
    pub fn expire(&mut self, now_ns: u64) {
        for s in &mut self.slots {
            if s.used && now_ns.saturating_sub(s.started_ns) > TIMEOUT_NS {
                s.used = false;
                self.stats.timeouts += 1;
                self.pending_timeout_drops += s.ranges.len() as u64;
            }
        }
    }

    /// Offer the frame `buf[start..start + len]` received on the WAN port. A fragment is
    /// copied into the table; when it completes its datagram, the whole datagram is written
    /// back into `buf` (which must be the frame's whole buffer) and its place returned.
    pub fn push(&mut self, buf: &mut [u8], start: usize, len: usize, now_ns: u64) -> Outcome {
        let Some(frame) = buf.get(start..start.saturating_add(len)) else {
            return Outcome::Drop(DropReason::Truncated);
        };
        let f = match parse(frame) {
            Ok(Some(f)) => f,
            Ok(None) => return Outcome::NotFragment,
            Err(r) => {
                self.stats.fragments += 1;
                return Outcome::Drop(r);
            }
        };
        self.stats.fragments += 1;
        self.expire(now_ns);
        let end = f.offset + f.data_len;
        if end > MAX_DATAGRAM - f.hdr_len || (f.more && f.data_len % 8 != 0) {
            let r = if end > MAX_DATAGRAM - f.hdr_len {
                DropReason::FragmentTooBig
            } else {
                DropReason::Malformed
            };
            self.forget(&f.key);
            return Outcome::Drop(r);
        }
        let idx = match self.slots.iter().position(|s| s.used && s.key == f.key) {
            Some(i) => i,
            None => match self.slots.iter().position(|s| !s.used) {
                Some(i) => {
                    let s = &mut self.slots[i];
                    s.used = true;
                    s.key = f.key;
                    s.started_ns = now_ns;
                    s.have_first = false;
                    s.total = None;
                    s.ranges.clear();
                    i
                }
                None => return Outcome::Drop(DropReason::FragmentTableFull),
            },
        };
        let s = &mut self.slots[idx];
        // Overlaps (and duplicates) drop the datagram.
        let (lo, hi) = (f.offset as u16, end as u16);
        if s.ranges.iter().any(|r| lo < r.end && r.start < hi)
            || (!f.more && s.total.is_some())
            || s.total.is_some_and(|t| hi > t)
            || (!f.more && s.ranges.iter().any(|r| r.end > hi))
        {
            s.used = false;
            return Outcome::Drop(DropReason::FragmentInvalid);
        }
        if s.ranges.try_push(Range { start: lo, end: hi }).is_err() {
            s.used = false;
            return Outcome::Drop(DropReason::FragmentInvalid);
        }
        s.payload[f.offset..end].copy_from_slice(&frame[f.data_at..f.data_at + f.data_len]);
        if !f.more {
            s.total = Some(hi);
        }
        if f.offset == 0 {
            let head_len = f.eth_len + f.hdr_len;
            s.head[..head_len].copy_from_slice(&frame[..head_len]);
            s.eth_len = f.eth_len as u8;
            s.ip_hdr_len = f.hdr_len as u8;
            s.have_first = true;
            if f.key.v6 {
                // The reassembled packet carries what the Fragment header named.
                s.head[f.eth_len + 6] = f.next;
            }
        }
        let Some(total) = s.total else {
            return Outcome::Held;
        };
        let covered: usize = s.ranges.iter().map(|r| usize::from(r.end - r.start)).sum();
        if !s.have_first || covered != usize::from(total) {
            return Outcome::Held;
        }
        // Complete: lay the datagram into this frame's buffer, in front of where the last
        // fragment sat (the headroom in front of received data is at least 256 bytes and the
        // datagram fits the frame: checked against MAX_DATAGRAM above).
        s.used = false;
        let eth_len = usize::from(s.eth_len);
        let hdr_len = usize::from(s.ip_hdr_len);
        let total = usize::from(total);
        let out_len = eth_len + hdr_len + total;
        let out_at = buf.len().saturating_sub(out_len).min(start);
        let Some(out) = buf.get_mut(out_at..out_at + out_len) else {
            return Outcome::Drop(DropReason::FragmentTooBig);
        };
        out[..eth_len + hdr_len].copy_from_slice(&s.head[..eth_len + hdr_len]);
        out[eth_len + hdr_len..].copy_from_slice(&s.payload[..total]);
        let ip = &mut out[eth_len..];
        if s.key.v6 {
            ip[4..6].copy_from_slice(&(total as u16).to_be_bytes());
        } else {
            ip[2..4].copy_from_slice(&((hdr_len + total) as u16).to_be_bytes());
            ip[6] &= 0x40; // keep DF, clear MF and the offset
            ip[7] = 0;
            ip[10] = 0;
            ip[11] = 0;
            let sum = espgw_wire::checksum::sum(&ip[..hdr_len]);
            ip[10..12].copy_from_slice(&(!sum).to_be_bytes());
        }
        self.stats.reassembled += 1;
        Outcome::Complete(out_at, out_len)
    }

    fn forget(&mut self, key: &Key) {
        for s in &mut self.slots {
            if s.used && s.key == *key {
                s.used = false;
            }
        }
    }
}

/// Is this Ethernet frame an IP fragment? Where are its parts?
fn parse(frame: &[u8]) -> Result<Option<Frag>, DropReason> {
    let (eth_len, ethertype) = match frame.get(12..14) {
        Some([0x81, 0x00]) | Some([0x88, 0xa8]) => {
            (ETH_VLAN, frame.get(16..18).ok_or(DropReason::Truncated)?)
        }
        Some(t) => (ETH, t),
        None => return Err(DropReason::Truncated),
    };
    let ip = frame.get(eth_len..).ok_or(DropReason::Truncated)?;
    match ethertype {
        [0x08, 0x00] => {
            if ip.len() < 20 {
                return Err(DropReason::Truncated);
            }
            let flags_off = u16::from_be_bytes([ip[6], ip[7]]);
            let more = flags_off & 0x2000 != 0;
            let offset = usize::from(flags_off & 0x1fff) * 8;
            if !more && offset == 0 {
                return Ok(None);
            }
            let hdr_len = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if hdr_len < 20 || total < hdr_len || total > ip.len() {
                return Err(DropReason::Malformed);
            }
            let mut key = Key {
                v6: false,
                id: u32::from(u16::from_be_bytes([ip[4], ip[5]])),
                proto: ip[9],
                ..Key::default()
            };
            key.src[..4].copy_from_slice(&ip[12..16]);
            key.dst[..4].copy_from_slice(&ip[16..20]);
            Ok(Some(Frag {
                key,
                eth_len,
                hdr_len,
                data_at: eth_len + hdr_len,
                data_len: total - hdr_len,
                offset,
                more,
                next: ip[9],
            }))
        }
        [0x86, 0xdd] => {
            if ip.len() < 40 {
                return Err(DropReason::Truncated);
            }
            if ip[6] != 44 {
                // Not a fragment, or a Fragment header behind other extension headers.
                return Ok(None);
            }
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + payload > ip.len() || payload < 8 {
                return Err(DropReason::Malformed);
            }
            let fh = &ip[40..48];
            let off_m = u16::from_be_bytes([fh[2], fh[3]]);
            let offset = usize::from(off_m >> 3) * 8;
            let more = off_m & 1 != 0;
            let mut key = Key {
                v6: true,
                id: u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]),
                proto: fh[0],
                ..Key::default()
            };
            key.src.copy_from_slice(&ip[8..24]);
            key.dst.copy_from_slice(&ip[24..40]);
            if !more && offset == 0 {
                // An atomic fragment (RFC 6946): process as it is, without the header. Rare for
                // ESP; not worth a copy here.
                return Err(DropReason::Unsupported);
            }
            Ok(Some(Frag {
                key,
                eth_len,
                hdr_len: 40,
                data_at: eth_len + 48,
                data_len: payload - 8,
                offset,
                more,
                next: fh[0],
            }))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: usize = 256;

    /// An Ethernet + IPv4 ESP datagram of `len` payload bytes with a recognisable pattern.
    fn datagram4(len: usize, id: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + len];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[8] = 64;
        ip[9] = 50;
        ip[12..16].copy_from_slice(&[198, 51, 100, 7]);
        ip[16..20].copy_from_slice(&[203, 0, 113, 1]);
        for (i, b) in ip[20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let s = espgw_wire::checksum::sum(&ip[..20]);
        ip[10..12].copy_from_slice(&(!s).to_be_bytes());
        f
    }

    /// Split an IPv4 datagram into fragments of `chunk` payload bytes (a multiple of 8).
    fn fragment4(d: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let payload = &d[34..];
        let mut out = Vec::new();
        let mut off = 0;
        while off < payload.len() {
            let n = chunk.min(payload.len() - off);
            let more = off + n < payload.len();
            let mut f = d[..34].to_vec();
            f.extend_from_slice(&payload[off..off + n]);
            let ip = &mut f[14..];
            ip[2..4].copy_from_slice(&((20 + n) as u16).to_be_bytes());
            let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&fo.to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let s = espgw_wire::checksum::sum(&ip[..20]);
            ip[10..12].copy_from_slice(&(!s).to_be_bytes());
            out.push(f);
            off += n;
        }
        out
    }

    fn push(r: &mut Reassembler, frame: &[u8], now: u64) -> (Outcome, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[HEAD..HEAD + frame.len()].copy_from_slice(frame);
        let o = r.push(&mut buf, HEAD, frame.len(), now);
        let out = match o {
            Outcome::Complete(at, len) => buf[at..at + len].to_vec(),
            _ => Vec::new(),
        };
        (o, out)
    }

    #[test]
    fn in_order_and_out_of_order_give_back_the_datagram() {
        let d = datagram4(1480, 77);
        for order in [vec![0, 1, 2], vec![2, 0, 1], vec![1, 2, 0]] {
            let frags = fragment4(&d, 600);
            assert_eq!(frags.len(), 3);
            let mut r = Reassembler::new();
            let mut got = None;
            for (k, i) in order.iter().enumerate() {
                let (o, out) = push(&mut r, &frags[*i], 1);
                if k < 2 {
                    assert_eq!(o, Outcome::Held);
                } else {
                    assert!(matches!(o, Outcome::Complete(..)), "{o:?}");
                    got = Some(out);
                }
            }
            assert_eq!(got.unwrap(), d, "order {order:?}");
            assert_eq!(r.stats.reassembled, 1);
        }
    }

    #[test]
    fn whole_packets_pass_and_ipv6_fragments_reassemble() {
        let mut r = Reassembler::new();
        let d = datagram4(100, 1);
        assert_eq!(push(&mut r, &d, 0).0, Outcome::NotFragment);
        // IPv6: fixed header + Fragment header + 2 pieces.
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 13) as u8).collect();
        let mk = |off: usize, data: &[u8], more: bool| {
            let mut f = vec![0u8; 14 + 48];
            f[12..14].copy_from_slice(&[0x86, 0xdd]);
            f[14] = 0x60;
            f[14 + 4..14 + 6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            f[14 + 6] = 44;
            f[14 + 7] = 64;
            f[14 + 8] = 0x20;
            f[14 + 24] = 0x20;
            f[14 + 39] = 1;
            f[54] = 50; // next header: ESP
            let om = ((off / 8) as u16) << 3 | u16::from(more);
            f[56..58].copy_from_slice(&om.to_be_bytes());
            f[58..62].copy_from_slice(&0xdead_beefu32.to_be_bytes());
            f.extend_from_slice(data);
            f
        };
        assert_eq!(
            push(&mut r, &mk(504, &payload[504..], false), 0).0,
            Outcome::Held
        );
        let (o, out) = push(&mut r, &mk(0, &payload[..504], true), 0);
        assert!(matches!(o, Outcome::Complete(..)));
        assert_eq!(out[14 + 6], 50, "next header is ESP again");
        assert_eq!(u16::from_be_bytes([out[18], out[19]]), 1000);
        assert_eq!(&out[14 + 40..], &payload[..]);
    }

    #[test]
    fn overlap_timeout_too_big_and_full_table_are_dropped_and_named() {
        let d = datagram4(1480, 5);
        let frags = fragment4(&d, 600);
        // Duplicate fragment = overlap: the datagram is dropped.
        let mut r = Reassembler::new();
        assert_eq!(push(&mut r, &frags[0], 0).0, Outcome::Held);
        assert_eq!(
            push(&mut r, &frags[0], 0).0,
            Outcome::Drop(DropReason::FragmentInvalid)
        );
        assert_eq!(push(&mut r, &frags[1], 0).0, Outcome::Held, "starts over");
        // Timeout: the rest comes too late.
        let mut r = Reassembler::new();
        assert_eq!(push(&mut r, &frags[0], 0).0, Outcome::Held);
        assert_eq!(push(&mut r, &frags[1], 0).0, Outcome::Held);
        assert_eq!(push(&mut r, &frags[2], TIMEOUT_NS + 1).0, Outcome::Held);
        assert_eq!(r.stats.timeouts, 1);
        assert_eq!(r.take_timeout_drops(), 2);
        // Too big for a frame.
        let big = datagram4(2000, 9);
        let mut r = Reassembler::new();
        let fr = fragment4(&big, 1000);
        assert_eq!(push(&mut r, &fr[0], 0).0, Outcome::Held);
        assert_eq!(
            push(&mut r, &fr[1], 0).0,
            Outcome::Drop(DropReason::FragmentTooBig)
        );
        // Table full.
        let mut r = Reassembler::new();
        for id in 0..SLOTS as u16 {
            let f = fragment4(&datagram4(1480, 100 + id), 600);
            assert_eq!(push(&mut r, &f[0], 0).0, Outcome::Held);
        }
        let f = fragment4(&datagram4(1480, 999), 600);
        assert_eq!(
            push(&mut r, &f[0], 0).0,
            Outcome::Drop(DropReason::FragmentTableFull)
        );
        // Garbage never panics.
        let mut r = Reassembler::new();
        for n in 0..60 {
            let mut g = frags[1].clone();
            g.truncate(n);
            let _ = push(&mut r, &g, 0);
        }
    }
}
