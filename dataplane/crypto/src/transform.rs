//! ESP transform identifiers, their names and their sizes.

use core::fmt;

/// Combined-mode (AEAD) algorithms, RFC 4106.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AeadAlg {
    Aes128Gcm,
    Aes256Gcm,
}

impl AeadAlg {
    /// AES key length, without the 4-byte salt.
    pub fn aes_key_len(&self) -> usize {
        match self {
            AeadAlg::Aes128Gcm => 16,
            AeadAlg::Aes256Gcm => 32,
        }
    }

    fn prefix(&self) -> &'static str {
        match self {
            AeadAlg::Aes128Gcm => "aes128gcm",
            AeadAlg::Aes256Gcm => "aes256gcm",
        }
    }
}

/// Encryption algorithms used together with a separate integrity algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherAlg {
    /// RFC 2410: no confidentiality.
    Null,
    /// RFC 3602.
    Aes128Cbc,
    /// RFC 3602.
    Aes256Cbc,
    /// RFC 2451 (three-key 3DES, EDE).
    TripleDesCbc,
}

impl CipherAlg {
    const ALL: [CipherAlg; 4] = [
        CipherAlg::Null,
        CipherAlg::Aes128Cbc,
        CipherAlg::Aes256Cbc,
        CipherAlg::TripleDesCbc,
    ];

    /// Parses the canonical config spelling (`"null"`, `"aes128-cbc"`, `"aes256-cbc"`, `"3des-cbc"`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The canonical config spelling.
    pub fn name(&self) -> &'static str {
        match self {
            CipherAlg::Null => "null",
            CipherAlg::Aes128Cbc => "aes128-cbc",
            CipherAlg::Aes256Cbc => "aes256-cbc",
            CipherAlg::TripleDesCbc => "3des-cbc",
        }
    }

    /// Key length in bytes.
    pub fn key_len(&self) -> usize {
        match self {
            CipherAlg::Null => 0,
            CipherAlg::Aes128Cbc => 16,
            CipherAlg::Aes256Cbc => 32,
            CipherAlg::TripleDesCbc => 24,
        }
    }

    /// Length of the explicit IV carried in each packet (= the block size for CBC).
    pub fn iv_len(&self) -> usize {
        match self {
            CipherAlg::Null => 0,
            CipherAlg::Aes128Cbc | CipherAlg::Aes256Cbc => 16,
            CipherAlg::TripleDesCbc => 8,
        }
    }
}

/// Integrity algorithms (all HMAC, truncated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum IntegAlg {
    /// RFC 2403.
    HmacMd5_96,
    /// RFC 2404.
    HmacSha1_96,
    /// RFC 4868.
    HmacSha256_128,
    /// RFC 4868.
    HmacSha384_192,
    /// RFC 4868.
    HmacSha512_256,
}

impl IntegAlg {
    const ALL: [IntegAlg; 5] = [
        IntegAlg::HmacMd5_96,
        IntegAlg::HmacSha1_96,
        IntegAlg::HmacSha256_128,
        IntegAlg::HmacSha384_192,
        IntegAlg::HmacSha512_256,
    ];

    /// Parses the canonical config spelling, e.g. `"hmac-sha2-256-128"`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|i| i.name() == name)
    }

    /// The canonical config spelling.
    pub fn name(&self) -> &'static str {
        match self {
            IntegAlg::HmacMd5_96 => "hmac-md5-96",
            IntegAlg::HmacSha1_96 => "hmac-sha1-96",
            IntegAlg::HmacSha256_128 => "hmac-sha2-256-128",
            IntegAlg::HmacSha384_192 => "hmac-sha2-384-192",
            IntegAlg::HmacSha512_256 => "hmac-sha2-512-256",
        }
    }

    /// Key length in bytes (the hash output length, RFC 2403/2404/4868).
    pub fn key_len(&self) -> usize {
        match self {
            IntegAlg::HmacMd5_96 => 16,
            IntegAlg::HmacSha1_96 => 20,
            IntegAlg::HmacSha256_128 => 32,
            IntegAlg::HmacSha384_192 => 48,
            IntegAlg::HmacSha512_256 => 64,
        }
    }

    /// Length of the truncated ICV in bytes.
    pub fn icv_len(&self) -> usize {
        match self {
            IntegAlg::HmacMd5_96 | IntegAlg::HmacSha1_96 => 12,
            IntegAlg::HmacSha256_128 => 16,
            IntegAlg::HmacSha384_192 => 24,
            IntegAlg::HmacSha512_256 => 32,
        }
    }
}

/// One ESP transform: what an SA does to every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transform {
    /// AES-GCM (RFC 4106); `icv_len` is 8, 12 or 16.
    Aead { alg: AeadAlg, icv_len: u8 },
    /// Encryption (possibly NULL) followed by a separate HMAC.
    CipherAuth { cipher: CipherAlg, integ: IntegAlg },
}

