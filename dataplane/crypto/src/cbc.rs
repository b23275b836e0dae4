//! AES-CBC (RFC 3602), 3DES-CBC (RFC 2451) and NULL (RFC 2410) encryption, each with a
//! truncated HMAC (RFC 2403, 2404, 4868).
//!
//! ICV = HMAC(SPI || seq low || IV || ciphertext [|| seq high with ESN]) truncated
//! (RFC 4303 §2.2.1: the high sequence bits are authenticated but not sent). The HMAC key
//! state (inner and outer pads already absorbed) and the cipher key schedule live in the SA;
//! each packet clones the HMAC state, nothing is allocated.

use core::fmt;

use aes::cipher::array::Array;
use aes::cipher::{
    BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, InnerIvInit,
    KeyInit,
};
use aes::{Aes128, Aes256};
use des::TdesEde3;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha1::Sha1;
use sha2::{Sha256, Sha384, Sha512};

use crate::layout::EspParts;
use crate::{CipherAlg, EspOp, IntegAlg, KeyError, OpStatus, SaCrypto, Transform, WorkerCtx};

/// The encryption half of a CBC+HMAC transform.
pub(crate) trait EspCipher: Send + Sync + 'static {
    /// Explicit IV length.
    const IV_LEN: usize;
    /// The body must be a multiple of this (1: no constraint).
    const BLOCK: usize;
    /// Encrypts `data` (a multiple of `BLOCK`) in place; `false` on a length mismatch.
    fn encrypt(&self, iv: &[u8], data: &mut [u8]) -> bool;
    /// Decrypts `data` (a multiple of `BLOCK`) in place; `false` on a length mismatch.
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) -> bool;
}

/// RFC 2410: the identity.
pub(crate) struct NullCipher;

impl EspCipher for NullCipher {
    const IV_LEN: usize = 0;
    const BLOCK: usize = 1;

    fn encrypt(&self, _iv: &[u8], _data: &mut [u8]) -> bool {
        true
    }

    fn decrypt(&self, _iv: &[u8], _data: &mut [u8]) -> bool {
        true
    }
}

/// CBC mode over a block cipher whose key schedule (encryption and decryption) is kept here.
pub(crate) struct Cbc<C>(C);

macro_rules! cbc_cipher {
    ($ty:ty, $block:expr) => {
        impl EspCipher for Cbc<$ty> {
            const IV_LEN: usize = $block;
            const BLOCK: usize = $block;

            fn encrypt(&self, iv: &[u8], data: &mut [u8]) -> bool {
                cbc_encrypt(&self.0, iv, data)
            }

            fn decrypt(&self, iv: &[u8], data: &mut [u8]) -> bool {
                cbc_decrypt(&self.0, iv, data)
            }
        }
    };
}

cbc_cipher!(Aes128, 16);
cbc_cipher!(Aes256, 16);
cbc_cipher!(TdesEde3, 8);

/// CBC-encrypts whole blocks in place with the cipher borrowed (no key schedule copy).
pub(crate) fn cbc_encrypt<C: BlockCipherEncrypt>(cipher: &C, iv: &[u8], data: &mut [u8]) -> bool {
    let Ok(iv) = <&Array<u8, C::BlockSize>>::try_from(iv) else {
        return false;
    };
    let (blocks, tail) = Array::<u8, C::BlockSize>::slice_as_chunks_mut(data);
    if !tail.is_empty() {
        return false;
    }
    cbc::Encryptor::<&C>::inner_iv_init(cipher, iv).encrypt_blocks(blocks);
    true
}

/// CBC-decrypts whole blocks in place (parallel blocks where the backend has them).
pub(crate) fn cbc_decrypt<C: BlockCipherDecrypt>(cipher: &C, iv: &[u8], data: &mut [u8]) -> bool {
    let Ok(iv) = <&Array<u8, C::BlockSize>>::try_from(iv) else {
        return false;
    };
    let (blocks, tail) = Array::<u8, C::BlockSize>::slice_as_chunks_mut(data);
    if !tail.is_empty() {
        return false;
    }
    cbc::Decryptor::<&C>::inner_iv_init(cipher, iv).decrypt_blocks(blocks);
    true
}

/// A CBC (or NULL) + HMAC SA.
pub(crate) struct CbcHmacSa<C: EspCipher, M> {
    transform: Transform,
    esn: bool,
    cipher: C,
    /// HMAC state with the key already absorbed; cloned per packet.
    mac: M,
    icv_len: usize,
}

impl<C, M> CbcHmacSa<C, M>
where
    C: EspCipher,
    M: Mac + Clone + Send + Sync + 'static,
{
    fn icv_input(&self, p: &EspParts<'_>, seq: u64) -> M {
        let mut mac = self.mac.clone();
        mac.update(&p.hdr[..]);
        mac.update(p.iv);
        mac.update(p.body);
        if self.esn {
            mac.update(&EspParts::seq_hi(seq));
        }
        mac
    }

    /// Seals one packet; `fill_iv` writes the IV (the CSPRNG, or a fixed IV in tests).
    pub(crate) fn seal_one(
        &self,
        esp: &mut [u8],
        seq: u64,
        fill_iv: impl FnOnce(&mut [u8]),
    ) -> OpStatus {
        let Some(p) = EspParts::split(esp, C::IV_LEN, self.icv_len, C::BLOCK) else {
            return OpStatus::BadLength;
        };
        fill_iv(p.iv);
        if !self.cipher.encrypt(p.iv, p.body) {
            return OpStatus::BadLength;
        }
        let tag = self.icv_input(&p, seq).finalize().into_bytes();
        match tag.get(..p.icv.len()) {
            Some(t) => {
                p.icv.copy_from_slice(t);
                OpStatus::Ok
            }
            None => OpStatus::BadLength,
        }
    }

    pub(crate) fn open_one(&self, esp: &mut [u8], seq: u64) -> OpStatus {
        let Some(p) = EspParts::split(esp, C::IV_LEN, self.icv_len, C::BLOCK) else {
            return OpStatus::BadLength;
        };
        // Constant-time comparison of the truncated ICV, before anything is decrypted.
        if self
            .icv_input(&p, seq)
            .verify_truncated_left(p.icv)
            .is_err()
        {
            return OpStatus::AuthFailed;
        }
        if !self.cipher.decrypt(p.iv, p.body) {
            return OpStatus::BadLength;
        }
        OpStatus::Ok
    }
}

