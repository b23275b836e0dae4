//! The JSON shapes `espgw-ringctl` prints, one object per line. Nothing here sees key
//! material: events and counters carry none.

use crate::client::Event;
use espgw_ring::{Direction, Record, SaCounters, SaRef};
use serde_json::{Value, json};

/// `"0x0000abcd"`: how SPIs are printed.
pub fn spi(spi: u32) -> String {
    format!("{spi:#010x}")
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::In => "in",
        Direction::Out => "out",
    }
}

/// `{"direction": "in", "spi": "0x…", "generation": …}`, with `"name"` when known.
pub fn sa_ref(r: &SaRef, name: Option<&str>) -> Value {
    let mut v = json!({
        "direction": direction(r.direction),
        "spi": spi(r.spi),
        "generation": r.generation,
    });
    if let (Some(name), Some(obj)) = (name, v.as_object_mut()) {
        obj.insert("name".into(), Value::String(name.to_string()));
    }
    v
}

/// The SA an event is about, if any.
pub fn event_sa(e: &Event) -> Option<&SaRef> {
    match e {
        Event::Record(
            Record::SoftExpired { sa, .. }
            | Record::HardExpired { sa, .. }
            | Record::SeqNearExhaustion { sa }
            | Record::NatMappingChanged { sa, .. }
            | Record::FirstPacket { sa }
            | Record::Idle { sa, .. }
            | Record::CountersReply(SaCounters { sa, .. }),
        ) => Some(sa),
        _ => None,
    }
}

/// One event as `{"event": "<kind>", …}`; `name` is the SA's name when the caller knows it
/// ([`crate::Client::resolve`]).
pub fn event(e: &Event, name: Option<&str>) -> Value {
    let sa = |r: &SaRef| sa_ref(r, name);
    match e {
        Event::Lost { count } => json!({ "event": "lost", "count": count }),
        Event::Malformed { seq, reason } => {
            json!({ "event": "malformed", "seq": seq, "reason": reason })
        }
        Event::Record(r) => match r {
            Record::SoftExpired { sa: s, limit } => {
                json!({ "event": "soft_expired", "sa": sa(s), "limit": limit.name() })
            }
            Record::HardExpired { sa: s, limit } => {
                json!({ "event": "hard_expired", "sa": sa(s), "limit": limit.name() })
            }
            Record::SeqNearExhaustion { sa: s } => {
                json!({ "event": "seq_near_exhaustion", "sa": sa(s) })
            }
            Record::UnknownSpi {
                spi: x,
                src,
                dst,
                src_port,
                dst_port,
            } => json!({
                "event": "unknown_spi",
                "spi": spi(*x),
                "src": src.to_string(),
                "dst": dst.to_string(),
                "src_port": src_port,
                "dst_port": dst_port,
            }),
            Record::NatMappingChanged {
                sa: s,
                src,
                src_port,
            } => json!({
                "event": "nat_mapping_changed",
                "sa": sa(s),
                "src": src.to_string(),
                "src_port": src_port,
            }),
            Record::FirstPacket { sa: s } => json!({ "event": "first_packet", "sa": sa(s) }),
            Record::Idle { sa: s, seconds } => {
                json!({ "event": "idle", "sa": sa(s), "seconds": seconds })
            }
            Record::CountersReply(c) => {
                let mut v = counters(c, name);
                if let Some(o) = v.as_object_mut() {
                    o.insert("event".into(), Value::String("counters".into()));
                }
                v
            }
            // Commands and answers never reach the event queue; print their kind only.
            other => json!({ "event": other.kind().name() }),
        },
    }
}

/// One SA's counters.
pub fn counters(c: &SaCounters, name: Option<&str>) -> Value {
    json!({
        "sa": sa_ref(&c.sa, name),
        "packets": c.packets,
        "bytes": c.bytes,
        "drops": c.drops,
        "replay_drops": c.replay_drops,
        "auth_failures": c.auth_failures,
        "last_seq": c.last_seq,
    })
}
