//! A `ring` AEAD key that is wiped when dropped.
//!
//! `ring::aead::LessSafeKey` holds the expanded AES key schedule and the GHASH key table but
//! does not zeroize them on drop. `RingKey` wraps it in `ManuallyDrop`, and its `Drop` first runs
//! the key's own drop glue and then overwrites its bytes.

use core::mem::{ManuallyDrop, MaybeUninit};
use core::ops::Deref;

use ring::aead::{Algorithm, LessSafeKey, UnboundKey};

// `LessSafeKey` must stay a flat value: no `Drop` impl anywhere inside it (hence no `Box`, `Vec`,
// `Arc`, ...). If a future ring release changes that, this fails to compile and the `unsafe`
// block below has to be re-examined.
const _: () = assert!(!core::mem::needs_drop::<LessSafeKey>());

pub(crate) struct RingKey {
    key: ManuallyDrop<LessSafeKey>,
}

impl RingKey {
    pub fn new(alg: &'static Algorithm, key: &[u8]) -> Result<Self, ring::error::Unspecified> {
        let key = LessSafeKey::new(UnboundKey::new(alg, key)?);
        Ok(RingKey {
            key: ManuallyDrop::new(key),
        })
    }
}

impl Deref for RingKey {
    type Target = LessSafeKey;

    fn deref(&self) -> &LessSafeKey {
        &self.key
    }
}

impl Drop for RingKey {
    fn drop(&mut self) {
        // SAFETY:
        // - `ManuallyDrop::drop` is called exactly once: this is `RingKey`'s destructor, and
        //   `self.key` is not used afterwards except as raw bytes below (`ManuallyDrop` itself has
        //   no drop glue, so nothing drops it again).
        // - After that, the memory of `self.key` is wiped through a pointer typed as
        //   `MaybeUninit<LessSafeKey>` (`ManuallyDrop<T>` is `repr(transparent)` over `T`), a type
        //   for which the all-zero bit pattern is valid, as `zeroize_flat_type` requires. The
        //   pointer is derived from `&mut self.key`, so it is valid, aligned and exclusive for
        //   `size_of::<LessSafeKey>()` bytes. The zero pattern is not a valid `LessSafeKey` (it
        //   holds a `&'static Algorithm` and enums), which is fine because the value has already
        //   been dropped and is never read, moved or dropped again: `self` is being destroyed.
        // - The value has no heap parts, so wiping its inline bytes wipes all of the key material
        //   and frees nothing twice or leaks nothing. Checked against ring 0.17.14:
        //   `LessSafeKey { inner: KeyInner, algorithm: &'static Algorithm }`, where `KeyInner` is
        //   `AesGcm(aes_gcm::Key(DynKey))` or `ChaCha20Poly1305(chacha::Key { words: [u32; 8] })`,
        //   and every `DynKey` variant is a `Combo { aes_key, gcm_key }` of plain arrays
        //   (`AES_KEY { rd_key: [u32; 60], rounds: c_uint }`, `HTable { Htable: [U128; 16] }` or
        //   `{ h: U128 }`); no `Box`/`Vec`/`Arc` and no `Drop` impl, which the `needs_drop`
        //   assertion above also enforces at compile time.
        unsafe {
            ManuallyDrop::drop(&mut self.key);
            let bytes = core::ptr::from_mut(&mut self.key).cast::<MaybeUninit<LessSafeKey>>();
            zeroize::zeroize_flat_type(bytes);
        }
    }
}
