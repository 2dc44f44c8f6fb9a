//! The SQL functions of schema `ecst` (the wrappers with `regclass`/`jsonb` signatures and the
//! `ecst.stats` view are in `sql/finalize.sql`).

use crate::engine;
use crate::engine::apply;
use crate::engine::counters;
use crate::engine::outcome::{Applied, ErrorPolicy};
use crate::engine::record::{self, EventLog};
use crate::features::feed;
use crate::features::inbox;
use crate::features::retention;
use crate::features::snapshot;
use crate::pg::gucs;
use crate::pg::owner;
use crate::pg::spi;
use crate::stream::catalog;
use crate::stream::routes;
use crate::stream::security;
use ecst_core::reject::{RejectCode, Rejection};
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};
use std::collections::{BTreeMap, HashMap};

/// The `ecst.outcome` label of a result. The Rust functions return it as text and the SQL
/// wrappers in `sql/finalize.sql` cast it to the schema-qualified enum, so callers need not
/// have `ecst` on their search_path.
fn outcome(a: &Applied) -> &'static str {
    match a {
        Applied::Done { outcome, .. } => outcome.as_str(),
        Applied::Rejected { .. } => "dead_lettered",
    }
}

/// An argument that must not be NULL (22004 names it, instead of pgrx's internal error).
fn required<T>(value: Option<T>, argument: &str) -> T {
    value.unwrap_or_else(|| {
        crate::pg::errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{argument} must not be NULL"),
            None,
        )
    })
}

/// `_create_stream` as 0.1.0 and 0.2.0 declared it (without `event_path`), under its own symbol, so
/// that a database not updated yet (`ALTER EXTENSION pg_ecst UPDATE`) keeps working with this
/// library. Not in the install script.
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "_create_stream", sql = false)]
fn create_stream(
    name: Option<&str>,
    target: Option<pg_sys::Oid>,
    shape: Option<&str>,
    key: Option<JsonB>,
    state_path: Option<String>,
    columns: Option<JsonB>,
    version: Option<String>,
    event_id: Option<String>,
    children: Option<JsonB>,
    on_conflict: Option<String>,
    retain_events: Option<bool>,
) {
    create_stream_with_schema(
        name,
        target,
        shape,
        key,
        state_path,
        columns,
        version,
        event_id,
        children,
        on_conflict,
        retain_events,
        None,
        None,
    )
}

/// `_create_stream` as 0.3.0 declared it (without `schema`), kept for databases not updated yet.
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "_create_stream", sql = false)]
fn create_stream_with_event_path(
    name: Option<&str>,
    target: Option<pg_sys::Oid>,
    shape: Option<&str>,
    key: Option<JsonB>,
    state_path: Option<String>,
    columns: Option<JsonB>,
    version: Option<String>,
    event_id: Option<String>,
    children: Option<JsonB>,
    on_conflict: Option<String>,
    retain_events: Option<bool>,
    event_path: Option<String>,
) {
    create_stream_with_schema(
        name,
        target,
        shape,
        key,
        state_path,
        columns,
        version,
        event_id,
        children,
        on_conflict,
        retain_events,
        event_path,
        None,
    )
}

#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "_create_stream")]
fn create_stream_with_schema(
    name: Option<&str>,
    target: Option<pg_sys::Oid>,
    shape: Option<&str>,
    key: Option<JsonB>,
    state_path: Option<String>,
    columns: Option<JsonB>,
    version: Option<String>,
    event_id: Option<String>,
    children: Option<JsonB>,
    on_conflict: Option<String>,
    retain_events: Option<bool>,
    event_path: Option<String>,
    schema: Option<JsonB>,
) {
    if let Some(name) = name.filter(|n| routes::route(n).is_some()) {
        crate::pg::errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("\"{name}\" is the name of a route"),
            Some("Streams and routes share one namespace: choose another name."),
        );
    }
    catalog::create_stream(
        required(name, "name"),
        required(target, "target"),
        required(shape, "shape"),
        required(key, "key").0,
        state_path,
        columns.map(|c| c.0),
        version,
        event_id,
        children.map(|c| c.0),
        on_conflict.as_deref().unwrap_or("apply"),
        retain_events.unwrap_or(false),
        event_path,
        schema.map(|s| s.0),
    )
}

