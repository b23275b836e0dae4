//! ESP transforms behind a batch-shaped crypto-provider interface.
//!
//! The data plane hands [`SaCrypto::seal`] / [`SaCrypto::open`] a slice of [`EspOp`]s (a burst,
//! typically up to 32 packets); each op is one ESP packet laid out in place, from the SPI to the
//! ICV. A [`CryptoProvider`] builds the per-SA state; [`SoftwareProvider`] is the default backend
//! (ring for AES-GCM, RustCrypto for AES/3DES-CBC, HMAC and truncated-tag GCM verification).
//!
//! Packet layout of [`EspOp::esp`]:
//!
//! ```text
//! [SPI 4][seq low 4][IV iv_len][payload + padding + pad len + next header][ICV icv_len]
//! ```
//!
//! Semantics follow RFC 4303 (ESP, ESN), RFC 4106 (AES-GCM, IV = 64-bit sequence number),
//! RFC 3602 (AES-CBC), RFC 2451 (3DES-CBC), RFC 2410 (NULL), RFC 2403/2404/4868 (HMAC).
//!
//! Every op in a batch is processed and gets its own status; a bad op never affects the others.
//! After [`OpStatus::AuthFailed`] the bytes between IV and ICV are unspecified (ciphertext, or
//! zeroes on the ring path) and the packet must be dropped; after [`OpStatus::BadLength`] the
//! packet is untouched (the length checks come before anything is written).

use core::fmt;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

mod cbc;
mod gcm;
mod layout;
mod provider;
mod ring_key;
mod transform;

#[cfg(test)]
mod tests;

pub use provider::SoftwareProvider;
pub use transform::{AeadAlg, CipherAlg, IntegAlg, Transform};

/// Key material for one SA. Zeroized on drop.
///
/// For AES-GCM `enc` is the AES key followed by the 4-byte salt and `integ` is empty.
pub struct SaKeys {
    pub enc: Zeroizing<Vec<u8>>,
    pub integ: Zeroizing<Vec<u8>>,
}

impl SaKeys {
    /// Copies the given key material.
    pub fn new(enc: &[u8], integ: &[u8]) -> Self {
        SaKeys {
            enc: Zeroizing::new(enc.to_vec()),
            integ: Zeroizing::new(integ.to_vec()),
        }
    }
}

impl fmt::Debug for SaKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaKeys")
            .field("enc_len", &self.enc.len())
            .field("integ_len", &self.integ.len())
            .finish_non_exhaustive()
    }
}

/// Outcome of one [`EspOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    /// Not processed yet.
    Pending,
    /// Sealed, or verified and decrypted.
    Ok,
    /// The ICV did not verify; the packet must be dropped.
    AuthFailed,
    /// `esp` is too short for the transform's header, IV and ICV, or the region between IV and
    /// ICV is shorter than the 2-byte ESP trailer or (CBC) not a multiple of the block size.
    BadLength,
}

/// One ESP packet's crypto work, done in place.
pub struct EspOp<'a> {
    /// From the first byte of the SPI to the last byte of the ICV:
    /// `[SPI 4][seq low 4][IV iv_len][payload + padding + pad len + next header][ICV icv_len]`
    pub esp: &'a mut [u8],
    /// Full 64-bit sequence number (the low 32 bits are also in `esp[4..8]`); the high 32 bits
    /// are used when the SA has ESN.
    pub seq: u64,
    pub status: OpStatus,
}

impl<'a> EspOp<'a> {
    /// A pending op.
    pub fn new(esp: &'a mut [u8], seq: u64) -> Self {
        EspOp {
            esp,
            seq,
            status: OpStatus::Pending,
        }
    }
}

impl fmt::Debug for EspOp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EspOp")
            .field("len", &self.esp.len())
            .field("seq", &self.seq)
            .field("status", &self.status)
            .finish()
    }
}

/// Per-worker state: the CSPRNG for CBC IVs (ChaCha20, seeded from the OS) and, later,
/// backend scratch space. Not shared between threads; one per data-plane worker.
pub struct WorkerCtx {
    rng: ChaCha20Rng,
}

impl WorkerCtx {
    /// Seeded from the operating system's CSPRNG.
    ///
    /// # Panics
    /// If the OS random number generator fails; running with predictable IVs is not an option.
    pub fn new() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        if ring::rand::SystemRandom::new().fill(&mut seed[..]).is_err() {
            panic!("espgw-crypto: the OS random number generator failed");
        }
        Self::from_seed(*seed)
    }

    /// Deterministic, for tests.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        WorkerCtx {
            rng: ChaCha20Rng::from_seed(seed),
        }
    }

    /// Fills a CBC IV.
    pub(crate) fn fill_iv(&mut self, iv: &mut [u8]) {
        self.rng.fill_bytes(iv);
    }
}

