//! Applying events: parse (core) → convert values through column types → deduplicate event
//! ids → lock and read the entity's version state → decide (core) → write the replica and
//! the new state. Each event runs in its own subtransaction, so a bad event is rolled back
//! alone and dead-lettered while the rest of a batch goes on.

use crate::engine::direct;
use crate::engine::outcome::{Applied, ErrorPolicy, LAST_TRY_AFTER};
use crate::engine::writer::{self, Bound};
use crate::pg::errors::{self, raise};
use crate::pg::locks;
use crate::pg::spi;
use crate::pg::store::Store;
use crate::pg::subxact::{self, SubResult};
use crate::stream::catalog::{Column, Stream, TableInfo};
use ecst_core::event::{check_unique_child_keys, parse, ChildSet, Event, Op, Value};
use ecst_core::fold::{fold, Fate, Folded, Ids, Plan};
use ecst_core::merge::{EntityState, Outcome};
use ecst_core::reject::{RejectCode, Rejection};
use ecst_core::spec::StreamSpec;
use ecst_core::version::Version;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::spi::SpiClient;
use pgrx::PgSqlErrorCode as Code;
use std::collections::BTreeMap;

/// Why an attempt stopped; its subtransaction is rolled back.
enum Stop {
    Reject(Rejection, bool),
    /// A concurrent session created the same entity first: try again.
    Retry,
    /// `on_conflict => 'error'`.
    Raise(String),
}

const ATTEMPTS: usize = 50;

/// Parses a payload as received (a NULL payload is rejected). Pure Rust: it may run on a helper
/// thread (`snapshot::parse_chunk`).
pub fn parse_payload(spec: &StreamSpec, payload: Option<&str>) -> Result<Event, Rejection> {
    match payload {
        Some(text) => parse(spec, text),
        None => Err(Rejection::new(RejectCode::InvalidJson, "the event is NULL")),
    }
}

/// Applies one parsed event in its own subtransaction.
pub(super) fn apply_event(client: &mut SpiClient, stream: &Stream, ev: &Event, policy: ErrorPolicy) -> Applied {
    // After a row insert lost a race (`direct`), the event is retried with SQL's `ON CONFLICT`.
    let mut sql_only = false;
    for _ in 0..ATTEMPTS {
        // Whether a row insert lost a race is this attempt's question only: an insert that failed
        // earlier (a set-based run's, whose error was caught elsewhere) must not answer it.
        direct::insert_lost_race();
        match subxact::run(|| attempt(client, stream, ev, sql_only)) {
            SubResult::Committed((outcome, conflict)) => return Applied::Done { outcome, conflict },
            SubResult::RolledBack(Stop::Retry) => continue,
            SubResult::RolledBack(Stop::Reject(rejection, conflict)) => {
                return Applied::Rejected { rejection, sqlstate: None, conflict }
            }
            // The worker has no caller to raise to: raising would fail its batch over and over.
            SubResult::RolledBack(Stop::Raise(message)) if policy == ErrorPolicy::Worker => {
                return Applied::Rejected {
                    rejection: Rejection::new(RejectCode::Conflict, message),
                    sqlstate: Some("23000".into()),
                    conflict: true,
                }
            }
            SubResult::RolledBack(Stop::Raise(message)) => raise(
                Code::ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION,
                message,
                Some("The stream's on_conflict is 'error'. Re-sync the entity, or use on_conflict 'apply', 'skip' or 'dead_letter'."),
            ),
            SubResult::Failed(caught) => match *caught {
                CaughtError::PostgresError(report)
                    if direct::insert_lost_race()
                        && report.sql_error_code() == Code::ERRCODE_UNIQUE_VIOLATION
                        && !sql_only =>
                {
                    sql_only = true;
                }
                // PostgreSQL's errors, and pg_ecst's own raised while applying the event (a stored
                // version no event can be compared with): the same policy.
                CaughtError::PostgresError(report) | CaughtError::ErrorReport(report)
                    if policy.dead_letters(&errors::sqlstate(report.sql_error_code())) =>
                {
                    let mut message = report.message().to_string();
                    if let Some(detail) = report.detail() {
                        message = format!("{message} ({detail})");
                    }
                    if errors::is_session_error(&errors::sqlstate(report.sql_error_code())) {
                        message = format!(
                            "{message} [the worker's batch failed {} times in a row on errors like this; the event is set aside so that the inbox goes on]",
                            LAST_TRY_AFTER + 1
                        );
                    }
                    return Applied::Rejected {
                        rejection: Rejection::new(
                            RejectCode::WriteFailed,
                            format!("writing {}: {message}", stream.table.qualified),
                        ),
                        sqlstate: Some(errors::sqlstate(report.sql_error_code())),
                        conflict: false,
                    };
                }
                other => other.rethrow(),
            },
        }
    }
    raise(
        Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
        format!("could not apply an event of stream \"{}\": the entity kept changing concurrently", stream.spec.name),
        Some("Retry the transaction."),
    )
}

