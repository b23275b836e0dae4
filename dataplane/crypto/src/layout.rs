//! Splitting an ESP packet into its parts without any panicking index.

/// ESP header: SPI and the low 32 bits of the sequence number.
pub(crate) const HDR_LEN: usize = 8;

/// Minimum length of the region between IV and ICV: pad length + next header.
pub(crate) const MIN_BODY: usize = 2;

/// The parts of one ESP packet, borrowed from `EspOp::esp`.
pub(crate) struct EspParts<'a> {
    /// SPI and sequence number low bits.
    pub hdr: &'a mut [u8; HDR_LEN],
    /// Explicit IV (empty for NULL).
    pub iv: &'a mut [u8],
    /// Payload + padding + pad length + next header (plaintext or ciphertext).
    pub body: &'a mut [u8],
    /// Integrity check value.
    pub icv: &'a mut [u8],
}

impl<'a> EspParts<'a> {
    /// Splits `esp`; `None` if it is too short for header, IV, the 2-byte trailer and the ICV,
    /// or if the body is not a multiple of `block` (use 1 for no constraint).
    #[inline]
    pub fn split(esp: &'a mut [u8], iv_len: usize, icv_len: usize, block: usize) -> Option<Self> {
        let (hdr, rest) = esp.split_first_chunk_mut::<HDR_LEN>()?;
        let (iv, rest) = rest.split_at_mut_checked(iv_len)?;
        let body_len = rest.len().checked_sub(icv_len)?;
        // Block sizes are powers of two (1, 8, 16): a mask instead of a division per packet.
        let misaligned = if block.is_power_of_two() {
            body_len & (block - 1) != 0
        } else {
            body_len.checked_rem(block)? != 0
        };
        if body_len < MIN_BODY || misaligned {
            return None;
        }
        let (body, icv) = rest.split_at_mut_checked(body_len)?;
        Some(EspParts { hdr, iv, body, icv })
    }

    /// The AAD / ICV-input prefix for ESN: the high 32 bits of the sequence number, big-endian.
    pub fn seq_hi(seq: u64) -> [u8; 4] {
        ((seq >> 32) as u32).to_be_bytes()
    }
}
