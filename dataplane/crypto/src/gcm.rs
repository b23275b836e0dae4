//! AES-GCM for ESP (RFC 4106).
//!
//! Seal always goes through ring (the hot path); the 8- and 12-byte ICVs are the prefix of the
//! full tag. Open with a 16-byte ICV goes through ring too. ring cannot verify a truncated tag,
//! so open with an 8- or 12-byte ICV computes the GCM tag with RustCrypto (`aes` + `ghash`),
//! compares the prefix in constant time, and only then decrypts (`ctr`, 32-bit big-endian
//! counter starting at 2, as GCM does).

use core::fmt;

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{BlockCipherEncrypt, InnerIvInit, KeyInit, StreamCipher};
use aes::{Aes128Enc, Aes256Enc};
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, Nonce, Tag};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::layout::{EspParts, HDR_LEN};
use crate::ring_key::RingKey;
use crate::{AeadAlg, EspOp, KeyError, OpStatus, SaCrypto, Transform, WorkerCtx};

/// GCM IV (the explicit per-packet part of the nonce) length.
pub(crate) const GCM_IV_LEN: usize = 8;
const SALT_LEN: usize = 4;
const FULL_TAG: usize = 16;

/// The AES key schedule for the RustCrypto path.
enum SoftAes {
    A128(Aes128Enc),
    A256(Aes256Enc),
}

/// State for verifying truncated tags: AES and GHASH keyed with H = E_K(0^128).
struct SoftGcm {
    aes: SoftAes,
    ghash: GHash,
}

impl SoftGcm {
    fn new(alg: AeadAlg, key: &[u8]) -> Option<Self> {
        let aes = match alg {
            AeadAlg::Aes128Gcm => SoftAes::A128(Aes128Enc::new_from_slice(key).ok()?),
            AeadAlg::Aes256Gcm => SoftAes::A256(Aes256Enc::new_from_slice(key).ok()?),
        };
        let mut h = Zeroizing::new(Array::<u8, U16>::default());
        match &aes {
            SoftAes::A128(c) => c.encrypt_block(&mut h),
            SoftAes::A256(c) => c.encrypt_block(&mut h),
        }
        let ghash = GHash::new(&h);
        Some(SoftGcm { aes, ghash })
    }

    /// Verifies `icv` (a prefix of the GCM tag, any length 1..=16) over `aad` and the
    /// ciphertext, then decrypts `body` in place. `body` is untouched on failure.
    fn open(&self, j0: &[u8; 16], aad: &[u8], body: &mut [u8], icv: &[u8]) -> OpStatus {
        match &self.aes {
            SoftAes::A128(c) => soft_open(c, &self.ghash, j0, aad, body, icv),
            SoftAes::A256(c) => soft_open(c, &self.ghash, j0, aad, body, icv),
        }
    }
}

fn soft_open<C>(
    aes: &C,
    ghash: &GHash,
    j0: &[u8; 16],
    aad: &[u8],
    body: &mut [u8],
    icv: &[u8],
) -> OpStatus
where
    C: BlockCipherEncrypt<BlockSize = U16>,
{
    if icv.is_empty() || icv.len() > FULL_TAG {
        return OpStatus::BadLength;
    }
    // S = GHASH_H(A || 0* || C || 0* || [len(A)]64 || [len(C)]64), tag = E_K(J0) xor S.
    let mut gh = ghash.clone();
    gh.update_padded(aad);
    gh.update_padded(body);
    let mut lens = [0u8; 16];
    lens[..8].copy_from_slice(&((aad.len() as u64) * 8).to_be_bytes());
    lens[8..].copy_from_slice(&((body.len() as u64) * 8).to_be_bytes());
    gh.update(&[Array::from(lens)]);
    let mut tag = Zeroizing::new(gh.finalize());
    let mut ek_j0 = Zeroizing::new(Array::<u8, U16>::from(*j0));
    aes.encrypt_block(&mut ek_j0);
    for (t, k) in tag.iter_mut().zip(ek_j0.iter()) {
        *t ^= k;
    }
    let Some(expected) = tag.get(..icv.len()) else {
        return OpStatus::BadLength;
    };
    if !bool::from(expected.ct_eq(icv)) {
        return OpStatus::AuthFailed;
    }
    // Payload keystream starts at inc32(J0), i.e. counter 2.
    let mut ctr_block = Array::<u8, U16>::from(*j0);
    ctr_block[15] = 2;
    let core = ctr::CtrCore::<&C, ctr::flavors::Ctr32BE>::inner_iv_init(aes, &ctr_block);
    ctr_block.zeroize();
    let mut ctr = ctr::Ctr32BE::<&C>::from_core(core);
    match ctr.try_apply_keystream(body) {
        Ok(()) => OpStatus::Ok,
        Err(_) => OpStatus::BadLength,
    }
}