/// Whether entities of a row-version stream (`Stream::row_version`) that have no version-state
/// row keep it that way: their version stays in the replica row, and a write never lowers it.
/// Only in READ COMMITTED, where every statement sees what committed before it started — in
/// particular a state row created before this session took its stripe lock (`locks::lock_stripes`).
pub(crate) fn row_mode(stream: &Stream) -> bool {
    // SAFETY: a plain read of the transaction's isolation level.
    stream.row_version.is_some() && crate::pg::subxact::read_committed()
}

/// Whether applying `ev` may create a version-state row for an entity of a row-version stream
/// (its stripe is then locked exclusively): a delete leaves a tombstone; outside row mode every
/// write keeps a state row.
fn creates_state_rows(row_mode: bool, ev: &Event) -> bool {
    !row_mode || matches!(ev.op, Op::Delete)
}

/// Locks the stripes (`locks::lock_stripes`) of the entities these events of a row-version stream
/// write, given as (canonical entity key, event): exclusively where an event may create a state
/// row. Nothing for other streams (the iterator is then not consumed).
pub(crate) fn lock_row_stripes<'e, K: AsRef<str>>(stream: &Stream, events: impl IntoIterator<Item = (K, &'e Event)>) {
    if stream.row_version.is_none() {
        return;
    }
    let row_mode = row_mode(stream);
    let mut stripes = locks::Stripes::new();
    for (key, ev) in events {
        locks::add_stripe(&mut stripes, key.as_ref(), creates_state_rows(row_mode, ev));
    }
    locks::lock_stripes(stream.id, &stripes);
}

/// Converts a cell through its column type.
pub(crate) fn bind<'a>(column: &'a Column, field: &str, value: &Value) -> Result<Bound<'a>, Rejection> {
    bind_value(column, field, value, true)
}

/// An event's `oldState` cells as the fold compares them with the replica row: converted through
/// their columns' types and printed back by each type's output function (aligned with `ev.old`).
/// Only compared, never written, so a NULL need not be a value of a domain that refuses it.
pub(crate) fn old_texts(table: &TableInfo, ev: &Event) -> Result<Vec<Option<String>>, Rejection> {
    ev.old
        .iter()
        .map(|c| {
            let column = &table.columns[c.column];
            Ok(bind_value(column, &c.field, &c.value, false)?.value.map(|d| column.ty.output(d)))
        })
        .collect()
}

fn bind_value<'a>(column: &'a Column, field: &str, value: &Value, written: bool) -> Result<Bound<'a>, Rejection> {
    let misfit = |e: String| {
        Rejection::new(
            RejectCode::InvalidValue,
            format!("field \"{field}\" does not fit column \"{}\" ({}): {e}", column.name, column.ty.name),
        )
    };
    let value = match value {
        Value::Null => {
            if written {
                column.ty.check_null().map_err(misfit)?;
            }
            None
        }
        Value::Text(t) => Some(column.ty.input(t).map_err(misfit)?),
    };
    Ok(Bound { column, value })
}

impl From<Rejection> for Stop {
    fn from(r: Rejection) -> Stop {
        Stop::Reject(r, false)
    }
}

