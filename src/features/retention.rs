//! Event retention for streams created with `retain_events => true`: applied events are kept in
//! `ecst.event_log` in application order; `ecst.rebuild` replays them into emptied replica
//! tables (e.g. after a column was added to the mapping); `ecst.compact_events` flattens the log
//! so it does not grow without bound, keeping what a rebuild needs to reproduce the replica.

use crate::engine;
use crate::engine::apply;
use crate::engine::outcome::{self, ErrorPolicy};
use crate::engine::record::{self, EventLog};
use crate::pg::owner;
use crate::pg::spi;
use crate::stream::catalog::{self, Stream};
use ecst_core::event::parse;
use pgrx::prelude::*;

const CHUNK: i64 = 10_000;

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
        for sql in ["DELETE FROM {state} WHERE stream_id = $1", "DELETE FROM {ids} WHERE stream_id = $1"] {
            stream.store.run_once(client, sql, &[stream.id.into()]);
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
            let texts: Vec<Option<&str>> = payloads.iter().map(|p| Some(p.as_str())).collect();
            let results = engine::apply(client, &stream, &texts, &events, ErrorPolicy::Caller);
            for r in &results {
                replayed += 1;
                match r {
                    outcome::Applied::Done { outcome: ecst_core::merge::Outcome::Applied, .. } => applied += 1,
                    outcome::Applied::Rejected { .. } => dead += 1,
                    _ => {}
                }
            }
            // The log already holds these events: count and dead-letter, do not log again.
            let events = payloads.iter().map(|p| (Some(p.as_str()), None));
            record::record_all(client, Some(&stream), Some(name), events, &results, EventLog::Replaying);
        }
    });
    (replayed, applied, dead)
}

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
        let log: Vec<(i64, &str)> = rows.iter().map(|(seq, payload)| (*seq, payload.as_str())).collect();
        let out = ecst_core::compact::compact(spec, &log, |key| apply::entity_key(&stream, key));
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
