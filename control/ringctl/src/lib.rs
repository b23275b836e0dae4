//! The control process's side of espgw's SA ring, on top of the channel in `espgw-ring`.
//!
//! This is the library the IKE daemon (`espgw-control`) uses to drive a data plane, and what the
//! `espgw-ringctl` tool is built from:
//!
//! * [`Client`]: one attached data plane. It pushes commands and waits for their
//!   `Applied`/`Rejected` (matched by sequence number), queues the events that arrive meanwhile
//!   ([`Client::next_event`]), and keeps the **desired state**: every SA and policy it installed
//!   and the data plane applied. From that state it re-pushes everything after a restart of
//!   either process ([`Client::resync`], [`Client::ensure_current`], [`Client::restore`]).
//! * [`Tunnel`]: one tunnel between two data planes (the tool plays both IKE peers), with
//!   make-before-break rekeying ([`Tunnel::rekey`]).
//! * [`keys`]: random SPIs and keys from the system's CSPRNG.
//! * [`json`]: the JSON shapes the tool prints (events, counters); never key material.
//!
//! ```no_run
//! use espgw_ringctl::{Client, ClientOptions};
//! # fn spec() -> espgw_ring::SaSpec { unimplemented!() }
//! let mut dp = Client::attach("/dev/shm/espgw-ring", ClientOptions::default())?;
//! let sa = dp.add_sa(spec())?;            // blocks until the data plane applied it
//! while let Some(event) = dp.next_event(std::time::Duration::from_secs(1))? {
//!     println!("{}", espgw_ringctl::json::event(&event, dp.resolve(&sa).map(|s| s.name.as_str())));
//! }
//! dp.ensure_current()?;                   // after a data-plane restart: reattach, re-push all
//! # Ok::<(), espgw_ringctl::ClientError>(())
//! ```
//!
//! The protocols (resync, rekey) are described in this crate's README.

#![deny(missing_docs)]

pub mod client;
pub mod json;
pub mod keys;
pub mod tunnel;

pub use client::{
    BulkReport, Client, ClientError, ClientOptions, Event, Health, ResyncReport, Ticket,
};
pub use tunnel::{Endpoint, RekeyReport, Side, Tunnel, TunnelConfig, TunnelError, TunnelSpis};