/// Converts key values, returning the bound keys and their canonical texts.
pub(crate) fn bind_keys<'a>(
    columns: &'a [Column],
    fields: &[String],
    values: &[String],
) -> Result<(Vec<Bound<'a>>, Vec<String>), Rejection> {
    let mut bound = Vec::with_capacity(values.len());
    let mut canonical = Vec::with_capacity(values.len());
    for ((column, field), text) in columns.iter().zip(fields).zip(values) {
        let invalid = |e: String| {
            Rejection::new(
                RejectCode::InvalidKey,
                format!("key field \"{field}\" does not fit column \"{}\" ({}): {e}", column.name, column.ty.name),
            )
        };
        let canon = column.ty.canonical(text).map_err(invalid)?;
        bound.push(Bound { column, value: Some(column.ty.input(&canon).map_err(invalid)?) });
        canonical.push(canon);
    }
    Ok((bound, canonical))
}

/// One child row, converted.
pub(crate) struct ChildRowBound<'a> {
    pub(crate) keys: Vec<Bound<'a>>,
    /// The key's canonical texts (what `writer::prune_children` compares).
    pub(crate) canonical: Vec<String>,
    pub(crate) cells: Vec<Bound<'a>>,
}

fn attempt(client: &mut SpiClient, stream: &Stream, ev: &Event, sql_only: bool) -> Result<(Outcome, bool), Stop> {
    let spec = &stream.spec;
    let table = &stream.table;
    let (keys, canonical) = bind_keys(&table.keys, &spec.key_fields, &ev.key)?;
    let entity_key = ecst_core::spec::entity_key(canonical);

    // Convert every value up front: a value that does not fit is a dead letter, stale or not.
    let mut new_cells: BTreeMap<usize, Bound> = BTreeMap::new();
    let mut children: Vec<Vec<ChildRowBound>> = Vec::new();
    if let Op::Upsert { cells, children: sets } = &ev.op {
        for c in cells {
            new_cells.insert(c.column, bind(&table.columns[c.column], &c.field, &c.value)?);
        }
        for set in sets {
            children.push(bind_children(stream, set)?);
        }
    }
    let old = old_texts(table, ev)?;

    if let Some(id) = &ev.event_id {
        let fresh = stream.store.run(client, "INSERT INTO {ids} (stream_id, event_id{+dist}) VALUES ($1, $2{+dist_of:$3}) ON CONFLICT DO NOTHING RETURNING 1",
            &[stream.id.into(), id.as_str().into(), entity_key.as_str().into()],
        );
        if fresh.is_empty() {
            // Recorded before: the fold calls the event a duplicate whatever the entity's state.
            return decided(fold_one(spec, None, None, ev, &[], false)).map(|(fate, _)| fate);
        }
    }

    let row_mode = row_mode(stream);
    lock_row_stripes(stream, [(entity_key.as_str(), ev)]);
    let mut stored = false;
    // Row mode, optimistically: an upsert without oldState of an entity without a state row is
    // written as if its row were older (the guarded write tells); the row is read only if not.
    let mut optimistic = false;
    let state = if spec.is_versioned() {
        // In row mode most entities have no state row: the executor answers that without SQL.
        let no_state_row = row_mode
            && stream.store == Store::Shared
            && direct::state_row_exists(stream.id, &entity_key) == Some(false);
        match if no_state_row { None } else { load_state(client, stream, &entity_key)? } {
            Some(state) => {
                stored = true;
                Some(state)
            }
            None if row_mode && ev.old.is_empty() && matches!(ev.op, Op::Upsert { .. }) => {
                optimistic = true;
                None
            }
            None => row_state(client, stream, &keys),
        }
    } else {
        locks::lock_entities(client, stream.id, vec![entity_key.clone()]);
        None
    };
    // The replica row, for the oldState check.
    let row = if ev.old.is_empty() { None } else { writer::row_texts(client, table, &keys) };
    let ((outcome, conflict), plan) = decided(fold_one(spec, state.clone(), row, ev, &old, true))?;

    // An entity without a state row in row mode keeps its version in the replica row alone,
    // written only if that does not lower the row's version.
    let guard = match (&plan.state, stream.row_version) {
        (Some(next), Some(column)) if row_mode && !stored && next.tomb.is_none() => Some(&table.columns[column]),
        _ => None,
    };
    // Lock order, the same on every path: the entity's state row first, then replica rows.
    if let (Some(next), None) = (&plan.state, guard) {
        save_state(client, stream, &entity_key, stored.then_some(state.as_ref()).flatten(), next)?;
    }
    let write = plan.write;
    if write.delete {
        for child in &stream.children {
            let parent: Vec<Bound> =
                child.parent.iter().zip(&keys).map(|(column, k)| Bound { column, value: k.value }).collect();
            writer::delete(client, &child.table.qualified, &parent);
        }
        writer::delete(client, &table.qualified, &keys);
    }
    if !write.clear.is_empty() {
        let cols: Vec<&Column> = write.clear.iter().map(|&i| &table.columns[i]).collect();
        writer::clear(client, table, &keys, &cols);
    }
    if let Some(cells) = write.upsert {
        let set: Vec<Bound> = cells.keys().map(|c| new_cells[c]).collect();
        // A guarded write goes through the executor's row API where it can (`direct`), else
        // through SQL.
        let row_writer = guard.filter(|_| !sql_only).and_then(|_| direct::RowWriter::open(table));
        let direct = match (guard, row_writer) {
            (Some(version), Some(mut row_writer)) => {
                let update = row_writer.write_if_newer(&keys, &set, version);
                row_writer.close();
                update
            }
            _ => direct::Update::NeedsSql,
        };
        let not_newer = match direct {
            direct::Update::Written { .. } => None,
            direct::Update::NotNewer(version) => Some(Some(state_from_text(Some(version), None, None))),
            direct::Update::NeedsSql => {
                let mut row = keys.clone();
                row.extend(set.iter().copied());
                let conflict_cols: Vec<String> = table.keys.iter().map(|k| k.quoted.clone()).collect();
                let update: Vec<&str> = cells.keys().map(|&c| table.columns[c].quoted.as_str()).collect();
                if writer::upsert(client, &table.qualified, &row, &conflict_cols, &update, guard) {
                    None
                } else if optimistic {
                    Some(row_state(client, stream, &keys))
                } else {
                    Some(None)
                }
            }
        };
        if let Some(row) = not_newer {
            if !optimistic {
                // A concurrent session wrote a newer version since the row was read.
                return Err(Stop::Retry);
            }
            // The row was not older: the event is stale or a duplicate.
            return match fold_one(spec, row, None, ev, &[], true) {
                Folded::Plan(Plan { fates, write, .. }) if write.is_nothing() => match &fates[0] {
                    Fate::Done { outcome, .. } => Ok((*outcome, false)),
                    Fate::DeadLetter(_) => Err(Stop::Retry),
                },
                _ => Err(Stop::Retry),
            };
        }
    }
    if write.children.is_some() {
        if let Op::Upsert { children: sets, .. } = &ev.op {
            for (set, rows) in sets.iter().zip(&children) {
                write_children(client, stream, set.child, &keys, rows);
            }
        }
    }
    Ok((outcome, conflict))
}