impl Transform {
    /// Parses strongSwan's AEAD spelling: `"aes128gcm16"`, `"aes128gcm12"`, `"aes128gcm8"`,
    /// `"aes256gcm16"`, `"aes256gcm12"`, `"aes256gcm8"` (the number is the ICV length in bytes).
    pub fn aead_from_name(name: &str) -> Option<Transform> {
        let (alg, rest) = if let Some(rest) = name.strip_prefix("aes128gcm") {
            (AeadAlg::Aes128Gcm, rest)
        } else if let Some(rest) = name.strip_prefix("aes256gcm") {
            (AeadAlg::Aes256Gcm, rest)
        } else {
            return None;
        };
        let icv_len = match rest {
            "8" => 8,
            "12" => 12,
            "16" => 16,
            _ => return None,
        };
        Some(Transform::Aead { alg, icv_len })
    }

    /// Parses any canonical spelling produced by [`Transform::name`]: an AEAD name
    /// (see [`Transform::aead_from_name`]) or `"<cipher>/<integ>"`, e.g. `"aes128-cbc/hmac-sha1-96"`.
    pub fn from_name(name: &str) -> Option<Transform> {
        if let Some(t) = Self::aead_from_name(name) {
            return Some(t);
        }
        let (cipher, integ) = name.split_once('/')?;
        Some(Transform::CipherAuth {
            cipher: CipherAlg::from_name(cipher)?,
            integ: IntegAlg::from_name(integ)?,
        })
    }

    /// Whether the parameters are ones this crate knows (only the AEAD ICV length can be off).
    pub(crate) fn is_valid(&self) -> bool {
        match self {
            Transform::Aead { icv_len, .. } => matches!(icv_len, 8 | 12 | 16),
            Transform::CipherAuth { .. } => true,
        }
    }

    /// Length of the encryption key material. For GCM this is the AES key followed by the
    /// 4-byte salt (20 or 36); AES-CBC 16/32; 3DES 24; NULL 0.
    pub fn enc_key_len(&self) -> usize {
        match self {
            Transform::Aead { alg, .. } => alg.aes_key_len() + 4,
            Transform::CipherAuth { cipher, .. } => cipher.key_len(),
        }
    }

    /// Length of the integrity key: 0 for AEAD.
    pub fn integ_key_len(&self) -> usize {
        match self {
            Transform::Aead { .. } => 0,
            Transform::CipherAuth { integ, .. } => integ.key_len(),
        }
    }

    /// Length of the explicit per-packet IV: GCM 8, AES-CBC 16, 3DES 8, NULL 0.
    pub fn iv_len(&self) -> usize {
        match self {
            Transform::Aead { .. } => 8,
            Transform::CipherAuth { cipher, .. } => cipher.iv_len(),
        }
    }

    /// Alignment that payload + padding + pad length + next header must have:
    /// the cipher block size for CBC, otherwise ESP's 4 bytes.
    pub fn block_align(&self) -> usize {
        match self {
            Transform::Aead { .. }
            | Transform::CipherAuth {
                cipher: CipherAlg::Null,
                ..
            } => 4,
            Transform::CipherAuth { cipher, .. } => cipher.iv_len(),
        }
    }

    /// Length of the ICV at the end of every packet.
    pub fn icv_len(&self) -> usize {
        match self {
            Transform::Aead { icv_len, .. } => usize::from(*icv_len),
            Transform::CipherAuth { integ, .. } => integ.icv_len(),
        }
    }

    /// Total per-packet overhead that is not payload or padding: SPI, sequence number, IV and ICV.
    pub fn overhead(&self) -> usize {
        8 + self.iv_len() + self.icv_len()
    }

    /// Why this transform should not be used, if it is weak; callers log this.
    /// NULL encryption is reported before 3DES, and both before HMAC-MD5.
    pub fn weakness(&self) -> Option<&'static str> {
        match self {
            Transform::Aead { .. } => None,
            Transform::CipherAuth { cipher, integ } => match (cipher, integ) {
                (CipherAlg::Null, _) => Some("NULL encryption: traffic is not confidential"),
                (CipherAlg::TripleDesCbc, _) => Some("3DES-CBC has a 64-bit block"),
                (_, IntegAlg::HmacMd5_96) => Some("HMAC-MD5-96 is deprecated"),
                _ => None,
            },
        }
    }

    /// Canonical config spelling, e.g. `"aes128gcm16"`, `"aes128-cbc/hmac-sha1-96"`.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transform::Aead { alg, icv_len } => write!(f, "{}{}", alg.prefix(), icv_len),
            Transform::CipherAuth { cipher, integ } => {
                write!(f, "{}/{}", cipher.name(), integ.name())
            }
        }
    }
}

#[cfg(test)]
pub(crate) fn all_transforms() -> Vec<Transform> {
    let mut v = Vec::new();
    for alg in [AeadAlg::Aes128Gcm, AeadAlg::Aes256Gcm] {
        for icv_len in [8, 12, 16] {
            v.push(Transform::Aead { alg, icv_len });
        }
    }
    for cipher in CipherAlg::ALL {
        for integ in IntegAlg::ALL {
            v.push(Transform::CipherAuth { cipher, integ });
        }
    }
    v
}
