//! The shared-memory channel between espgw's control process and its data plane.
//!
//! The data plane creates a [`Segment`] (a file under `/dev/shm`, mode 0600) holding two
//! single-producer/single-consumer rings of fixed-size slots: commands from the control
//! process to the data plane (install, update and delete SAs and policies, flush, query
//! counters, resync) and events back (lifetime expiry, unknown SPIs, NAT changes, counters,
//! and an [`Record::Applied`] or [`Record::Rejected`] for every command). The control process
//! [`Segment::attach`]es to it; either side may die and come back (see the crate's README for
//! the crash semantics and the resynchronisation protocol).
//!
//! ```
//! use espgw_ring::{Record, RingParams, Segment};
//! use std::time::Duration;
//!
//! let path = format!("/dev/shm/espgw-ring-doc-{}", std::process::id());
//! let dp = Segment::create(&path, RingParams::default())?; // the data plane
//! let control = Segment::attach(&path)?;                    // the control process
//! let mut commands = control.sender()?;
//! let seq = commands.push_wait(&Record::Flush { older_than: u64::MAX }, Duration::from_secs(1))?;
//!
//! let mut inbox = dp.receiver()?;
//! let pending = inbox.peek()?.expect("a record");
//! assert_eq!(pending.record(), Ok(&Record::Flush { older_than: u64::MAX }));
//! // ... apply it, then release the slot (the payload is wiped) ...
//! let received = pending.commit();
//! dp.sender()?.try_push(&Record::Applied { seq: received.seq })?;
//! assert_eq!(control.receiver()?.try_pop()?.map(|r| r.record), Some(Ok(Record::Applied { seq })));
//! # drop(inbox); drop(control); drop(dp);
//! # assert!(!std::path::Path::new(&path).exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod checksum;
pub mod record;
pub mod ring;
pub mod segment;

pub use record::{
    DecodeError, DfMode, Direction, DscpMode, EcnMode, EncAlg, EncodeError, IntegAlg, IpPrefix,
    Key, Kind, Lifetimes, Limit, Mode, PolicyAction, PolicySpec, PortRange, Record, RingDir,
    SaCounters, SaRef, SaSpec, SaUpdate, Selector, UdpEncap,
};
pub use ring::{Consumer, Pending, Producer, PushError, Received, RecordError, RingError};
pub use segment::{RingParams, Segment, SegmentError, Side};