/// The fold of a run of one event (`old`: its oldState cells as compared texts; `fresh_id`: its
/// event id, if it has one, was not recorded before).
fn fold_one(
    spec: &StreamSpec,
    state: Option<EntityState>,
    row: Option<Vec<Option<String>>>,
    ev: &Event,
    old: &[Option<String>],
    fresh_id: bool,
) -> Folded {
    let mut ids = Ids::new(ev.event_id.clone().filter(|_| fresh_id));
    // One event's own writes are never compared again: what it writes need not be printed.
    fold(spec, state, row, &[ev], |_, k| old[k].clone(), |_, _| None, &mut ids)
}

/// The one event's outcome and the plan, or why the attempt stops.
fn decided(folded: Folded) -> Result<((Outcome, bool), Plan), Stop> {
    match folded {
        Folded::Plan(mut plan) => match plan.fates.pop().expect("one event") {
            Fate::Done { outcome, conflict } => Ok(((outcome, conflict), plan)),
            // Its subtransaction, and with it the event id recorded, is rolled back.
            Fate::DeadLetter(rejection) => Err(Stop::Reject(rejection, true)),
        },
        Folded::Raise(message) => Err(Stop::Raise(message)),
        Folded::OneByOne => unreachable!("a run of one event with its row read is never handed back"),
    }
}

