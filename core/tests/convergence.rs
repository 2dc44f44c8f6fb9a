//! The version rules' core promise (docs/concepts.md), as a property: for any set of events with distinct versions per
//! entity, delivered in any order with any number of duplicates, the replica equals the
//! in-order result. Covers all three shapes, deletes, partial deltas and changing child sets.

mod common;

use common::{events, history, versioned, Step};
use ecst_core::event::Event;
use ecst_core::examples::{address_delta, address_snapshot, customer_aggregate};
use ecst_core::sim::{reference, Replica};
use ecst_core::spec::StreamSpec;
use proptest::prelude::*;

/// Delivers `events` in the order given by `order` (indexes, repeats allowed).
fn deliver(spec: &StreamSpec, events: &[Event], order: &[usize]) -> Replica {
    let mut r = Replica::default();
    for &i in order {
        r.apply(spec, &events[i % events.len()]);
    }
    // Every event arrives at least once.
    for ev in events {
        r.apply(spec, ev);
    }
    r
}

fn check(spec: StreamSpec, history: Vec<Vec<Step>>, order: Vec<usize>) -> Result<(), TestCaseError> {
    let spec = versioned(spec);
    let evs = events(&spec, &history);
    let expected = reference(&spec, &evs);
    let got = deliver(&spec, &evs, &order);
    prop_assert_eq!(got.tables(), expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn delta_converges(h in history(), order in prop::collection::vec(0usize..64, 0..80)) {
        check(address_delta(), h, order)?;
    }

    #[test]
    fn entity_snapshot_converges(h in history(), order in prop::collection::vec(0usize..64, 0..80)) {
        check(address_snapshot(), h, order)?;
    }

    #[test]
    fn aggregate_snapshot_converges(h in history(), order in prop::collection::vec(0usize..64, 0..80)) {
        check(customer_aggregate(), h, order)?;
    }
}
