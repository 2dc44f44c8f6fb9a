//! Compaction of a stream's event log: per entity, only what a replay needs to reach the same
//! replica — the newest delete (the tombstone) and, for snapshot shapes, the newest create/update;
//! for deltas, every field's last write since that delete, grouped into one event per version (so
//! per-field versions survive). Unmapped fields are kept, so a later mapping can still fill them.
//! `tests/compact.rs` checks that replaying the compacted log gives the replica the whole log gives.

use crate::event::{event_object, new_state_object, parse, Op};
use crate::spec::{Shape, StreamSpec};
use crate::version::Version;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// What the compacted log keeps of one entity.
#[derive(Default)]
struct Entity {
    /// The newest delete (the tombstone), as (order, payload).
    delete: Option<(Order, Value)>,
    /// Snapshot shapes: the newest create/update.
    latest: Option<(Order, Value)>,
    /// Delta: per field, its last write after the tombstone: (order, raw value, template event).
    fields: BTreeMap<String, (Order, Value)>,
    /// Delta: every create/update by order (the newest, even one with no field, still makes the
    /// entity live at its version).
    templates: BTreeMap<Order, Value>,
}

/// Events order by version, or by log position in unversioned streams.
type Order = (Option<Version>, i64);

/// Compacts `log` — (position, payload) in log order — into the payloads to keep, in replay order.
/// Never more events than the log holds. `entity_key` gives the canonical key text of an event's
/// key (`None`: it does not fit the key columns). An event that does not parse or whose key does
/// not fit is kept as it is (a replay dead-letters it as applying it now would).
pub fn compact(
    spec: &StreamSpec,
    log: &[(i64, &str)],
    entity_key: impl Fn(&[String]) -> Option<String>,
) -> Vec<String> {
    let mut entities: BTreeMap<String, Entity> = BTreeMap::new();
    let mut out: Vec<String> = Vec::new();
    for &(seq, payload) in log {
        // An event that no longer parses (the mapping changed) stays as it is: a rebuild
        // dead-letters it as applying it now would.
        let Ok(ev) = parse(spec, payload) else {
            out.push(payload.to_string());
            continue;
        };
        let Some(key) = entity_key(&ev.key) else {
            out.push(payload.to_string());
            continue;
        };
        let raw: Value = serde_json::from_str(payload).expect("parsed once already");
        let order: Order = (ev.version.clone(), seq);
        let e = entities.entry(key).or_default();
        match ev.op {
            Op::Delete => {
                if e.delete.as_ref().is_none_or(|(o, _)| *o < order) {
                    e.delete = Some((order.clone(), raw));
                }
            }
            Op::Upsert { .. } if spec.shape != Shape::Delta => {
                if e.latest.as_ref().is_none_or(|(o, _)| *o < order) {
                    e.latest = Some((order, raw));
                }
            }
            Op::Upsert { .. } => {
                e.templates.insert(order.clone(), raw.clone());
                let Ok(event) = event_object(spec, &raw) else { continue };
                let Some(state) = new_state_object(spec, &event) else { continue };
                for (field, value) in state {
                    if e.fields.get(field).is_none_or(|(o, _)| *o < order) {
                        e.fields.insert(field.clone(), (order.clone(), value.clone()));
                    }
                }
            }
        }
    }
    for e in entities.into_values() {
        let tomb = e.delete.as_ref().map(|(o, _)| o.clone());
        let after_tomb = |o: &Order| tomb.as_ref().is_none_or(|t| o > t);
        if let Some((_, d)) = &e.delete {
            out.push(d.to_string());
        }
        if let Some((o, raw)) = &e.latest {
            if after_tomb(o) {
                out.push(raw.to_string());
            }
        }
        let mut by_order: BTreeMap<Order, Map<String, Value>> = BTreeMap::new();
        for (field, (o, value)) in e.fields {
            if after_tomb(&o) {
                by_order.entry(o).or_default().insert(field, value);
            }
        }
        if let Some(o) = e.templates.keys().next_back().filter(|o| after_tomb(o)) {
            by_order.entry(o.clone()).or_default();
        }
        for (o, fields) in by_order {
            let mut event = e.templates[&o].clone();
            if let Some(obj) = event_mut(spec, &mut event) {
                obj.remove("oldState");
                obj.insert("newState".into(), Value::Object(Map::new()));
                let state = obj.get_mut("newState").expect("just set");
                let target = match &spec.state_path {
                    Some(p) => p.object_mut(state),
                    None => state.as_object_mut(),
                };
                if let Some(t) = target {
                    t.extend(fields);
                }
            }
            // The version may sit inside newState: put the template's value back.
            if let Some(path) = &spec.version {
                if let Some(v) = path.lookup(&e.templates[&o]).cloned() {
                    path.set_default(&mut event, v);
                }
            }
            out.push(event.to_string());
        }
    }
    out
}

/// The event object of a payload, to change (an envelope's event held as a JSON string is put back
/// as an object).
fn event_mut<'v>(spec: &StreamSpec, raw: &'v mut Value) -> Option<&'v mut Map<String, Value>> {
    let Some(path) = &spec.event_path else { return raw.as_object_mut() };
    if let Some(Value::String(text)) = path.lookup(raw) {
        let decoded: Value = serde_json::from_str(text).ok()?;
        path.set(raw, decoded);
    }
    match path.lookup(raw) {
        Some(Value::Object(_)) => path.object_mut(raw),
        _ => None,
    }
}