impl<C: EspCipher, M> fmt::Debug for CbcHmacSa<C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CbcHmacSa")
            .field("transform", &self.transform.name())
            .field("esn", &self.esn)
            .finish_non_exhaustive()
    }
}

impl<C, M> SaCrypto for CbcHmacSa<C, M>
where
    C: EspCipher,
    M: Mac + Clone + Send + Sync + 'static,
{
    fn transform(&self) -> Transform {
        self.transform
    }

    fn esn(&self) -> bool {
        self.esn
    }

    fn seal(&self, ops: &mut [EspOp<'_>], ctx: &mut WorkerCtx) {
        for i in 0..ops.len() {
            crate::prefetch_next_op(ops, i);
            let op = &mut ops[i];
            op.status = self.seal_one(op.esp, op.seq, |iv| ctx.fill_iv(iv));
        }
    }

    fn open(&self, ops: &mut [EspOp<'_>], _ctx: &mut WorkerCtx) {
        for i in 0..ops.len() {
            crate::prefetch_next_op(ops, i);
            let op = &mut ops[i];
            op.status = self.open_one(op.esp, op.seq);
        }
    }
}

/// Builds the SA for a validated CBC/NULL + HMAC transform (key lengths already checked).
pub(crate) fn new_cbc_sa(
    cipher: CipherAlg,
    integ: IntegAlg,
    enc: &[u8],
    mac_key: &[u8],
    esn: bool,
) -> Result<Box<dyn SaCrypto>, KeyError> {
    let transform = Transform::CipherAuth { cipher, integ };
    let enc_err = || KeyError::EncKeyLen {
        transform,
        expected: transform.enc_key_len(),
        got: enc.len(),
        note: "",
    };
    match cipher {
        CipherAlg::Null => with_mac(transform, NullCipher, integ, mac_key, esn),
        CipherAlg::Aes128Cbc => {
            let c = Aes128::new_from_slice(enc).map_err(|_| enc_err())?;
            with_mac(transform, Cbc(c), integ, mac_key, esn)
        }
        CipherAlg::Aes256Cbc => {
            let c = Aes256::new_from_slice(enc).map_err(|_| enc_err())?;
            with_mac(transform, Cbc(c), integ, mac_key, esn)
        }
        CipherAlg::TripleDesCbc => {
            let c = TdesEde3::new_from_slice(enc).map_err(|_| enc_err())?;
            with_mac(transform, Cbc(c), integ, mac_key, esn)
        }
    }
}

fn with_mac<C: EspCipher>(
    transform: Transform,
    cipher: C,
    integ: IntegAlg,
    mac_key: &[u8],
    esn: bool,
) -> Result<Box<dyn SaCrypto>, KeyError> {
    let err = || KeyError::IntegKeyLen {
        transform,
        expected: integ.key_len(),
        got: mac_key.len(),
        note: "",
    };
    fn sa<C: EspCipher, M: Mac + Clone + Send + Sync + 'static>(
        transform: Transform,
        cipher: C,
        mac: M,
        icv_len: usize,
        esn: bool,
    ) -> Box<dyn SaCrypto> {
        Box::new(CbcHmacSa {
            transform,
            esn,
            cipher,
            mac,
            icv_len,
        })
    }
    let icv = integ.icv_len();
    Ok(match integ {
        IntegAlg::HmacMd5_96 => sa(
            transform,
            cipher,
            hmac_new::<Md5>(mac_key).ok_or_else(err)?,
            icv,
            esn,
        ),
        IntegAlg::HmacSha1_96 => sa(
            transform,
            cipher,
            hmac_new::<Sha1>(mac_key).ok_or_else(err)?,
            icv,
            esn,
        ),
        IntegAlg::HmacSha256_128 => sa(
            transform,
            cipher,
            hmac_new::<Sha256>(mac_key).ok_or_else(err)?,
            icv,
            esn,
        ),
        IntegAlg::HmacSha384_192 => sa(
            transform,
            cipher,
            hmac_new::<Sha384>(mac_key).ok_or_else(err)?,
            icv,
            esn,
        ),
        IntegAlg::HmacSha512_256 => sa(
            transform,
            cipher,
            hmac_new::<Sha512>(mac_key).ok_or_else(err)?,
            icv,
            esn,
        ),
    })
}

fn hmac_new<D: hmac::EagerHash>(key: &[u8]) -> Option<Hmac<D>>
where
    Hmac<D>: KeyInit,
{
    <Hmac<D> as KeyInit>::new_from_slice(key).ok()
}

/// Crate-private constructor for tests that need the concrete type (explicit IVs).
#[cfg(test)]
pub(crate) fn concrete<C: EspCipher, M: Mac + Clone + Send + Sync + 'static>(
    transform: Transform,
    cipher: C,
    mac: M,
    esn: bool,
) -> CbcHmacSa<C, M> {
    CbcHmacSa {
        transform,
        esn,
        icv_len: transform.icv_len(),
        cipher,
        mac,
    }
}

#[cfg(test)]
pub(crate) fn wrap<C>(c: C) -> Cbc<C> {
    Cbc(c)
}