/// Replaces (or, with NULL, removes) the JSON Schema a stream checks every payload against.
#[pg_extern]
fn set_stream_schema(stream: Option<&str>, schema: Option<JsonB>) {
    catalog::set_schema(required(stream, "stream"), schema.map(|s| s.0))
}

/// `ecst.feed`'s BEFORE INSERT ... FOR EACH STATEMENT trigger.
#[pg_trigger]
fn _feed_begin<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    feed::begin_statement();
    Ok(None)
}

/// `ecst.feed`'s INSTEAD OF INSERT row trigger: buffers the row (applied by chunk); returning a
/// row counts it in the statement's command tag.
///
/// It returns a copy, made in the per-row memory the trigger is called in: PostgreSQL frees the
/// row it handed the trigger only when the trigger returns another one (`ExecIRInsertTriggers`);
/// returning that row itself would keep every row of the statement in memory until it ends.
#[pg_trigger]
fn _feed_row<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByRust>>, pgrx::PgTriggerError> {
    let new = trigger.new().expect("an INSERT row trigger has a new row");
    let stream = new.get_by_index::<&str>(std::num::NonZeroUsize::new(1).unwrap()).ok().flatten();
    let payload = new.get_by_index::<&str>(std::num::NonZeroUsize::new(2).unwrap()).ok().flatten();
    feed::add_row(stream, payload);
    Ok(Some(new.into_owned()))
}

/// `ecst.feed`'s AFTER INSERT ... FOR EACH STATEMENT trigger: applies what is left.
#[pg_trigger]
fn _feed_end<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    feed::end_statement();
    Ok(None)
}

/// Drops a stream (its definition, version state and counters); the replica tables and
/// dead letters stay. Returns false when no such stream existed.
#[pg_extern]
fn drop_stream(name: &str) -> bool {
    catalog::drop_stream(name)
}

/// Applies one event (given as text, exactly as received). A NULL event is dead-lettered, as in
/// a batch: nothing handed to pg_ecst disappears without a trace.
#[pg_extern(name = "_apply")]
fn apply_text(stream: Option<&str>, event: Option<&str>) -> &'static str {
    let stream = required(stream, "stream");
    let s = match catalog::try_stream(stream) {
        Some(s) => s,
        // A route's name: the event goes to the stream the route selects for it.
        None => match routes::route(stream) {
            Some(route) => match route.select(event) {
                Ok(target) => catalog::stream(target),
                Err(rejection) => {
                    let result = [Applied::rejected(rejection)];
                    Spi::connect_mut(|client| {
                        record::record_all(client, None, Some(stream), [(event, None)], &result, EventLog::Append)
                    });
                    return outcome(&result[0]);
                }
            },
            None => catalog::stream(stream),
        },
    };
    security::require_apply(&s);
    let stream = s.spec.name.clone();
    let stream = stream.as_str();
    let s = s.styled();
    Spi::connect_mut(|client| {
        let parsed = [apply::parse_payload(&s.spec, event)];
        let result = engine::apply(client, &s, &[event], &parsed, ErrorPolicy::Caller).pop().expect("one result");
        let result = [result];
        record::record_all(client, Some(&s), Some(stream), [(event, None)], &result, EventLog::Append);
        outcome(&result[0])
    })
}

fn counts_table(
    counts: BTreeMap<&'static str, i64>,
) -> TableIterator<'static, (name!(outcome, &'static str), name!(count, i64))> {
    TableIterator::new(counts)
}

/// Applies many events; events of one entity are applied in array order. Returns the count
/// per outcome.
#[pg_extern(name = "_apply_batch")]
fn apply_batch_text(
    stream: &str,
    events: Vec<Option<String>>,
) -> TableIterator<'static, (name!(outcome, &'static str), name!(count, i64))> {
    let mut counts = BTreeMap::new();
    if catalog::try_stream(stream).is_none() {
        if let Some(route) = routes::route(stream) {
            // A route's name: each stream's events as one batch (in array order), streams in name
            // order; the events the route sends nowhere are dead letters under the route's name.
            let (by_stream, unrouted) = routes::split(&route, events.iter().map(|e| e.as_deref()));
            for (target, positions) in by_stream {
                let subset: Vec<Option<String>> = positions.iter().map(|&i| events[i].clone()).collect();
                apply_batch_to(&catalog::stream(&target), &subset, &mut counts);
            }
            Spi::connect_mut(|client| {
                for (i, rejection) in unrouted {
                    let result = [Applied::rejected(rejection)];
                    *counts.entry(outcome(&result[0])).or_insert(0) += 1;
                    let event = [(events[i].as_deref(), None)];
                    record::record_all(client, None, Some(stream), event, &result, EventLog::Append);
                }
            });
            return counts_table(counts);
        }
    }
    apply_batch_to(&catalog::stream(stream), &events, &mut counts);
    counts_table(counts)
}