impl Default for WorkerCtx {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for WorkerCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The RNG state is secret.
        f.write_str("WorkerCtx { .. }")
    }
}

/// The crypto state of one SA (one direction). `Debug` never prints key bytes.
pub trait SaCrypto: Send + Sync + core::fmt::Debug {
    fn transform(&self) -> Transform;
    fn esn(&self) -> bool;
    /// Caller has written SPI, seq low and the plaintext payload+trailer; this writes the IV,
    /// encrypts in place, writes the ICV; status Ok or BadLength.
    fn seal(&self, ops: &mut [EspOp<'_>], ctx: &mut WorkerCtx);
    /// Verifies the ICV (constant time) over header+IV+ciphertext (+ ESN high bits), and only if
    /// it verifies decrypts in place; status Ok, AuthFailed or BadLength.
    fn open(&self, ops: &mut [EspOp<'_>], ctx: &mut WorkerCtx);
    /// Ask the CPU to start loading the key material an `open`/`seal` will read (a hint; no
    /// effect on results). Workers call it for every SA of a burst before the crypto, so the
    /// cache misses of many SAs overlap instead of coming one after the other.
    fn prefetch(&self) {
        prefetch_lines(std::ptr::from_ref(self).cast::<u8>(), size_of_val(self));
    }
}

/// Hint the CPU to load every cache line that holds one of the `len` bytes from `p` (at most
/// [`PREFETCH_MAX`] of them) into L1. Only a hint: it never faults, reads nothing
/// architecturally, and changes no result.
#[inline]
pub fn prefetch_lines(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // Every line from the first byte's to the last byte's: a range that starts in the
        // middle of a line can touch one line more than `len / 64` rounded up.
        let skew = p as usize & 63;
        let line0 = p.wrapping_sub(skew);
        for i in 0..(skew + len.min(PREFETCH_MAX)).div_ceil(64) {
            // SAFETY: PREFETCHT0 is a hint that cannot fault or change memory, whatever the
            // address (Intel SDM, PREFETCHh); SSE, which it needs, is part of the x86_64
            // baseline. `wrapping_add` keeps the address computation defined.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line0.wrapping_add(i * 64).cast::<i8>()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Operations up to this long are left alone by [`prefetch_next_op`]: the pipeline asks for all
/// of a frame that small before the crypto stage.
pub const PREFETCH_NEXT_FROM: usize = 256;

/// Ask for every line of the next operation's bytes while operation `i` is processed (see
/// [`prefetch_op`]). Backends call it in their loop over a run.
#[inline(always)]
pub fn prefetch_next_op(ops: &[EspOp<'_>], i: usize) {
    if let Some(next) = ops.get(i + 1) {
        prefetch_op(next);
    }
}

/// Ask for every line of an operation's bytes when it is longer than [`PREFETCH_NEXT_FROM`].
/// Frames come from memory (a NIC's DMA, another core's copy) and the frames of a burst are
/// not adjacent, so the hardware prefetcher starts over on each one; asked for one packet
/// ahead, their misses overlap the crypto of the packet before (1420-byte packets from
/// memory: decap ~415 → ~330 ns per packet here).
#[inline(always)]
pub fn prefetch_op(op: &EspOp<'_>) {
    if op.esp.len() > PREFETCH_NEXT_FROM {
        prefetch_lines(op.esp.as_ptr(), op.esp.len());
    }
}

/// The most bytes one [`prefetch_lines`] call asks for: a UMEM frame.
pub const PREFETCH_MAX: usize = 2048;

/// A crypto backend: builds [`SaCrypto`] objects.
pub trait CryptoProvider: Send + Sync + core::fmt::Debug {
    fn name(&self) -> &'static str;
    fn supports(&self, t: Transform) -> bool;
    fn new_sa(&self, t: Transform, keys: &SaKeys, esn: bool)
    -> Result<Box<dyn SaCrypto>, KeyError>;
}

/// Why an SA could not be created. (`Clone`/`PartialEq`/`Eq` so that callers can embed it in
/// their own comparable error types.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "wrong encryption key length for {transform}: expected {expected} bytes{note}, got {got}"
    )]
    EncKeyLen {
        transform: Transform,
        expected: usize,
        got: usize,
        /// Extra explanation, e.g. that the GCM salt is included; empty or starting with a space.
        note: &'static str,
    },
    #[error(
        "wrong integrity key length for {transform}: expected {expected} bytes{note}, got {got}"
    )]
    IntegKeyLen {
        transform: Transform,
        expected: usize,
        got: usize,
        /// Extra explanation; empty or starting with a space.
        note: &'static str,
    },
    #[error("transform {transform} is not supported by the {provider} crypto provider")]
    Unsupported {
        transform: Transform,
        provider: &'static str,
    },
}
