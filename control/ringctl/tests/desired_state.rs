//! Property: whatever mix of adds, deletes, policies and flushes a client pushes (some of them
//! rejected), its desired state is exactly what the data plane has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use espgw_ring::Direction;
use espgw_ringctl::{Client, ClientOptions};
use proptest::prelude::*;
use std::collections::BTreeSet;

#[derive(Debug, Clone)]
enum Op {
    Add(bool, u8),
    Delete(u8),
    Policy(u8),
    Flush,
    Bulk(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 0u8..24).prop_map(|(out, i)| Op::Add(out, i)),
        3 => (0u8..24).prop_map(Op::Delete),
        2 => (0u8..24).prop_map(Op::Policy),
        1 => Just(Op::Flush),
        1 => proptest::collection::vec(0u8..24, 0..8).prop_map(Op::Bulk),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn desired_state_mirrors_the_data_plane(ops in proptest::collection::vec(op(), 1..40)) {
        let shm = ShmPath::new();
        let dp = Dp::start(shm.path());
        let mut c = Client::attach(shm.path(), ClientOptions::default()).unwrap();
        let name = |i: u8| format!("sa-{i}");
        for op in ops {
            match op {
                Op::Add(out, i) => {
                    let d = if out { Direction::Out } else { Direction::In };
                    // Duplicate names are rejected: fine, the state must still agree.
                    let _ = c.add_sa(sa(d, 0x1000 + u32::from(i), &name(i)));
                }
                Op::Delete(i) => {
                    let _ = c.delete_sa_named(&name(i));
                }
                Op::Policy(i) => {
                    let _ = c.add_policy(protect(1, &name(i)));
                }
                Op::Flush => c.flush().unwrap(),
                Op::Bulk(v) => {
                    let specs = v.iter().map(|i| sa(Direction::In, 0x2000 + u32::from(*i), &format!("bulk-{i}")));
                    c.add_sas_pipelined(specs, 3).unwrap();
                }
            }
            let want: BTreeSet<String> = c.sas().map(|s| s.name.clone()).collect();
            let have: BTreeSet<String> = dp.names().into_iter().collect();
            prop_assert_eq!(want, have);
            if c.policy(1).is_some() {
                // Protecting with its SA, or discarding if that SA was deleted (fail closed).
                prop_assert_eq!(dp.spd().len(), 1);
            } else {
                prop_assert!(dp.spd().is_empty());
            }
        }
    }
}
