//! Event retention for streams created with `retain_events => true`: applied events are kept in
//! `ecst.event_log` in application order; `ecst.rebuild` replays them into emptied replica
//! tables (e.g. after a column was added to the mapping); `ecst.compact_events` flattens the log
//! so it does not grow without bound, keeping what a rebuild needs to reproduce the replica.

use crate::engine;
use crate::engine::apply;
use crate::engine::outcome::{self, ErrorPolicy};
use crate::engine::record;
use crate::pg::owner;
use crate::pg::spi;
use crate::stream::catalog::{self, Stream};
use ecst_core::event::{parse, Op};
use ecst_core::spec::Shape;
use ecst_core::version::Version;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

const CHUNK: i64 = 10_000;

/// Appends applied payloads to the stream's event log (no-op for an empty list).
pub fn append(client: &mut SpiClient, stream: &Stream, payloads: Vec<String>) {
    if payloads.is_empty() {
        return;
    }
    spi::internal::run(
        client,
        "INSERT INTO ecst.event_log (stream_id, payload) SELECT $1, pg_catalog.unnest($2::text[])",
        &[stream.id.into(), payloads.into()],
    );
}

/// A stream that retains events, which the caller owns (`action` names the operation).
fn retaining(name: &str, action: &str) -> std::rc::Rc<Stream> {
    let stream = catalog::stream(name);
    owner::require_owner(name, stream.table.oid, action);
    if !stream.retain_events {
        crate::pg::errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("stream \"{name}\" does not retain events"),
            Some("Create the stream with retain_events => true to keep an event log."),
        );
    }
    stream
}

/// Empties the stream's replica tables and version state and replays the event log.
/// Returns (replayed, applied, dead_lettered).
pub fn rebuild(name: &str) -> (i64, i64, i64) {
    let stream = retaining(name, "rebuild");
    let stream = stream.styled();
    crate::stream::security::require_trusted_code(&stream);
    let (mut replayed, mut applied, mut dead) = (0, 0, 0);
    // No writer of the stream may keep a version it read before the state is cleared.
    crate::pg::locks::lock_stream(stream.id, true);
    Spi::connect_mut(|client| {
        let tables: Vec<&str> = stream
            .children
            .iter()
            .map(|c| c.table.qualified.as_str())
            .chain(std::iter::once(stream.table.qualified.as_str()))
            .collect();
        client.update(&format!("TRUNCATE {}", tables.join(", ")), None, &[]).expect("truncating the replica");
        for sql in [
            "DELETE FROM ecst.entity_state WHERE stream_id = $1",
            "DELETE FROM ecst.applied_events WHERE stream_id = $1",
        ] {
            spi::internal::run_once(client, sql, &[stream.id.into()]);
        }
        let mut cursor = spi::internal::open(
            client,
            "SELECT payload FROM ecst.event_log WHERE stream_id = $1 ORDER BY seq",
            &[stream.id.into()],
        );
        loop {
            let payloads: Vec<String> = cursor.fetch(CHUNK as _).map(|r| r.get(1).unwrap().unwrap()).collect();
            if payloads.is_empty() {
                break;
            }
            let events: Vec<_> = payloads.iter().map(|p| parse(&stream.spec, p)).collect();
            let results = engine::apply(client, &stream, &events, ErrorPolicy::Caller);
            let mut ignored = Vec::new();
            for (p, r) in payloads.iter().zip(&results) {
                replayed += 1;
                match r {
                    outcome::Applied::Done { outcome: ecst_core::merge::Outcome::Applied, .. } => applied += 1,
                    outcome::Applied::Rejected { .. } => dead += 1,
                    _ => {}
                }
                // The log already holds these events: count and dead-letter, do not log again.
                record::record(client, Some(&stream), Some(name), Some(p), r, None, &mut ignored);
            }
        }
    });
    (replayed, applied, dead)
}

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

/// Flattens the stream's event log so a rebuild still reproduces the replica: per entity the
/// newest delete (a tombstone) and, for snapshot shapes, the newest create/update; for deltas,
/// every field's last write since that delete, grouped into one event per version (so per-field
/// versions survive). Unmapped fields are kept, so a later mapping can still be filled.
/// Returns (events before, events after).
pub fn compact(name: &str) -> (i64, i64) {
    let stream = retaining(name, "compact the event log of");
    let stream = stream.styled();
    let spec = &stream.spec;
    Spi::connect_mut(|client| {
        let rows: Vec<(i64, String)> = spi::internal::run_once(
            client,
            "SELECT seq, payload FROM ecst.event_log WHERE stream_id = $1 ORDER BY seq FOR UPDATE",
            &[stream.id.into()],
        )
        .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap()))
        .collect();
        let before = rows.len() as i64;
        if rows.is_empty() {
            return (0, 0);
        }
        let mut entities: BTreeMap<String, Entity> = BTreeMap::new();
        let mut out: Vec<String> = Vec::new();
        for (seq, payload) in &rows {
            // An event that no longer parses (the mapping changed) stays as it is: a rebuild
            // dead-letters it as applying it now would.
            let Ok(ev) = parse(spec, payload) else {
                out.push(payload.clone());
                continue;
            };
            let Some(key) = apply::entity_key(&stream, &ev.key) else {
                out.push(payload.clone());
                continue;
            };
            let raw: Value = serde_json::from_str(payload).expect("parsed once already");
            let order: Order = (ev.version.clone(), *seq);
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
                    let Some(state) = entity_object(spec, &raw) else { continue };
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
                if let Some(obj) = event.as_object_mut() {
                    obj.remove("oldState");
                    obj.insert("newState".into(), Value::Object(Map::new()));
                }
                let target = match &spec.state_path {
                    Some(p) => p.object_mut(event.get_mut("newState").expect("just set")),
                    None => event.get_mut("newState").and_then(Value::as_object_mut),
                };
                if let Some(t) = target {
                    t.extend(fields);
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
        spi::internal::run_once(
            client,
            // Exactly the rows read (and locked): one committed since is not among them.
            "DELETE FROM ecst.event_log WHERE stream_id = $1 AND seq = ANY ($2::bigint[])",
            &[stream.id.into(), rows.iter().map(|r| r.0).collect::<Vec<i64>>().into()],
        );
        // Never more events than were read: the compacted ones take the lowest of the replaced
        // positions, so they still replay before anything appended meanwhile.
        let after = out.len() as i64;
        let seqs: Vec<i64> = rows.iter().map(|r| r.0).take(out.len()).collect();
        spi::internal::run_once(
            client,
            "INSERT INTO ecst.event_log (stream_id, seq, payload)
             SELECT $1, u.s, u.p FROM unnest($2::bigint[], $3::text[]) AS u (s, p)",
            &[stream.id.into(), seqs.into(), out.into()],
        );
        (before, after)
    })
}

/// The entity object of an event's newState (at `state_path`).
fn entity_object<'v>(spec: &ecst_core::spec::StreamSpec, raw: &'v Value) -> Option<&'v Map<String, Value>> {
    let state = raw.get("newState")?;
    match &spec.state_path {
        Some(p) => p.lookup(state)?.as_object(),
        None => state.as_object(),
    }
}