/// AES-GCM SA.
pub(crate) struct GcmSa {
    alg: AeadAlg,
    icv_len: u8,
    esn: bool,
    key: RingKey,
    salt: Zeroizing<[u8; SALT_LEN]>,
    /// Present when the ICV is truncated (or when forced, in tests).
    soft: Option<Box<SoftGcm>>,
}

impl GcmSa {
    /// `enc` is the AES key followed by the 4-byte salt.
    pub fn new(alg: AeadAlg, icv_len: u8, enc: &[u8], esn: bool) -> Result<Self, KeyError> {
        Self::build(alg, icv_len, enc, esn, false)
    }

    /// With `force_soft`, the RustCrypto open path is prepared even for a 16-byte ICV (tests).
    pub(crate) fn build(
        alg: AeadAlg,
        icv_len: u8,
        enc: &[u8],
        esn: bool,
        force_soft: bool,
    ) -> Result<Self, KeyError> {
        let transform = Transform::Aead { alg, icv_len };
        if !transform.is_valid() {
            return Err(KeyError::Unsupported {
                transform,
                provider: crate::provider::SOFTWARE_NAME,
            });
        }
        let enc_err = || KeyError::EncKeyLen {
            transform,
            expected: transform.enc_key_len(),
            got: enc.len(),
            note: gcm_key_note(alg),
        };
        if enc.len() != transform.enc_key_len() {
            return Err(enc_err());
        }
        let (aes_key, salt) = enc.split_at(alg.aes_key_len());
        let salt: [u8; SALT_LEN] = salt.try_into().map_err(|_| enc_err())?;
        let ring_alg = match alg {
            AeadAlg::Aes128Gcm => &AES_128_GCM,
            AeadAlg::Aes256Gcm => &AES_256_GCM,
        };
        let key = RingKey::new(ring_alg, aes_key).map_err(|_| enc_err())?;
        let soft = if usize::from(icv_len) < FULL_TAG || force_soft {
            Some(Box::new(SoftGcm::new(alg, aes_key).ok_or_else(enc_err)?))
        } else {
            None
        };
        Ok(GcmSa {
            alg,
            icv_len,
            esn,
            key,
            salt: Zeroizing::new(salt),
            soft,
        })
    }

    fn icv(&self) -> usize {
        usize::from(self.icv_len)
    }