/// Applies a batch of one stream, adding its outcomes to `counts`.
fn apply_batch_to(
    s: &std::rc::Rc<catalog::Stream>,
    events: &[Option<String>],
    counts: &mut BTreeMap<&'static str, i64>,
) {
    let stream = s.spec.name.as_str();
    security::require_apply(s);
    // bulk::apply_run visits entities in key order (the lock order); each entity's events keep
    // their array order.
    let parsed: Vec<Result<_, Rejection>> =
        events.iter().map(|e| apply::parse_payload(&s.spec, e.as_deref())).collect();
    Spi::connect_mut(|client| {
        let texts: Vec<Option<&str>> = events.iter().map(|e| e.as_deref()).collect();
        let results = engine::apply(client, &s.styled(), &texts, &parsed, ErrorPolicy::Caller);
        for result in &results {
            *counts.entry(outcome(result)).or_insert(0) += 1;
        }
        let received = events.iter().map(|e| (e.as_deref(), None));
        record::record_all(client, Some(s), Some(stream), received, &results, EventLog::Append);
    });
}

/// Puts dead letters (of one stream, or all) back through the pipeline. Those that apply now
/// leave `ecst.dead_letters`; the others stay with their new reason and one more attempt.
/// A named stream needs the privileges to apply it; without a name, only the letters of streams
/// the caller may apply are retried (and those of streams that no longer exist, by the
/// extension's owner).
#[pg_extern(name = "_retry_dead_letters")]
fn retry_dead_letters(
    stream: Option<&str>,
) -> TableIterator<'static, (name!(outcome, &'static str), name!(count, i64))> {
    if let Some(s) = stream.and_then(catalog::try_stream) {
        security::require_apply(&s);
        security::require_trusted_code(&s);
    }
    let admin = owner::is_admin();
    let mut counts = BTreeMap::new();
    let mut untrusted = 0i64;
    Spi::connect_mut(|client| {
        // Letters received before their stream (as it is now) was created — a dropped stream's of
        // the same name, or events for a name nobody had created yet — are not the new stream's
        // owner's to read: only an administrator retries them.
        type Letter = (i64, Option<String>, Option<String>, bool, Option<pg_sys::Oid>);
        let letters: Vec<Letter> = spi::internal::run_once(
            client,
            "SELECT d.id, d.stream, d.payload, coalesce(d.received_at < s.created_at, false), s.target::oid
             FROM ecst.dead_letters d LEFT JOIN ecst.streams s ON s.name = d.stream
             WHERE $1::text IS NULL OR d.stream = $1 ORDER BY d.id",
            &[stream.into()],
        )
        .map(|r| {
            (
                r.get(1).unwrap().unwrap(),
                r.get(2).unwrap(),
                r.get(3).unwrap(),
                r.get(4).unwrap().unwrap(),
                r.get(5).unwrap(),
            )
        })
        .collect();
        let mut allowed: HashMap<String, bool> = HashMap::new();
        let mut trusted: HashMap<String, bool> = HashMap::new();
        let mut skipped = 0i64;
        let mut broken: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut route_of: HashMap<String, Option<ecst_core::route::Route>> = HashMap::new();
        for (id, name, payload, before_stream, table) in letters {
            // A letter kept under a route's name goes where the route sends it now (for the
            // privileges too); one it still sends nowhere stays, for an administrator to retry.
            let mut unrouted: Option<Rejection> = None;
            let route = match (&name, table) {
                (Some(n), None) => route_of.entry(n.clone()).or_insert_with(|| routes::route(n)).clone(),
                _ => None,
            };
            let (name, before_stream, table) = match route.as_ref().map(|r| r.select(payload.as_deref())) {
                Some(Ok(target)) => {
                    let table = catalog::try_stream(target).map(|s| s.table.oid);
                    (Some(target.to_string()), false, table)
                }
                Some(Err(rejection)) => {
                    unrouted = Some(rejection);
                    (name, before_stream, table)
                }
                None => (name, before_stream, table),
            };
            // Streams the caller may not apply are not even looked up: looking one up locks its
            // tables until the caller's transaction ends.
            if !admin && (before_stream || !table.is_some_and(security::may_apply_table)) {
                skipped += 1;
                continue;
            }
            // A stream whose definition no longer builds keeps its letters (and the others are
            // retried).
            let target = match name.as_deref().map(catalog::try_stream_quietly) {
                None => None,
                Some(Ok(found)) => found,
                Some(Err((message, _))) => {
                    broken.insert(message);
                    continue;
                }
            };
            let permitted = match (&target, &name) {
                (Some(_), Some(_)) if before_stream => admin,
                (Some(s), Some(n)) => *allowed.entry(n.clone()).or_insert_with(|| security::apply_denied(s).is_none()),
                _ => admin,
            };
            if !permitted {
                skipped += 1;
                continue;
            }
            // A retry of every stream is not the caller's choice of this one: the code its tables
            // run must not get the caller's privileges (security::untrusted_code).
            if let Some(s) = &target {
                if !*trusted.entry(s.spec.name.clone()).or_insert_with(|| security::untrusted_code(s).is_none()) {
                    untrusted += 1;
                    continue;
                }
            }
            // Taken one by one, so a concurrent retry of the same letter waits and then skips it.
            let locked =
                !spi::internal::run(client, "SELECT 1 FROM ecst.dead_letters WHERE id = $1 FOR UPDATE", &[id.into()])
                    .is_empty();
            if !locked {
                continue;
            }
            let result = match (&target, &payload) {
                (Some(s), p) => {
                    let parsed = [apply::parse_payload(&s.spec, p.as_deref())];
                    engine::apply(client, &s.styled(), &[p.as_deref()], &parsed, ErrorPolicy::Caller)
                        .pop()
                        .expect("one result")
                }
                (None, _) => Applied::rejected(unrouted.take().unwrap_or_else(|| {
                    Rejection::new(
                        RejectCode::UnknownStream,
                        catalog::unknown_stream_message(name.as_deref().unwrap_or("")),
                    )
                })),
            };
            match &result {
                Applied::Rejected { rejection, sqlstate, .. } => {
                    spi::internal::run(
                        client,
                        "UPDATE ecst.dead_letters SET error_code = $2, message = $3, sqlstate = $4,
                                failed_at = clock_timestamp(), attempts = attempts + 1
                         WHERE id = $1",
                        &[
                            id.into(),
                            rejection.code.as_str().into(),
                            rejection.message.as_str().into(),
                            sqlstate.as_deref().into(),
                        ],
                    );
                }
                Applied::Done { .. } => {
                    spi::internal::run(client, "DELETE FROM ecst.dead_letters WHERE id = $1", &[id.into()]);
                    if let Some(s) = &target {
                        let applied = std::slice::from_ref(&result);
                        let events = [(payload.as_deref(), None)];
                        record::record_all(client, Some(s), name.as_deref(), events, applied, EventLog::Append);
                    }
                }
            }
            *counts.entry(outcome(&result)).or_insert(0) += 1;
        }
        for message in &broken {
            notice!("pg_ecst: dead letters kept: {message}");
        }
        if skipped > 0 {
            notice!(
                "pg_ecst: skipped {skipped} dead letter(s) this role may not retry (of streams it may not apply, or received before their stream was created)"
            );
        }
        if untrusted > 0 {
            notice!(
                "pg_ecst: kept {untrusted} dead letter(s) of streams whose tables run code of roles without this role's privileges; retry them by stream as those roles ({})",
                security::UNTRUSTED_HINT
            );
        }
    });
    counts_table(counts)
}

