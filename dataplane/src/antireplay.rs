//! Anti-replay window (RFC 4303 §3.4.3, RFC 6479) and ESN inference (RFC 4303 Appendix A).
//!
//! The window is shared by every worker that receives on the SA, without a lock:
//!
//! * `top` is the highest sequence number that has passed ICV verification (full 64 bits, so the
//!   same word serves ESN inference). It only grows (`fetch_max`).
//! * The bitmap is an array of `N` atomic 64-bit words, `N` a power of two with
//!   `32·N ≥ window + 32` (RFC 6479's "one extra block"). Each word covers one *block* of 32
//!   consecutive sequence numbers: its high 32 bits hold the block number (truncated to 32 bits)
//!   and its low 32 bits the received-bits of that block. Block `b` lives in word `b mod N`.
//!
//! Instead of clearing words eagerly when `top` advances (which races with a concurrent marker:
//! one worker clears a word while another sets a bit in it, and a replay later slips through),
//! a word whose tag is not the expected block is simply stale and is replaced by a
//! compare-and-swap. A marker never replaces a word holding a *newer* block: before replacing, it
//! re-reads `top`, and since every marker raises `top` before it writes its word, a newer block in
//! the word implies `top` already puts this sequence number out of the window.
//!
//! Consequences, which the tests check against a sequential reference model:
//! * a sequence number is accepted at most once, whatever the interleaving of workers;
//! * `check` (before decryption) is read-only; only `mark` (after the ICV verified) changes state,
//!   so forged packets cannot move the window;
//! * the block tag is truncated to 32 bits; a false *match* would need one word to stay untouched
//!   while 2^37 sequence numbers go by, and could then only cause a spurious replay drop, never
//!   the acceptance of a replay.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of a bitmap word that record received sequence numbers.
const BLOCK_BITS: u64 = 32;
const BLOCK_SHIFT: u32 = 5;

/// Largest window we accept; bounds memory per SA (64 KiB of bitmap at this size).
pub const MAX_WINDOW: u32 = 1 << 20;

/// Why a sequence number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// Already received (RFC 4303 "replay").
    Replay,
    /// Left of the window: too old to tell, so refused (or sequence number 0, which is never sent).
    TooOld,
}

/// A lock-free anti-replay window for one inbound SA.
#[derive(Debug)]
pub struct ReplayWindow {
    /// Window size in packets; 0 disables replay protection (but `top` is still tracked for ESN).
    size: u64,
    top: AtomicU64,
    words: Box<[AtomicU64]>,
    mask: usize,
}

impl ReplayWindow {
    /// A window of `size` packets (0 = off, at most [`MAX_WINDOW`]), starting empty.
    ///
    /// `size` above [`MAX_WINDOW`] is clamped; configuration validates it before this point.
    pub fn new(size: u32) -> Self {
        let size = size.min(MAX_WINDOW);
        let words = if size == 0 {
            0
        } else {
            (size as usize).div_ceil(BLOCK_BITS as usize) + 1
        };
        let n = words.next_power_of_two().max(1);
        let words: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        ReplayWindow {
            size: u64::from(size),
            top: AtomicU64::new(0),
            mask: n - 1,
            words,
        }
    }

    /// Window size in packets (0 = replay protection off).
    pub fn size(&self) -> u32 {
        // Constructed from a u32, cannot truncate.
        self.size as u32
    }

    /// Highest authenticated sequence number so far (0 before the first packet).
    pub fn top(&self) -> u64 {
        self.top.load(Ordering::Acquire)
    }

    /// Bytes of memory the bitmap takes (for the memory-per-SA figures).
    pub fn bitmap_bytes(&self) -> usize {
        self.words.len() * std::mem::size_of::<AtomicU64>()
    }

