//! Compaction's promise, as a property: replaying the compacted event log, in its order, gives
//! the replica that replaying the whole log gives — for all three shapes, with deletes, per-field
//! versions and child sets, whatever order the events were logged in — and keeps no more events.

mod common;

use common::{history, payloads, versioned, Step};
use ecst_core::compact::compact;
use ecst_core::event::parse;
use ecst_core::examples::{address_delta, address_snapshot, customer_aggregate};
use ecst_core::sim::Replica;
use ecst_core::spec::{Path, Shape, StreamSpec};
use ecst_core::version::Version;
use proptest::prelude::*;
use serde_json::Value;

/// The replica after applying `log` in order (the engine's rules: any order converges).
fn replay(spec: &StreamSpec, log: &[String]) -> Replica {
    let mut r = Replica::default();
    for p in log {
        r.apply(spec, &parse(spec, p).expect("logged events parse"));
    }
    r
}

type Remembered = Vec<(Vec<String>, Option<Version>, Option<Version>, bool, Vec<(String, Version)>)>;

/// Per entity what decides a later event: the newest version, whether the row exists, the fields'
/// versions, and the tombstone where it still matters (deltas; snapshot shapes while the entity is
/// deleted: a snapshot's tombstone below its newest version only tells a re-delivered delete's
/// label, duplicate or stale).
fn remembered(spec: &StreamSpec, r: &Replica) -> Remembered {
    r.states
        .iter()
        .map(|(k, s)| {
            let fields = s.fields.iter().map(|(f, v)| (f.clone(), v.clone())).collect();
            let tomb = s.tomb.clone().filter(|_| spec.shape == Shape::Delta || !s.exists());
            (k.clone(), tomb, s.version().cloned(), s.exists(), fields)
        })
        .collect()
}

/// The payload as a CloudEvents-like envelope: the version at the root, the event under `data`,
/// every other one as a JSON string (double encoding).
fn envelope(payload: &str, i: usize) -> String {
    let mut event: Value = serde_json::from_str(payload).unwrap();
    let ts = event.as_object_mut().unwrap().remove("ts").unwrap();
    let data = if i % 2 == 0 { event } else { Value::String(event.to_string()) };
    serde_json::json!({"id": format!("e{i}"), "ts": ts, "data": data}).to_string()
}

fn check(spec: StreamSpec, history: Vec<Vec<Step>>, order: Vec<usize>, enveloped: bool) -> Result<(), TestCaseError> {
    let spec = versioned(spec);
    let mut all = payloads(&spec, &history);
    let spec = if enveloped { StreamSpec { event_path: Some(Path::parse("data").unwrap()), ..spec } } else { spec };
    if enveloped {
        all = all.iter().enumerate().map(|(i, p)| envelope(p, i)).collect();
    }
    // The log holds every event once, in a shuffled order (events arrive out of order).
    let mut log: Vec<String> = Vec::new();
    let mut left = all.clone();
    for i in order {
        if left.is_empty() {
            break;
        }
        log.push(left.remove(i % left.len()));
    }
    log.extend(left);
    let positions: Vec<(i64, &str)> = log.iter().enumerate().map(|(i, p)| (i as i64 + 1, p.as_str())).collect();
    let compacted = compact(&spec, &positions, |key| Some(key.join("\u{1f}")));
    prop_assert!(compacted.len() <= log.len());
    let (got, want) = (replay(&spec, &compacted), replay(&spec, &log));
    prop_assert_eq!(got.tables(), want.tables());
    // What decides later events is kept too: tombstones, the newest version, per-field versions.
    prop_assert_eq!(remembered(&spec, &got), remembered(&spec, &want));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn a_compacted_delta_log_replays_to_the_same_replica(h in history(), order in prop::collection::vec(0usize..64, 0..40), enveloped in prop::bool::ANY) {
        check(address_delta(), h, order, enveloped)?;
    }

    #[test]
    fn a_compacted_entity_snapshot_log_replays_to_the_same_replica(h in history(), order in prop::collection::vec(0usize..64, 0..40), enveloped in prop::bool::ANY) {
        check(address_snapshot(), h, order, enveloped)?;
    }

    #[test]
    fn a_compacted_aggregate_log_replays_to_the_same_replica(h in history(), order in prop::collection::vec(0usize..64, 0..40), enveloped in prop::bool::ANY) {
        check(customer_aggregate(), h, order, enveloped)?;
    }
}