/// Removes dead letters (of one stream, one error code, last failed before some time ago; NULL:
/// any) the caller may discard; see `ecst.discard_dead_letters`.
#[pg_extern(name = "_discard_dead_letters")]
fn discard_dead_letters(
    stream: Option<&str>,
    error_code: Option<&str>,
    older_than: Option<pgrx::datum::Interval>,
) -> i64 {
    crate::features::dead_letters::discard(stream, error_code, older_than)
}

/// This backend's counters not yet written to `ecst.stream_counters` (used by `ecst.stats`).
#[pg_extern]
#[allow(clippy::type_complexity)]
fn _unflushed_counters() -> TableIterator<
    'static,
    (
        name!(stream_id, i32),
        name!(applied, i64),
        name!(duplicate, i64),
        name!(stale, i64),
        name!(skipped, i64),
        name!(conflicts, i64),
        name!(dead_lettered, i64),
        name!(last_applied_at, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    let pending = counters::unflushed();
    let now = (pending.iter().any(|(_, c)| c.applied > 0))
        .then(|| Spi::get_one::<pgrx::datum::TimestampWithTimeZone>("SELECT clock_timestamp()").ok().flatten())
        .flatten();
    TableIterator::new(pending.into_iter().map(move |(id, c)| {
        (
            id,
            c.applied,
            c.duplicate,
            c.stale,
            c.skipped,
            c.conflicts,
            c.dead_lettered,
            (c.applied > 0).then_some(now).flatten(),
        )
    }))
}

/// Applies the inbox's pending events now, in the caller's transaction (usable without the
/// background worker). Returns the number of inbox rows processed.
#[pg_extern]
fn process_inbox(max_events: default!(Option<i64>, "NULL")) -> i64 {
    if let Some(m) = max_events {
        if m < 0 {
            crate::pg::errors::raise(
                pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "max_events must not be negative",
                None,
            );
        }
    }
    inbox::process(max_events, gucs::BATCH_SIZE.get() as i64)
}

/// Bulk-loads a snapshot (one create event per row of `source.payload`); see `ecst.load_snapshot`.
#[pg_extern(name = "_load_snapshot")]
fn load_snapshot(
    stream: Option<&str>,
    source: Option<pg_sys::Oid>,
    mode: Option<&str>,
    as_of: Option<&str>,
) -> TableIterator<'static, (name!(loaded, i64), name!(stale, i64), name!(deleted, i64), name!(dead_lettered, i64))> {
    let stream = required(stream, "stream");
    let source = required(source, "source");
    let c = snapshot::load(stream, source, mode.unwrap_or("merge"), as_of);
    TableIterator::once((c.loaded, c.stale, c.deleted, c.dead_lettered))
}

