//! Fuzz the outbound (LAN or host → WAN) path: the input is one burst of frames from the LAN
//! port or, with flag bit 4, from the host stack; see the crate documentation for the format.

#![no_main]

use espgw_dataplane_fuzz::{Direction, Harness};
use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};

static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();

fuzz_target!(
    init: {
        espgw_dataplane_fuzz::init(Direction::Outbound);
    },
    |data: &[u8]| {
        let h = HARNESS.get_or_init(|| Mutex::new(Harness::new(Direction::Outbound)));
        // A panic in an earlier input aborts the process, so the lock is never poisoned.
        let mut h = h.lock().unwrap();
        h.run(Direction::Outbound, data);
    }
);
