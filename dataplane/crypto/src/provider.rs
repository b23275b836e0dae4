//! The default, pure-software backend.

use crate::gcm::{GcmSa, gcm_key_note};
use crate::{CryptoProvider, KeyError, SaCrypto, SaKeys, Transform};

pub(crate) const SOFTWARE_NAME: &str = "software";

/// ring for AES-GCM; RustCrypto for AES/3DES-CBC, HMAC and truncated-tag GCM verification.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoftwareProvider;

impl CryptoProvider for SoftwareProvider {
    fn name(&self) -> &'static str {
        SOFTWARE_NAME
    }

    fn supports(&self, t: Transform) -> bool {
        t.is_valid()
    }

    fn new_sa(
        &self,
        t: Transform,
        keys: &SaKeys,
        esn: bool,
    ) -> Result<Box<dyn SaCrypto>, KeyError> {
        if !self.supports(t) {
            return Err(KeyError::Unsupported {
                transform: t,
                provider: SOFTWARE_NAME,
            });
        }
        check_key_lengths(t, keys)?;
        match t {
            Transform::Aead { alg, icv_len } => {
                Ok(Box::new(GcmSa::new(alg, icv_len, &keys.enc, esn)?))
            }
            Transform::CipherAuth { cipher, integ } => {
                crate::cbc::new_cbc_sa(cipher, integ, &keys.enc, &keys.integ, esn)
            }
        }
    }
}

/// Checks both key lengths against the transform, with messages that say what was expected.
pub(crate) fn check_key_lengths(t: Transform, keys: &SaKeys) -> Result<(), KeyError> {
    if keys.enc.len() != t.enc_key_len() {
        let note = match t {
            Transform::Aead { alg, .. } => gcm_key_note(alg),
            Transform::CipherAuth { .. } => "",
        };
        return Err(KeyError::EncKeyLen {
            transform: t,
            expected: t.enc_key_len(),
            got: keys.enc.len(),
            note,
        });
    }
    if keys.integ.len() != t.integ_key_len() {
        let note = match t {
            Transform::Aead { .. } => " (AES-GCM has no separate integrity key)",
            Transform::CipherAuth { .. } => "",
        };
        return Err(KeyError::IntegKeyLen {
            transform: t,
            expected: t.integ_key_len(),
            got: keys.integ.len(),
            note,
        });
    }
    Ok(())
}