/// The replica as create events in the stream's own format, with versions.
#[pg_extern]
fn export_snapshot(stream: &str) -> SetOfIterator<'static, JsonB> {
    SetOfIterator::new(snapshot::export(stream).into_iter().map(JsonB))
}

/// Empties the stream's replica tables and version state and replays its event log
/// (streams with `retain_events`).
#[pg_extern]
fn rebuild(
    stream: &str,
) -> TableIterator<'static, (name!(replayed, i64), name!(applied, i64), name!(dead_lettered, i64))> {
    TableIterator::once(retention::rebuild(stream))
}

/// Flattens the stream's event log; a rebuild afterwards gives the same replica.
#[pg_extern]
fn compact_events(stream: &str) -> TableIterator<'static, (name!(events_before, i64), name!(events_after, i64))> {
    TableIterator::once(retention::compact(stream))
}

/// Creates a route, or replaces one the caller's role created: `field` (a dotted path in the
/// payload) selects, by `streams` (value → stream name), the stream each event fed under the
/// route's name goes to.
#[pg_extern]
fn create_route(name: &str, field: &str, streams: JsonB) {
    routes::create_route(name, field, streams.0)
}

/// Drops a route (its dead letters stay). Returns false when there was none.
#[pg_extern]
fn drop_route(name: &str) -> bool {
    routes::drop_route(name)
}

/// The value a route's `field` has in a payload (NULL where it has none), for `ecst.route_stats`.
#[pg_extern(immutable, parallel_safe, name = "_route_value")]
fn route_value(payload: &str, field: &str) -> Option<String> {
    let root: serde_json::Value = serde_json::from_str(payload).ok()?;
    match ecst_core::spec::Path::parse(field).ok()?.lookup(&root)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// On a Citus node holding a shard of a stream's distributed replica: applies the events that the
/// coordinator staged in `stage` (a shard of the stream's stage table) under `token`, with the
/// engine, against the shard group's tables; returns their results (`engine::shards`). Called by
/// pg_ecst's query on the coordinator, once per staged row; the first call does the work.
#[pg_extern(name = "_apply_shard")]
fn apply_shard(stream_id: i32, stage: pg_sys::Oid, token: &str, policy: &str) -> Option<String> {
    Spi::connect_mut(|client| crate::engine::shards::apply_staged(client, stream_id, stage, token, policy))
}