/// Converts one child set's rows; keys that repeat once converted make the event invalid.
pub(crate) fn bind_children<'a>(stream: &'a Stream, set: &ChildSet) -> Result<Vec<ChildRowBound<'a>>, Rejection> {
    let child = &stream.children[set.child];
    let spec = &stream.spec.children[set.child];
    let mut rows = Vec::with_capacity(set.rows.len());
    let mut canonical_set = ChildSet { child: set.child, rows: Vec::new() };
    for r in &set.rows {
        let (keys, canonical) = bind_keys(&child.table.keys, &spec.key_fields, &r.key)?;
        let cells = r
            .cells
            .iter()
            .map(|c| bind(&child.table.columns[c.column], &c.field, &c.value))
            .collect::<Result<_, _>>()?;
        canonical_set.rows.push(ecst_core::event::ChildRow { key: canonical.clone(), cells: Vec::new() });
        rows.push(ChildRowBound { keys, canonical, cells });
    }
    // Keys that differ as JSON may be equal as column values ("7" and 7 in a bigint column).
    check_unique_child_keys(spec, &canonical_set)?;
    Ok(rows)
}

/// Makes a parent's child rows exactly `rows`: deletes the others, upserts these.
fn write_children(
    client: &mut SpiClient,
    stream: &Stream,
    index: usize,
    parent_keys: &[Bound],
    rows: &[ChildRowBound],
) {
    let child = &stream.children[index];
    let parent: Vec<Bound> =
        child.parent.iter().zip(parent_keys).map(|(column, k)| Bound { column, value: k.value }).collect();
    let keep: Vec<Vec<String>> = rows.iter().map(|r| r.canonical.clone()).collect();
    writer::prune_children(client, child, &parent, &keep);
    for r in rows {
        let mut row = parent.clone();
        row.extend(r.keys.iter().copied());
        row.extend(r.cells.iter().copied());
        let update: Vec<&str> =
            row.iter().map(|b| b.column.quoted.as_str()).filter(|c| !child.conflict.iter().any(|k| k == c)).collect();
        writer::upsert(client, &child.table.qualified, &row, &child.conflict, &update, None);
    }
}

/// Reads an entity's version state without locking it: `save_state` only writes it if it is still
/// what was read (compare-and-swap), and a concurrent change makes the attempt retry. No
/// `FOR UPDATE`: a row lock taken in one event's subtransaction and re-taken in the next turns
/// into a growing MultiXact when one transaction applies many events of an entity.
fn load_state(client: &mut SpiClient, stream: &Stream, key: &str) -> Result<Option<EntityState>, Stop> {
    let rows = stream.store.run(
        client,
        "SELECT live_version::text, tomb_version::text, field_versions::text
         FROM {state} WHERE stream_id = $1 AND entity_key = $2",
        &[stream.id.into(), key.into()],
    );
    Ok(rows
        .into_iter()
        .next()
        .map(|row| state_from_text(row.get(1).unwrap(), row.get(2).unwrap(), row.get(3).unwrap())))
}

/// The state of an entity without a version-state row, from its replica row's version column
/// (an entity bulk-loaded into an empty replica; see `Stream::row_version`).
fn row_state(client: &mut SpiClient, stream: &Stream, keys: &[Bound]) -> Option<EntityState> {
    let column = &stream.table.columns[stream.row_version?];
    crate::pg::locks::wait_for_bulk_load(stream.table.oid);
    let matches: Vec<String> =
        keys.iter().enumerate().map(|(i, k)| format!("{} = ${}", k.column.quoted, i + 1)).collect();
    let sql = format!("SELECT {}::text FROM {} WHERE {}", column.quoted, stream.table.qualified, matches.join(" AND "));
    let args: Vec<_> = keys.iter().map(Bound::arg).collect();
    let rows = spi::run(client, &sql, &args);
    let text: Option<String> = rows.into_iter().next()?.get(1).unwrap();
    Some(state_from_text(Some(text?), None, None))
}

/// An entity state from its stored text form (`numeric` versions, `jsonb` field versions).
/// A replica row's version (`Stream::row_version`) comes from a column anyone may write (`NaN`,
/// `Infinity`, more digits than a version may have): such an entity's events cannot be ordered
/// against it and raise a data exception, which dead-letters them — never a panic, which would
/// stop the worker on the same batch over and over.
pub(crate) fn state_from_text(live: Option<String>, tomb: Option<String>, fields: Option<String>) -> EntityState {
    let version = |text: Option<String>| text.map(|t| stored_version(&t));
    let mut state = EntityState { live: version(live), tomb: version(tomb), fields: BTreeMap::new() };
    if let Some(fields) = fields {
        let map: BTreeMap<String, String> = serde_json::from_str(&fields).expect("stored field versions are valid");
        state.fields = map.into_iter().map(|(k, v)| (k, stored_version(&v))).collect();
    }
    state
}

