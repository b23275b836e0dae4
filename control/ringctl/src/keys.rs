//! Random SPIs and key material from the system's CSPRNG (`ring::rand::SystemRandom`, i.e.
//! `getrandom`). Keys go straight into [`Key`] (inline, wiped on drop, `Debug` prints only the
//! length); the temporary buffer they are drawn into is wiped as well.

use espgw_ring::record::{MAX_KEY_LEN, MIN_SPI};
use espgw_ring::{EncAlg, IntegAlg, Key};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroize;

/// The system's random number generator failed (should not happen on Linux).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// No free SPI was found (the SPI space is practically never that full: this means the
/// `in_use` predicate rejects everything).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiError {
    /// See [`RandomError`].
    #[error(transparent)]
    Random(#[from] RandomError),
    /// Every candidate was in use.
    #[error("no free SPI found in {0} random draws")]
    Exhausted(u32),
}

/// A source of random SPIs and keys.
#[derive(Debug)]
pub struct Random {
    rng: SystemRandom,
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

impl Random {
    /// The system's CSPRNG.
    pub fn new() -> Random {
        Random {
            rng: SystemRandom::new(),
        }
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&self, buf: &mut [u8]) -> Result<(), RandomError> {
        self.rng.fill(buf).map_err(|_| RandomError)
    }

    /// A random `u32`.
    pub fn u32(&self) -> Result<u32, RandomError> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A random SPI (≥ 256, RFC 4303 §2.1) for which `in_use` is false.
    pub fn spi(&self, mut in_use: impl FnMut(u32) -> bool) -> Result<u32, SpiError> {
        const DRAWS: u32 = 10_000;
        for _ in 0..DRAWS {
            let spi = self.u32()?;
            if spi >= MIN_SPI && !in_use(spi) {
                return Ok(spi);
            }
        }
        Err(SpiError::Exhausted(DRAWS))
    }

    /// A random key of `len` bytes (at most [`MAX_KEY_LEN`]; longer requests are cut).
    pub fn key(&self, len: usize) -> Result<Key, RandomError> {
        let mut buf = [0u8; MAX_KEY_LEN];
        let len = len.min(MAX_KEY_LEN);
        let result = self.fill(&mut buf[..len]);
        let key = Key::new(&buf[..len]);
        buf.zeroize();
        result?;
        // `len` ≤ MAX_KEY_LEN, so `Key::new` cannot refuse it.
        Ok(key.unwrap_or_default())
    }

    /// Fresh keys for one SA (one direction of a tunnel: the sender's outbound SA and the
    /// receiver's inbound SA share them).
    pub fn key_material(&self, enc: EncAlg, integ: IntegAlg) -> Result<KeyMaterial, RandomError> {
        Ok(KeyMaterial {
            enc_key: self.key(enc.key_len())?,
            salt: self.key(enc.salt_len())?,
            integ_key: self.key(integ.key_len())?,
        })
    }
}

/// The keys of one SA. Wiped on drop (each [`Key`] is); `Debug` shows only lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMaterial {
    /// Encryption key (without the salt).
    pub enc_key: Key,
    /// AES-GCM salt (empty otherwise).
    pub salt: Key,
    /// Integrity key (empty for AES-GCM).
    pub integ_key: Key,
}
