//! espgw data plane: the ESP engine and everything around it that does not touch a NIC.
//!
//! * [`sadb`]: lock-free SA database (SPI index, SA slots, SPD) shared by all workers;
//! * [`sa`]: an SA's hot and cold state, counters, lifetimes and events;
//! * [`antireplay`]: the lock-free RFC 6479 window and ESN inference;
//! * [`policy`]: selectors and the SPD;
//! * [`ringapply`]: the data plane's side of the SA ring (commands from the control process);
//! * [`pipeline`]: burst processing, one [`pipeline::Pipeline`] per worker;
//! * [`config`]: the TOML configuration with file/line diagnostics;
//! * [`replay`]: offline processing of capture files;
//! * [`nexthop`], [`counters`]: next-hop resolution and named drop counters.
//!
//! Packet formats live in `espgw-wire`, transforms in `espgw-crypto`.

pub mod antireplay;
pub mod config;
pub mod counters;
pub mod demo;
pub mod gateway;
pub mod icmp;
pub mod netlink;
pub mod nexthop;
pub mod pipeline;
pub mod policy;
pub mod reassembly;
pub mod replay;
pub mod ringapply;
pub mod sa;
pub mod sadb;
pub mod xdp;
pub mod xsk;