    /// AAD: SPI || seq low, or with ESN SPI || seq high || seq low (RFC 4106 §5).
    pub(crate) fn aad<'b>(&self, hdr: &[u8; HDR_LEN], seq: u64, buf: &'b mut [u8; 12]) -> &'b [u8] {
        if self.esn {
            buf[..4].copy_from_slice(&hdr[..4]);
            buf[4..8].copy_from_slice(&EspParts::seq_hi(seq));
            buf[8..].copy_from_slice(&hdr[4..]);
            &buf[..]
        } else {
            buf[..HDR_LEN].copy_from_slice(hdr);
            &buf[..HDR_LEN]
        }
    }

    /// nonce = salt || IV.
    fn nonce(&self, iv: &[u8]) -> Option<[u8; 12]> {
        let mut n = [0u8; 12];
        n[..SALT_LEN].copy_from_slice(&self.salt[..]);
        n[SALT_LEN..].copy_from_slice(iv.get(..GCM_IV_LEN)?);
        Some(n)
    }

    /// Seals one packet with an explicit IV (the public path passes the sequence number).
    pub(crate) fn seal_one_with_iv(&self, esp: &mut [u8], seq: u64, iv: [u8; 8]) -> OpStatus {
        let Some(p) = EspParts::split(esp, GCM_IV_LEN, self.icv(), 1) else {
            return OpStatus::BadLength;
        };
        p.iv.copy_from_slice(&iv);
        let Some(nonce) = self.nonce(p.iv) else {
            return OpStatus::BadLength;
        };
        let mut aad_buf = [0u8; 12];
        let aad = self.aad(p.hdr, seq, &mut aad_buf);
        let tag = match self.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            p.body,
        ) {
            Ok(tag) => tag,
            Err(_) => return OpStatus::BadLength,
        };
        // The full 16-byte ICV (the usual case) as a fixed-size copy, without a call to memcpy.
        if let (Ok(icv), Ok(t)) = (
            <&mut [u8; FULL_TAG]>::try_from(&mut *p.icv),
            <&[u8; FULL_TAG]>::try_from(tag.as_ref()),
        ) {
            *icv = *t;
            return OpStatus::Ok;
        }
        match tag.as_ref().get(..p.icv.len()) {
            Some(t) => {
                p.icv.copy_from_slice(t);
                OpStatus::Ok
            }
            None => OpStatus::BadLength,
        }
    }

    fn open_one(&self, esp: &mut [u8], seq: u64) -> OpStatus {
        self.open_one_impl(esp, seq, false)
    }

    /// Opens one packet; with `soft` the RustCrypto path is used whatever the ICV length.
    pub(crate) fn open_one_impl(&self, esp: &mut [u8], seq: u64, soft: bool) -> OpStatus {
        let Some(p) = EspParts::split(esp, GCM_IV_LEN, self.icv(), 1) else {
            return OpStatus::BadLength;
        };
        let Some(nonce) = self.nonce(p.iv) else {
            return OpStatus::BadLength;
        };
        let mut aad_buf = [0u8; 12];
        let aad = self.aad(p.hdr, seq, &mut aad_buf);
        if let (Some(sw), true) = (&self.soft, soft || self.icv() < FULL_TAG) {
            let mut j0 = [0u8; 16];
            j0[..12].copy_from_slice(&nonce);
            j0[15] = 1;
            return sw.open(&j0, aad, p.body, p.icv);
        }
        let Ok(tag) = <[u8; FULL_TAG]>::try_from(&p.icv[..]) else {
            return OpStatus::BadLength;
        };
        match self.key.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            Tag::from(tag),
            p.body,
            0..,
        ) {
            Ok(_) => OpStatus::Ok,
            Err(_) => OpStatus::AuthFailed,
        }
    }
}

pub(crate) fn gcm_key_note(alg: AeadAlg) -> &'static str {
    match alg {
        AeadAlg::Aes128Gcm => " (16-byte AES key followed by the 4-byte salt)",
        AeadAlg::Aes256Gcm => " (32-byte AES key followed by the 4-byte salt)",
    }
}

impl fmt::Debug for GcmSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcmSa")
            .field("transform", &self.transform().name())
            .field("esn", &self.esn)
            .field("truncated_tag_path", &self.soft.is_some())
            .finish_non_exhaustive()
    }
}

impl SaCrypto for GcmSa {
    fn transform(&self) -> Transform {
        Transform::Aead {
            alg: self.alg,
            icv_len: self.icv_len,
        }
    }

    fn esn(&self) -> bool {
        self.esn
    }

    fn seal(&self, ops: &mut [EspOp<'_>], _ctx: &mut WorkerCtx) {
        for i in 0..ops.len() {
            crate::prefetch_next_op(ops, i);
            let op = &mut ops[i];
            // RFC 4106 IV: the 64-bit sequence number, unique per SA.
            op.status = self.seal_one_with_iv(op.esp, op.seq, op.seq.to_be_bytes());
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
