//! The slot checksum: a word-wise multiply-rotate hash (FNV-1a's structure over 64-bit
//! little-endian words, with a full-width odd multiplier and a rotation, then a finalizer).
//!
//! It is not a MAC: it protects against stray writers (a bug or another program scribbling on
//! the segment), not against an attacker, who would need our uid anyway. Word-wise because a
//! byte-wise FNV over a 300-byte SA record costs ~300 dependent multiplications, which would
//! dominate the ring's cost. Every step `h ↦ rotl((h ^ w) · M, 23)` is a bijection of `h` for a
//! fixed word and of `w` for a fixed state, and so is the finalizer, so a change confined to one
//! 64-bit word (any single corrupted byte) always changes the result.

const SEED: u64 = 0xcbf2_9ce4_8422_2325;
const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline]
fn step(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(MUL).rotate_left(23)
}

/// Checksum of a slot: its sequence number, length and flags, then the payload.
pub(crate) fn slot_checksum(seq: u64, len: u32, flags: u32, payload: &[u8]) -> u64 {
    let mut h = step(SEED, seq);
    h = step(h, u64::from(len) | u64::from(flags) << 32);
    let mut chunks = payload.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = step(h, u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(w));
    }
    // splitmix64's finalizer
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::slot_checksum;

    #[test]
    fn every_single_byte_change_is_seen() {
        let payload: Vec<u8> = (0..203u32).map(|i| (i * 7) as u8).collect();
        let base = slot_checksum(42, payload.len() as u32, 0, &payload);
        for i in 0..payload.len() {
            for x in 1..=255u8 {
                let mut p = payload.clone();
                p[i] ^= x;
                assert_ne!(
                    slot_checksum(42, p.len() as u32, 0, &p),
                    base,
                    "byte {i} ^ {x}"
                );
            }
        }
        assert_ne!(slot_checksum(43, payload.len() as u32, 0, &payload), base);
        assert_ne!(slot_checksum(42, payload.len() as u32, 1, &payload), base);
        assert_ne!(
            slot_checksum(42, payload.len() as u32 - 1, 0, &payload[..202]),
            base
        );
    }
}