    /// Read-only check before decryption: could `seq` be accepted?
    #[inline]
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if self.size == 0 {
            return Ok(());
        }
        if seq == 0 {
            return Err(ReplayError::TooOld);
        }
        let top = self.top.load(Ordering::Acquire);
        if seq > top {
            return Ok(());
        }
        if top - seq >= self.size {
            return Err(ReplayError::TooOld);
        }
        let (idx, tag, bit) = self.locate(seq);
        let w = self.words[idx].load(Ordering::Acquire);
        if (w >> 32) as u32 == tag && (w as u32) & bit != 0 {
            return Err(ReplayError::Replay);
        }
        Ok(())
    }

    /// Record `seq` as received, after its ICV verified. Fails if another worker accepted the same
    /// sequence number first, or the window moved past it meanwhile.
    #[inline]
    pub fn mark(&self, seq: u64) -> Result<(), ReplayError> {
        if self.size == 0 {
            self.top.fetch_max(seq, Ordering::AcqRel);
            return Ok(());
        }
        if seq == 0 {
            return Err(ReplayError::TooOld);
        }
        let top = self.top.load(Ordering::Acquire);
        if seq > top {
            // Raise `top` before touching the word: the replacement rule below relies on it.
            self.top.fetch_max(seq, Ordering::AcqRel);
        } else if top - seq >= self.size {
            return Err(ReplayError::TooOld);
        }
        let (idx, tag, bit) = self.locate(seq);
        let word = &self.words[idx];
        let mut cur = word.load(Ordering::Acquire);
        loop {
            let new = if (cur >> 32) as u32 == tag {
                if (cur as u32) & bit != 0 {
                    return Err(ReplayError::Replay);
                }
                cur | u64::from(bit)
            } else {
                // Stale word (older block) or a newer block: `top` tells which.
                let top_now = self.top.load(Ordering::Acquire);
                if top_now.saturating_sub(seq) >= self.size {
                    return Err(ReplayError::TooOld);
                }
                (u64::from(tag) << 32) | u64::from(bit)
            };
            match word.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    /// [`mark`](Self::mark) for a run of authenticated sequence numbers, in order, with the same
    /// results as marking them one by one, but one `top` update and one word update per group of
    /// consecutive numbers that share a 32-number block (in-order traffic: two atomic operations
    /// per 32 packets instead of per packet).
    ///
    /// Grouping cannot change an answer: a group spans less than 32 numbers, so raising `top` to
    /// the group's highest first leaves every member inside a window of 64 or more. Smaller
    /// windows are marked one by one.
    pub fn mark_run(&self, seqs: &[u64], out: &mut [Result<(), ReplayError>]) {
        let n = seqs.len().min(out.len());
        if self.size < 2 * BLOCK_BITS {
            for (s, o) in seqs[..n].iter().zip(out[..n].iter_mut()) {
                *o = self.mark(*s);
            }
            return;
        }
        let mut i = 0;
        while i < n {
            let block = seqs[i] >> BLOCK_SHIFT;
            let mut j = i + 1;
            while j < n && seqs[j] >> BLOCK_SHIFT == block {
                j += 1;
            }
            self.mark_group(block, &seqs[i..j], &mut out[i..j]);
            i = j;
        }
    }

    /// Mark numbers that all lie in `block`.
    fn mark_group(&self, block: u64, seqs: &[u64], out: &mut [Result<(), ReplayError>]) {
        let max = seqs.iter().copied().max().unwrap_or(0);
        let top = self.top.load(Ordering::Acquire);
        if max > top {
            self.top.fetch_max(max, Ordering::AcqRel);
        }
        let top = top.max(max);
        // Which bits this group sets; duplicates inside the group and numbers already too old
        // are answered here.
        let mut mask = 0u32;
        for (s, o) in seqs.iter().zip(out.iter_mut()) {
            let bit = 1u32 << (s & (BLOCK_BITS - 1));
            *o = if *s == 0 || top - s >= self.size {
                Err(ReplayError::TooOld)
            } else if mask & bit != 0 {
                Err(ReplayError::Replay)
            } else {
                mask |= bit;
                Ok(())
            };
        }
        if mask == 0 {
            return;
        }
        let idx = (block as usize) & self.mask;
        let tag = block as u32;
        let word = &self.words[idx];
        let mut cur = word.load(Ordering::Acquire);
        let seen = loop {
            let (new, seen) = if (cur >> 32) as u32 == tag {
                (cur | u64::from(mask), cur as u32 & mask)
            } else {
                // A stale word (older block) is replaced; a newer block means the window has
                // moved past this one. As in `mark`, `top` decides, number by number.
                let top_now = self.top.load(Ordering::Acquire);
                mask = 0;
                for (s, o) in seqs.iter().zip(out.iter_mut()) {
                    if o.is_ok() {
                        if top_now - s >= self.size {
                            *o = Err(ReplayError::TooOld);
                        } else {
                            mask |= 1u32 << (s & (BLOCK_BITS - 1));
                        }
                    }
                }
                if mask == 0 {
                    return;
                }
                ((u64::from(tag) << 32) | u64::from(mask), 0)
            };
            if new == cur {
                break seen;
            }
            match word.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break seen,
                Err(actual) => cur = actual,
            }
        };
        if seen != 0 {
            for (s, o) in seqs.iter().zip(out.iter_mut()) {
                if o.is_ok() && seen & (1u32 << (s & (BLOCK_BITS - 1))) != 0 {
                    *o = Err(ReplayError::Replay);
                }
            }
        }
    }

    /// Has `seq` been marked? (Inside the window only; for `show`-style bitmap dumps and tests.)
    pub fn is_marked(&self, seq: u64) -> bool {
        if self.size == 0 || seq == 0 {
            return false;
        }
        let top = self.top();
        if seq > top || top - seq >= self.size {
            return false;
        }
        let (idx, tag, bit) = self.locate(seq);
        let w = self.words[idx].load(Ordering::Acquire);
        (w >> 32) as u32 == tag && (w as u32) & bit != 0
    }

    /// Full 64-bit sequence number for a received low half, per RFC 4303 Appendix A2.1.
    ///
    /// With ESN off the answer is simply `seq_low`. With the window off, a half-space window is
    /// used for the inference. A guess that points before sequence-number space (high half
    /// "−1") is taken as high half 0: the ICV decides.
    #[inline]
    pub fn infer_seq(&self, seq_low: u32, esn: bool) -> u64 {
        if !esn {
            return u64::from(seq_low);
        }
        let w: u32 = if self.size == 0 {
            1 << 31
        } else {
            self.size as u32
        };
        let top = self.top();
        let th = (top >> 32) as u32;
        let tl = top as u32;
        let lower = tl.wrapping_sub(w).wrapping_add(1);
        let high = if tl >= w - 1 {
            // Window inside one sub-space.
            if seq_low >= lower {
                th
            } else {
                th.wrapping_add(1)
            }
        } else if seq_low >= lower {
            // Window spans two sub-spaces and seq_low is in the older one.
            th.saturating_sub(1)
        } else {
            th
        };
        (u64::from(high) << 32) | u64::from(seq_low)
    }

    /// Start loading the window's state for a packet whose sequence number ends in `seq_low`
    /// (the low 32 bits from the ESP header: they choose the bitmap word, ESN or not).
    #[inline]
    pub fn prefetch(&self, seq_low: u32) {
        espgw_crypto::prefetch_lines(std::ptr::from_ref(&self.top).cast(), 8);
        if let Some(w) = self.words.get(self.locate(u64::from(seq_low)).0) {
            espgw_crypto::prefetch_lines(std::ptr::from_ref(w).cast(), 8);
        }
    }

    #[inline]
    fn locate(&self, seq: u64) -> (usize, u32, u32) {
        let block = seq >> BLOCK_SHIFT;
        let idx = (block as usize) & self.mask;
        let tag = block as u32;
        let bit = 1u32 << (seq & (BLOCK_BITS - 1));
        (idx, tag, bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    /// The sequential reference: a set of every accepted number and the highest one.
    struct Model {
        size: u64,
        top: u64,
        seen: BTreeSet<u64>,
    }

    impl Model {
        fn new(size: u32) -> Self {
            Model {
                size: u64::from(size),
                top: 0,
                seen: BTreeSet::new(),
            }
        }
        fn accept(&mut self, seq: u64) -> Result<(), ReplayError> {
            if self.size == 0 {
                self.top = self.top.max(seq);
                return Ok(());
            }
            if seq == 0 || (seq <= self.top && self.top - seq >= self.size) {
                return Err(ReplayError::TooOld);
            }
            if !self.seen.insert(seq) {
                return Err(ReplayError::Replay);
            }
            self.top = self.top.max(seq);
            Ok(())
        }
    }

    fn check_then_mark(w: &ReplayWindow, seq: u64) -> Result<(), ReplayError> {
        w.check(seq)?;
        w.mark(seq)
    }

    #[test]
    fn in_order_then_replays() {
        let w = ReplayWindow::new(64);
        for s in 1..=1000 {
            assert_eq!(check_then_mark(&w, s), Ok(()));
        }
        assert_eq!(w.top(), 1000);
        assert_eq!(w.check(1000), Err(ReplayError::Replay));
        assert_eq!(w.check(937), Err(ReplayError::Replay));
        assert_eq!(w.check(936), Err(ReplayError::TooOld));
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
        assert_eq!(w.check(1001), Ok(()));
    }

    #[test]
    fn window_edges_exact() {
        for size in [1u32, 31, 32, 33, 64, 1000, 4096, 65_536] {
            let w = ReplayWindow::new(size);
            let top = 200_000u64;
            w.mark(top).unwrap();
            let oldest_in = top - u64::from(size) + 1;
            assert_eq!(
                w.check(oldest_in),
                if size == 1 {
                    Err(ReplayError::Replay)
                } else {
                    Ok(())
                }
            );
            assert_eq!(
                w.check(oldest_in - 1),
                Err(ReplayError::TooOld),
                "size {size}"
            );
            if size > 1 {
                w.mark(oldest_in).unwrap();
                assert!(w.is_marked(oldest_in));
                assert_eq!(w.mark(oldest_in), Err(ReplayError::Replay));
            }
        }
    }

    #[test]
    fn check_does_not_change_state() {
        let w = ReplayWindow::new(128);
        for s in [5u64, 500, 70_000] {
            assert_eq!(w.check(s), Ok(()));
        }
        assert_eq!(w.top(), 0);
        assert!(!w.is_marked(5));
    }

    #[test]
    fn window_off_accepts_everything_but_tracks_top() {
        let w = ReplayWindow::new(0);
        for s in [7u64, 7, 3, 0, 7] {
            assert_eq!(check_then_mark(&w, s), Ok(()));
        }
        assert_eq!(w.top(), 7);
    }

    #[test]
    fn big_jump_forgets_old_blocks() {
        let w = ReplayWindow::new(1024);
        for s in 1..=100 {
            w.mark(s).unwrap();
        }
        // Jump far ahead: everything before is now too old; the new region is clean even though
        // the bitmap words still hold tags of old blocks.
        w.mark(1_000_000).unwrap();
        for s in 1_000_000 - 1023..1_000_000 {
            assert_eq!(w.check(s), Ok(()), "{s}");
        }
        assert_eq!(w.check(50), Err(ReplayError::TooOld));
    }

    #[test]
    fn esn_inference_rfc4303_appendix_a() {
        let w = ReplayWindow::new(64);
        // Fresh SA: small numbers are in sub-space 0.
        assert_eq!(w.infer_seq(1, true), 1);
        // Numbers just below 2^32 with top 0 would be "sub-space −1": taken as 0.
        assert_eq!(w.infer_seq(0xFFFF_FFF0, true), 0xFFFF_FFF0);
        w.mark(0xFFFF_FFF0).unwrap();
        // Case A: window inside sub-space 0; a small low half means the sender wrapped.
        assert_eq!(w.infer_seq(0xFFFF_FFF8, true), 0xFFFF_FFF8);
        assert_eq!(w.infer_seq(2, true), 0x1_0000_0002);
        assert_eq!(w.infer_seq(0xFFFF_FFB1, true), 0xFFFF_FFB1); // oldest in window
        assert_eq!(w.infer_seq(0xFFFF_FFB0, true), 0x1_FFFF_FFB0); // below window: next sub-space
        w.mark(0x1_0000_0005).unwrap();
        // Case B: window spans sub-spaces 0 and 1.
        assert_eq!(w.infer_seq(0xFFFF_FFF9, true), 0xFFFF_FFF9);
        assert_eq!(w.infer_seq(6, true), 0x1_0000_0006);
        assert_eq!(w.infer_seq(0x8000_0000, true), 0x1_8000_0000);
        // ESN off: the low half is the number.
        assert_eq!(w.infer_seq(7, false), 7);
    }

    #[test]
    fn esn_rollover_in_order_stream() {
        let w = ReplayWindow::new(32);
        let start = 0xFFFF_FF00u64;
        for s in start..start + 1000 {
            let inferred = w.infer_seq(s as u32, true);
            assert_eq!(inferred, s);
            check_then_mark(&w, inferred).unwrap();
        }
        assert!(w.top() > 1 << 32);
    }

    /// Four workers race on the numbers 1..=20,000 (the odd ones walk in pairs swapped), each
    /// accepting through `accept`, which returns the numbers it accepted. Every number must be
    /// accepted exactly once: no duplicates, and since every worker walks nearly in order, every
    /// distinct number sent (1..=n from the even workers, 1..=n+1 from the odd ones) by someone.
    fn race(accept: fn(&ReplayWindow, &[u64]) -> Vec<u64>) {
        let w = Arc::new(ReplayWindow::new(4096));
        let n = 20_000u64;
        let accepted: Vec<_> = (0..4)
            .map(|t| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    let seqs: Vec<u64> = (1..=n)
                        .map(|i| if t % 2 == 0 { i } else { (i ^ 1).max(1) })
                        .collect();
                    accept(&w, &seqs)
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        let mut all: Vec<u64> = accepted.into_iter().flatten().collect();
        let total = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), total, "a sequence number was accepted twice");
        assert_eq!(total as u64, n + 1);
    }

    #[test]
    fn concurrent_duplicates_are_accepted_once() {
        race(|w, seqs| {
            seqs.iter()
                .copied()
                .filter(|s| w.check(*s).is_ok() && w.mark(*s).is_ok())
                .collect()
        });
    }

    #[test]
    fn concurrent_runs_accept_each_number_once() {
        // Through `mark_run` in bursts of 32, the way workers hand over runs.
        race(|w, seqs| {
            let mut ok = Vec::new();
            let mut res = vec![Ok(()); 32];
            for c in seqs.chunks(32) {
                w.mark_run(c, &mut res[..c.len()]);
                ok.extend(
                    c.iter()
                        .zip(&res)
                        .filter(|(_, r)| r.is_ok())
                        .map(|(s, _)| *s),
                );
            }
            ok
        });
    }

    fn arrival_orders() -> impl Strategy<Value = (u32, Vec<u64>)> {
        let sizes = prop_oneof![
            Just(32u32),
            Just(64),
            Just(100),
            Just(1024),
            Just(4096),
            Just(65_536),
            32u32..70_000
        ];
        (sizes, 1u64..5_000_000).prop_flat_map(|(size, base)| {
            let span = u64::from(size) * 3;
            let seqs = prop::collection::vec(
                prop_oneof![
                    // Mostly near the front, with duplicates and stragglers.
                    (0..span).prop_map(move |d| base + d),
                    (0..span * 20).prop_map(move |d| base + d),
                    Just(base),
                ],
                1..600,
            );
            (Just(size), seqs)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn matches_reference_model((size, seqs) in arrival_orders()) {
            let w = ReplayWindow::new(size);
            let mut m = Model::new(size);
            for s in seqs {
                let expect = m.accept(s);
                prop_assert_eq!(check_then_mark(&w, s), expect, "seq {} top {}", s, m.top);
                prop_assert_eq!(w.top(), m.top);
            }
        }

        #[test]
        fn marking_a_run_equals_marking_one_by_one((size, seqs) in arrival_orders(), cut in 1usize..70) {
            // The same arrivals through `mark` one by one and through `mark_run` in chunks (as
            // the pipeline hands them over, one run per burst) give the same answers and state.
            let one = ReplayWindow::new(size);
            let run = ReplayWindow::new(size);
            let mut res = vec![Ok(()); seqs.len()];
            for (c, r) in seqs.chunks(cut).zip(res.chunks_mut(cut)) {
                run.mark_run(c, r);
            }
            for (s, r) in seqs.iter().zip(res.iter()) {
                prop_assert_eq!(one.mark(*s), *r, "seq {}", s);
            }
            prop_assert_eq!(one.top(), run.top());
            for s in seqs.iter().copied() {
                prop_assert_eq!(one.is_marked(s), run.is_marked(s));
            }
        }

        #[test]
        fn forged_packets_do_not_move_the_window(
            (size, seqs) in arrival_orders(), forged in prop::collection::vec(any::<u64>(), 0..50)
        ) {
            // `check` on packets whose ICV then fails must change nothing.
            let w = ReplayWindow::new(size);
            let mut m = Model::new(size);
            for (i, s) in seqs.iter().enumerate() {
                if let Some(f) = forged.get(i) {
                    let _ = w.check(*f);
                }
                prop_assert_eq!(check_then_mark(&w, *s), m.accept(*s));
            }
        }

        #[test]
        fn esn_rollover_with_reordering_matches_the_model(
            size in prop_oneof![Just(32u32), Just(1024), Just(65_536)],
            start_back in 1u64..200_000,
            jitter in prop::collection::vec(0u64..64, 1..800),
            dups in prop::collection::vec(any::<bool>(), 800),
        ) {
            // A sender crossing 2^32 with ESN; the network reorders by less than the window and
            // duplicates some packets. Only the low 32 bits travel: the receiver infers the rest,
            // and must accept and refuse exactly what the model (on full numbers) does.
            let w = ReplayWindow::new(size);
            let mut m = Model::new(size);
            let base = (1u64 << 32) - start_back;
            let max_shift = u64::from(size / 2).min(63);
            let mut arrivals: Vec<u64> = jitter
                .iter()
                .enumerate()
                .map(|(i, j)| base + i as u64 * 2 + (j % (max_shift + 1)))
                .collect();
            arrivals.sort_by_key(|s| *s ^ (s & 3)); // mild local reordering
            for (i, s) in arrivals.iter().enumerate() {
                for _ in 0..(1 + usize::from(dups[i % dups.len()])) {
                    let inferred = w.infer_seq(*s as u32, true);
                    prop_assert_eq!(inferred, *s, "inferred high bits for {:#x}", s);
                    prop_assert_eq!(check_then_mark(&w, inferred), m.accept(*s));
                }
            }
        }

        #[test]
        fn esn_inference_recovers_sequence_within_window(
            size in 32u32..70_000, top in 1u64..(1u64 << 40), back in 0u64..70_000, fwd in 1u64..(1 << 30)
        ) {
            let w = ReplayWindow::new(size);
            w.mark(top).unwrap();
            // Anything still inside the window, or ahead of it by less than 2^32 - window, is
            // recovered exactly from its low half.
            if back < u64::from(size) && back < top {
                let s = top - back;
                prop_assert_eq!(w.infer_seq(s as u32, true), s);
            }
            let s = top + fwd;
            prop_assert_eq!(w.infer_seq(s as u32, true), s);
        }

        #[test]
        fn concurrent_workers_match_the_set_semantics(
            size in prop_oneof![Just(32u32), Just(1024), Just(65_536)],
            seqs in prop::collection::vec(1u64..3000, 1..400),
        ) {
            // Two workers receive interleaved halves of the same stream (including duplicates).
            // Whatever the interleaving: no number is accepted twice, and every number accepted
            // was inside the window when accepted (never older than the final top - size - skew).
            let w = Arc::new(ReplayWindow::new(size));
            let (a, b): (Vec<_>, Vec<_>) = seqs.iter().enumerate().partition(|(i, _)| i % 2 == 0);
            let run = |part: Vec<(usize, &u64)>| {
                let part: Vec<u64> = part.into_iter().map(|(_, s)| *s).collect();
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    part.into_iter().filter(|s| w.check(*s).is_ok() && w.mark(*s).is_ok()).collect::<Vec<_>>()
                })
            };
            let (ha, hb) = (run(a), run(b));
            let mut all = ha.join().unwrap();
            all.extend(hb.join().unwrap());
            let n = all.len();
            all.sort_unstable();
            all.dedup();
            prop_assert_eq!(all.len(), n);
            // Every distinct number that is still within the final window and was sent is marked.
            let top = w.top();
            for s in seqs.iter().copied() {
                if top - s < u64::from(size) && all.binary_search(&s).is_ok() {
                    prop_assert!(w.is_marked(s));
                }
            }
        }
    }
}
