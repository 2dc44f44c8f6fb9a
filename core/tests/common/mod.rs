//! The event generator the property tests share: a few entities, each with a history of deletes
//! and upserts (random fields, NULLs, child sets), versioned by their order.
#![allow(dead_code)]

use ecst_core::event::{parse, Event};
use ecst_core::spec::{Path, StreamSpec};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

pub const FIELDS: [&str; 4] = ["addressPurpose", "addressLine1", "addressLine2", "addressTS"];

#[derive(Debug, Clone)]
pub enum Step {
    Delete,
    /// For each field: absent, null, or one of a few values.
    Upsert([Option<Option<u8>>; 4], Vec<u8>),
}

pub fn step() -> impl Strategy<Value = Step> {
    let field = prop::option::of(prop::option::of(0u8..3));
    prop_oneof![
        1 => Just(Step::Delete),
        4 => (prop::array::uniform4(field), prop::collection::vec(0u8..5, 0..4)).prop_map(|(f, c)| Step::Upsert(f, c)),
    ]
}

/// Entities, each with a list of steps (their order gives the versions).
pub fn history() -> impl Strategy<Value = Vec<Vec<Step>>> {
    prop::collection::vec(prop::collection::vec(step(), 1..8), 1..4)
}

pub fn fields_json(fields: &[Option<Option<u8>>; 4]) -> Map<String, Value> {
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
/// The events' payloads, entity by entity, each entity's in version order.
pub fn payloads(spec: &StreamSpec, history: &[Vec<Step>]) -> Vec<String> {
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
            out.push(Value::Object(ev).to_string());
        }
    }
    out
}

pub fn dedup(v: &[u8]) -> Vec<u8> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

pub fn versioned(mut spec: StreamSpec) -> StreamSpec {
    spec.version = Some(Path::parse("ts").unwrap());
    spec.state_path = if spec.name == "address" { Some(Path::parse("addressContent").unwrap()) } else { None };
    spec
}

/// The events of `history`, parsed.
pub fn events(spec: &StreamSpec, history: &[Vec<Step>]) -> Vec<Event> {
    payloads(spec, history).iter().map(|p| parse(spec, p).expect("generated events are valid")).collect()
}