fn stored_version(text: &str) -> Version {
    Version::parse_decimal(text).unwrap_or_else(|e| {
        raise(
            Code::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            format!("the stored version {text:?} of this entity cannot be compared with event versions: {e}"),
            Some("Set the replica row's version column to a number an event could carry, or delete the row."),
        )
    })
}

/// The `field_versions` jsonb text of a state (`None` when it has none).
pub(crate) fn fields_to_text(s: &EntityState) -> Option<String> {
    (!s.fields.is_empty()).then(|| {
        let m: BTreeMap<&String, String> = s.fields.iter().map(|(k, v)| (k, v.to_numeric_string())).collect();
        serde_json::to_string(&m).expect("strings serialise")
    })
}

/// Writes the new state if the stored one is still `read` (else a concurrent session changed the
/// entity meanwhile and the event is retried).
fn save_state(
    client: &mut SpiClient,
    stream: &Stream,
    key: &str,
    read: Option<&EntityState>,
    s: &EntityState,
) -> Result<(), Stop> {
    let text = |v: &Option<Version>| v.as_ref().map(Version::to_numeric_string);
    let Some(old) = read else {
        let inserted = stream.store.run(
            client,
            "INSERT INTO {state} (stream_id, entity_key, live_version, tomb_version, field_versions{+dist})
             VALUES ($1, $2, $3::numeric, $4::numeric, $5::jsonb{+dist_of:$2}) ON CONFLICT DO NOTHING RETURNING 1",
            &[stream.id.into(), key.into(), text(&s.live).into(), text(&s.tomb).into(), fields_to_text(s).into()],
        );
        return if inserted.is_empty() { Err(Stop::Retry) } else { Ok(()) };
    };
    let updated = stream.store.run(
        client,
        "UPDATE {state} SET live_version = $3::numeric, tomb_version = $4::numeric,
                field_versions = $5::jsonb
         WHERE stream_id = $1 AND entity_key = $2
           AND live_version IS NOT DISTINCT FROM $6::numeric AND tomb_version IS NOT DISTINCT FROM $7::numeric
           AND field_versions IS NOT DISTINCT FROM $8::jsonb
         RETURNING 1",
        &[
            stream.id.into(),
            key.into(),
            text(&s.live).into(),
            text(&s.tomb).into(),
            fields_to_text(s).into(),
            text(&old.live).into(),
            text(&old.tomb).into(),
            fields_to_text(old).into(),
        ],
    );
    if updated.is_empty() {
        Err(Stop::Retry)
    } else {
        Ok(())
    }
}

/// The canonical entity key of an event with this key (`Event::key`: what version state is kept
/// under), if the key fits the key columns' types.
/// An event's entity as the engine knows it (its key fields' canonical texts), without binding
/// values: for grouping events of one entity before they reach the engine. `None` if a key does
/// not fit its column (the engine then rejects the event).
pub fn canonical_entity(stream: &Stream, key: &[String]) -> Option<String> {
    let canonical = stream
        .table
        .keys
        .iter()
        .zip(key)
        .map(|(column, text)| column.ty.canonical(text).ok())
        .collect::<Option<Vec<String>>>()?;
    Some(ecst_core::spec::entity_key(canonical))
}

pub fn entity_key(stream: &Stream, key: &[String]) -> Option<String> {
    let (_, canonical) = bind_keys(&stream.table.keys, &stream.spec.key_fields, key).ok()?;
    Some(ecst_core::spec::entity_key(canonical))
}

/// The canonical order key of an event for batch application: events of one entity keep
/// their relative order, and entities are visited in key order, so concurrent batches take
/// entity locks in the same order (no deadlocks between them).
pub fn batch_order(ev: &Result<Event, Rejection>) -> Option<&[String]> {
    ev.as_ref().ok().map(|e| e.key.as_slice())
}
