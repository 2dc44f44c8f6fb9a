//! The version rules' core promise (docs/concepts.md), as a property: for any set of events with distinct versions per
//! entity, delivered in any order with any number of duplicates, the replica equals the
//! in-order result. Covers all three shapes, deletes, partial deltas and changing child sets.

use ecst_core::event::{parse, Event};
use ecst_core::examples::{address_delta, address_snapshot, customer_aggregate};
use ecst_core::sim::{reference, Replica};
use ecst_core::spec::{Path, StreamSpec};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const FIELDS: [&str; 4] = ["addressPurpose", "addressLine1", "addressLine2", "addressTS"];

#[derive(Debug, Clone)]
enum Step {
    Delete,
    /// For each field: absent, null, or one of a few values.
    Upsert([Option<Option<u8>>; 4], Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    let field = prop::option::of(prop::option::of(0u8..3));
    prop_oneof![
        1 => Just(Step::Delete),
        4 => (prop::array::uniform4(field), prop::collection::vec(0u8..5, 0..4)).prop_map(|(f, c)| Step::Upsert(f, c)),
    ]
}

/// Entities, each with a list of steps (their order gives the versions).
fn history() -> impl Strategy<Value = Vec<Vec<Step>>> {
    prop::collection::vec(prop::collection::vec(step(), 1..8), 1..4)
}

fn fields_json(fields: &[Option<Option<u8>>; 4]) -> Map<String, Value> {
    let mut m = Map::new();
    for (name, f) in FIELDS.iter().zip(fields) {
        match f {
            None => {}
            Some(None) => {
                m.insert(name.to_string(), Value::Null);
            }
            Some(Some(v)) => {
                m.insert(name.to_string(), json!(format!("{name}-{v}")));
            }
        }
    }
    m
}

/// Builds the events' JSON for a shape. Versions are spread (×10) and offset per entity.
fn events(spec: &StreamSpec, history: &[Vec<Step>]) -> Vec<Event> {
    let mut out = Vec::new();
    for (entity, steps) in history.iter().enumerate() {
        for (i, s) in steps.iter().enumerate() {
            let version = (i as i64 + 1) * 10 + entity as i64;
            let mut ev = Map::new();
            let state = match s {
                Step::Delete => None,
                Step::Upsert(fields, children) => Some(match spec.name.as_str() {
                    "customer" => {
                        let addresses: Vec<Value> = dedup(children)
                            .iter()
                            .map(|c| {
                                let mut a = fields_json(fields);
                                a.insert("addressId".into(), json!(format!("c{c}")));
                                Value::Object(a)
                            })
                            .collect();
                        json!({"name": format!("v{version}"), "addressContent": {"addresses": addresses}})
                    }
                    "address" => json!({"addressContent": fields_json(fields)}),
                    _ => Value::Object(fields_json(fields)),
                }),
            };
            let key = if spec.name == "customer" { "customerId" } else { "addressId" };
            ev.insert(key.into(), json!(format!("e{entity}")));
            ev.insert("ts".into(), json!(version));
            match state {
                Some(s) => ev.insert("newState".into(), s),
                None => ev.insert("oldState".into(), json!({})),
            };
            out.push(parse(spec, &Value::Object(ev).to_string()).expect("generated events are valid"));
        }
    }
    out
}

fn dedup(v: &[u8]) -> Vec<u8> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn versioned(mut spec: StreamSpec) -> StreamSpec {
    spec.version = Some(Path::parse("ts").unwrap());
    spec.state_path = if spec.name == "address" { Some(Path::parse("addressContent").unwrap()) } else { None };
    spec
}

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
