//! Set-based application of a run of events of one stream: the whole run is decided in memory
//! (the core's `decide` folded per entity, in order) and written with a handful of statements
//! over typed arrays — one `SELECT ... FOR UPDATE` of the version states, one `DELETE`, one
//! `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE` per written column set, one state
//! upsert; for aggregates, per child table one `DELETE` of the children of deleted aggregates,
//! one of the children missing from the final snapshots, and one upsert of the final children —
//! instead of several statements and a subtransaction per event.
//!
//! The run is one subtransaction. If anything in it fails (a constraint, a trigger, a concurrent
//! creator of the same entity, two aggregates of the run claiming the same child row), it is
//! rolled back and the run is applied event by event instead, which isolates the bad event exactly
//! as before. Composite entity keys always take the per-event path.

use crate::engine::apply;
use crate::engine::apply::ChildRowBound;
use crate::engine::direct;
use crate::engine::outcome::{Applied, ErrorPolicy};
use crate::engine::writer::{self, Bound};
use crate::pg::errors::{self, raise};
use crate::pg::locks;
use crate::pg::spi;
use crate::pg::store::Store;
use crate::pg::subxact::{self, SubResult};
use crate::stream::catalog::{ChildInfo, Column, Stream, TableInfo};
use ecst_core::event::{Event, Op};
use ecst_core::fold::{fold, Fate, Folded, Ids};
use ecst_core::merge::EntityState;
use ecst_core::reject::Rejection;
use ecst_core::version::Version;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::spi::SpiClient;
use pgrx::PgSqlErrorCode as Code;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Whether a stream can be applied set-based: a single-column key, and array types for every
/// column written (child tables' too).
pub fn eligible(stream: &Stream) -> bool {
    let arrays = |columns: &[Column]| columns.iter().all(|c| c.ty.array_oid().is_some());
    let table = |t: &TableInfo| arrays(&t.keys) && arrays(&t.columns);
    stream.table.keys.len() == 1
        && table(&stream.table)
        && stream.children.iter().all(|c| c.parent.len() == 1 && table(&c.table) && arrays(&c.parent))
}

/// Applies `events` (in order) and returns one result per event (see [`crate::engine::apply`]).
pub(super) fn apply_run(
    client: &mut SpiClient,
    stream: &Stream,
    events: &[Result<Event, Rejection>],
    policy: ErrorPolicy,
) -> Vec<Applied> {
    // A run that lost the race to create an entity is retried set-based (the winner has committed
    // by then): falling back to one event at a time would take locks in another order.
    for _ in 0..RACE_RETRIES {
        if !eligible(stream) || events.len() <= 1 {
            break;
        }
        match subxact::run(|| run_set_based(client, stream, events, policy)) {
            SubResult::Committed(results) => return results,
            // The worker decides such events one at a time, where they become dead letters.
            SubResult::RolledBack(Fallback::Raise(_)) if policy == ErrorPolicy::Worker => break,
            SubResult::RolledBack(Fallback::Raise(message)) => raise(
                Code::ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION,
                message,
                Some("The stream's on_conflict is 'error'. Re-sync the entity, or use on_conflict 'apply', 'skip' or 'dead_letter'."),
            ),
            SubResult::RolledBack(Fallback::Race) => {
                pgrx::debug1!("pg_ecst: stream \"{}\": a concurrent session created an entity; retrying", stream.spec.name);
                continue;
            }
            SubResult::Failed(caught) => match *caught {
                CaughtError::PostgresError(ref r)
                    if errors::is_session_error(&errors::sqlstate(r.sql_error_code()))
                        && !policy.dead_letters(&errors::sqlstate(r.sql_error_code())) =>
                {
                    caught.rethrow()
                }
                CaughtError::PostgresError(ref r) => {
                    // A data error somewhere in the run: find it event by event.
                    pgrx::debug1!(
                        "pg_ecst: stream \"{}\": set-based apply of {} events failed ({}); applying them one by one",
                        stream.spec.name,
                        events.len(),
                        r.message()
                    );
                }
                _ => {}
            },
        }
        break;
    }
    one_by_one(client, stream, events, policy)
}

/// Applies events one at a time, visiting entities in key order (each entity's events in their
/// order), so that concurrent sessions lock entities in the same order.
fn one_by_one(
    client: &mut SpiClient,
    stream: &Stream,
    events: &[Result<Event, Rejection>],
    policy: ErrorPolicy,
) -> Vec<Applied> {
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| apply::batch_order(&events[a]).cmp(&apply::batch_order(&events[b])));
    // The stripes every event will take, all at once in stripe order (not entity by entity in key
    // order, which could deadlock with another session doing the same). One event takes its own.
    if events.len() > 1 {
        apply::lock_row_stripes(
            stream,
            events.iter().flatten().filter_map(|ev| Some((apply::entity_key(stream, &ev.key)?, ev))),
        );
    }
    let mut results: Vec<Option<Applied>> = vec![None; events.len()];
    for i in order {
        results[i] = Some(match &events[i] {
            Ok(ev) => apply::apply_event(client, stream, ev, policy),
            Err(r) => Applied::rejected(r.clone()),
        });
    }
    results.into_iter().map(|r| r.expect("every event applied")).collect()
}

/// A key and the values of the written columns, for one row of an upsert.
type RowValues = (pg_sys::Datum, Vec<Option<pg_sys::Datum>>);

/// The rows of one upsert statement: the entities' canonical keys and, aligned, their values.
type UpsertGroup<'a> = (Vec<&'a String>, Vec<RowValues>);

/// Rows in column form: the values of each column, one row per position.
type ColumnValues = Vec<Vec<Option<pg_sys::Datum>>>;

/// Set-based retries of a run that lost a race to create an entity.
const RACE_RETRIES: usize = 20;

/// Why the set-based attempt gave up (its subtransaction is rolled back).
enum Fallback {
    /// A concurrent session created one of the run's entities first: retry.
    Race,
    /// `on_conflict => 'error'`.
    Raise(String),
}

/// One event with its values converted.
struct Item<'e> {
    index: usize,
    ev: &'e Event,
    key: pg_sys::Datum,
    /// New cells by column index (NULL where the event has none; only its own cells are read).
    cells: Vec<Option<pg_sys::Datum>>,
    /// `oldState` cells as the conflict check compares them (`apply::old_texts`).
    old: Vec<Option<String>>,
    /// An aggregate's child sets, converted: (child index, rows).
    children: Vec<(usize, Vec<ChildRowBound<'e>>)>,
}

/// The replica row of one entity after the run, as set-based writes.
#[derive(Default)]
struct Final<'a> {
    /// Delete the existing row first (a delete, possibly followed by a re-create).
    delete: bool,
    /// Then reset these columns of the row, if it exists, to their DEFAULT.
    clear: BTreeSet<usize>,
    /// Then upsert these cells (`None`: no upsert).
    upsert: Option<BTreeMap<usize, Option<pg_sys::Datum>>>,
    /// The entity has no state row and keeps none (row mode): the upsert must not lower the
    /// row's version.
    guarded: bool,
    /// An aggregate's child sets after the run (those of its last snapshot written): each child
    /// table's rows of this aggregate become exactly these.
    children: Option<&'a [(usize, Vec<ChildRowBound<'a>>)]>,
}

fn run_set_based(
    client: &mut SpiClient,
    stream: &Stream,
    events: &[Result<Event, Rejection>],
    policy: ErrorPolicy,
) -> Result<Vec<Applied>, Fallback> {
    let spec = &stream.spec;
    let table = &stream.table;
    let key_col = &table.keys[0];
    let mut results: Vec<Option<Applied>> = vec![None; events.len()];

    // 1. Convert keys and values; group by entity (sorted: locks are taken in key order).
    let mut entities: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    for (index, e) in events.iter().enumerate() {
        let ev = match e {
            Ok(ev) => ev,
            Err(r) => {
                results[index] = Some(Applied::rejected(r.clone()));
                continue;
            }
        };
        match convert(stream, index, ev) {
            Ok((key, item)) => entities.entry(key).or_default().push(item),
            Err(r) => results[index] = Some(Applied::rejected(r)),
        }
    }

    // 2. Event ids: the first occurrence of a new id goes on; the rest are duplicates.
    let mut fresh_ids: HashSet<String> = HashSet::new();
    if spec.event_id.is_some() {
        let mut ids: Vec<String> = Vec::new();
        // Each id's entity: a sharded store keeps it in the entity's shard.
        let mut owners: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for (key, items) in &entities {
            for it in items {
                if let Some(id) = &it.ev.event_id {
                    if seen.insert(id.clone()) {
                        ids.push(id.clone());
                        owners.push(key.clone());
                    }
                }
            }
        }
        if !ids.is_empty() {
            let rows = stream.store.run(
                client,
                "INSERT INTO {ids} (stream_id, event_id{+dist})
                 SELECT $1, u.i{+dist_of:u.k} FROM unnest($2::text[], $3::text[]) AS u (i, k)
                 ON CONFLICT DO NOTHING RETURNING event_id",
                &[stream.id.into(), ids.into(), owners.into()],
            );
            fresh_ids = rows.map(|r| r.get::<String>(1).unwrap().unwrap()).collect();
        }
    }

    // 3. Version states, locked.
    let keys: Vec<String> = entities.keys().cloned().collect();
    let row_mode = apply::row_mode(stream);
    apply::lock_row_stripes(stream, entities.iter().flat_map(|(key, items)| items.iter().map(move |it| (key, it.ev))));
    let mut states: HashMap<String, EntityState> = HashMap::new();
    if !spec.is_versioned() && !keys.is_empty() {
        locks::lock_entities(client, stream.id, keys.clone());
    }
    let versioned_run = spec.is_versioned() && !keys.is_empty();
    // Where the row API reads and writes the state rows, each locked row's place, for its update.
    let mut state_rows = (versioned_run && stream.store == Store::Shared).then(direct::StateRows::open).flatten();
    let mut state_ids: HashMap<&String, direct::StateRowId> = HashMap::new();
    if let Some(rows) = state_rows.as_mut() {
        // In key order, as the SQL below locks them.
        for key in entities.keys() {
            if let Some((id, (live, tomb, fields))) = rows.lock(stream.id, key) {
                state_ids.insert(key, id);
                states.insert(key.clone(), apply::state_from_text(live, tomb, fields));
            }
        }
    } else if versioned_run {
        let rows = stream.store.run_once(
            client,
            "SELECT entity_key, live_version::text, tomb_version::text, field_versions::text
             FROM {state} WHERE stream_id = $1 AND entity_key = ANY ($2::text[])
             ORDER BY entity_key COLLATE \"C\" FOR UPDATE",
            &[stream.id.into(), keys.clone().into()],
        );
        for r in rows {
            let key: String = r.get(1).unwrap().unwrap();
            let state = apply::state_from_text(r.get(2).unwrap(), r.get(3).unwrap(), r.get(4).unwrap());
            states.insert(key, state);
        }
    }
    // Entities with a stored state row (updated in place); the others get one inserted.
    let stored: HashSet<String> = states.keys().cloned().collect();
    // Row mode, optimistically: an entity without a state row whose events are all upserts
    // without oldState or event id is written as if its row were older than its newest event, by
    // the guarded write, and its events' outcomes are decided afterwards from the version that
    // write replaced (the row API returns it) or, if the row was not older, from the row's
    // version. That spares reading the rows of most entities first. Through SQL, which does not
    // return the version it replaced, only entities with a single event are written this way.
    let direct_rows = row_mode && direct::RowWriter::available(table);
    let optimistic: HashSet<&String> = if row_mode {
        entities
            .iter()
            .filter(|(k, items)| {
                !stored.contains(*k)
                    && (direct_rows || items.len() == 1)
                    && items.iter().all(|it| {
                        it.old.is_empty() && it.ev.event_id.is_none() && matches!(it.ev.op, Op::Upsert { .. })
                    })
            })
            .map(|(k, _)| k)
            .collect()
    } else {
        HashSet::new()
    };
    // Optimistic entities with several events: their outcomes depend on the version replaced.
    let refolded = |name: &String| optimistic.contains(name) && entities[name].len() > 1;
    if let Some(version_column) = stream.row_version {
        // Entities without a state row may have been bulk-loaded: their version is in the row.
        let missing: Vec<Option<pg_sys::Datum>> = entities
            .iter()
            .filter(|(k, _)| !stored.contains(*k) && !optimistic.contains(k))
            .map(|(_, items)| Some(items[0].key))
            .collect();
        if !missing.is_empty() {
            crate::pg::locks::wait_for_bulk_load(stream.table.oid);
            for (key, version) in row_versions(client, stream, version_column, &missing) {
                states.insert(key, apply::state_from_text(Some(version), None, None));
            }
        }
    }

    // 4. Current rows of the entities whose events carry oldState (for the conflict check).
    let needs_row: Vec<&String> =
        entities.iter().filter(|(_, items)| items.iter().any(|it| !it.old.is_empty())).map(|(k, _)| k).collect();
    let mut rows: HashMap<String, Vec<Option<String>>> = HashMap::new();
    if !needs_row.is_empty() {
        let datums: Vec<Option<pg_sys::Datum>> = needs_row.iter().map(|k| Some(entities[*k][0].key)).collect();
        // Printed as `mismatches` compares them: by each type's output function.
        let cols: Vec<String> = table.columns.iter().map(|c| spi::output_text(&c.quoted)).collect();
        let sql = format!(
            "SELECT {}{}{} FROM {} WHERE {} = ANY ($1)",
            spi::output_text(&key_col.quoted),
            if cols.is_empty() { "" } else { ", " },
            cols.join(", "),
            table.qualified,
            key_col.quoted
        );
        for r in spi::run_once(client, &sql, &[key_col.ty.array(&datums)]) {
            let key: String = r.get(1).unwrap().unwrap();
            let values = (0..table.columns.len()).map(|i| r.get::<String>(i + 2).unwrap()).collect();
            rows.insert(key, values);
        }
    }

    // 5. Decide, entity by entity (the core's fold of its events); compose each entity's write.
    let mut finals: Vec<(&String, pg_sys::Datum, Final)> = Vec::new();
    let mut new_states: Vec<(String, EntityState, bool)> = Vec::new();
    let mut one_by_one_entities: Vec<&String> = Vec::new();
    let mut ids = Ids::new(fresh_ids);
    for (key, items) in &entities {
        let existed = stored.contains(key);
        let evs: Vec<&Event> = items.iter().map(|it| it.ev).collect();
        let folded = fold(
            spec,
            states.remove(key),
            rows.remove(key),
            &evs,
            |i, k| items[i].old[k].clone(),
            |i, column| items[i].cells[column].map(|d| table.columns[column].ty.output(d)),
            &mut ids,
        );
        let plan = match folded {
            Folded::Plan(plan) => plan,
            Folded::OneByOne => {
                one_by_one_entities.push(key);
                continue;
            }
            Folded::Raise(message) => return Err(Fallback::Raise(message)),
        };
        for (it, fate) in items.iter().zip(plan.fates) {
            results[it.index] = Some(applied(fate));
        }
        // Row mode: an entity without a state row and without a tombstone to remember keeps its
        // version in the replica row only.
        let guarded = row_mode && !existed && plan.state.as_ref().is_some_and(|s| s.tomb.is_none());
        if let (Some(state), false) = (plan.state, guarded) {
            new_states.push((key.clone(), state, existed));
        }
        let write = plan.write;
        if !write.is_nothing() {
            let upsert = write.upsert.map(|cells| cells.into_iter().map(|(c, i)| (c, items[i].cells[c])).collect());
            let children = write.children.map(|i| items[i].children.as_slice());
            let fin = Final { delete: write.delete, clear: write.clear, upsert, guarded, children };
            finals.push((key, items[0].key, fin));
        }
    }
    // 6. Write, in the lock order every path follows: version states first (existing ones are
    //    locked already; new ones are inserted in key order), then replica rows in key order.
    save_states(client, stream, &new_states, state_rows.take().map(|rows| (rows, &state_ids)))?;
    let deletes: Vec<Option<pg_sys::Datum>> =
        finals.iter().filter(|(_, _, f)| f.delete).map(|(_, k, _)| Some(*k)).collect();
    if !deletes.is_empty() {
        // An aggregate's children go first, as on the per-event path.
        for child in &stream.children {
            let parent = &child.parent[0];
            let sql = format!("DELETE FROM {} WHERE {} = ANY ($1)", child.table.qualified, parent.quoted);
            spi::run_once(client, &sql, &[parent.ty.array(&deletes)]);
        }
        let sql = format!("DELETE FROM {} WHERE {} = ANY ($1)", table.qualified, key_col.quoted);
        spi::run_once(client, &sql, &[key_col.ty.array(&deletes)]);
    }
    // Resets to DEFAULT (a delta's delete that newer fields survive), one statement per column set.
    let mut clears: BTreeMap<&BTreeSet<usize>, Vec<Option<pg_sys::Datum>>> = BTreeMap::new();
    for (_, key, fin) in finals.iter().filter(|(_, _, f)| !f.clear.is_empty()) {
        clears.entry(&fin.clear).or_default().push(Some(*key));
    }
    for (columns, keys) in clears {
        let sets: Vec<String> = columns.iter().map(|&c| format!("{} = DEFAULT", table.columns[c].quoted)).collect();
        let sql = format!("UPDATE {} SET {} WHERE {} = ANY ($1)", table.qualified, sets.join(", "), key_col.quoted);
        spi::run_once(client, &sql, &[key_col.ty.array(&keys)]);
    }
    let mut groups: BTreeMap<(Vec<usize>, bool), UpsertGroup> = BTreeMap::new();
    for (name, key, fin) in &finals {
        if let Some(cells) = &fin.upsert {
            let (names, rows) = groups.entry((cells.keys().copied().collect(), fin.guarded)).or_default();
            names.push(name);
            rows.push((*key, cells.values().copied().collect()));
        }
    }
    // Rows go through the executor's row API where it can write the table (`direct`), guarded by
    // the row's version where the entity keeps it there; SQL writes the rest.
    let mut row_writer = (!groups.is_empty()).then(|| direct::RowWriter::open(table)).flatten();
    // Guarded rows not written, with their row's version where the row API saw it.
    let mut unwritten: Vec<(&String, Option<String>)> = Vec::new();
    // Refolded entities written over an older version (that version).
    let mut replaced: Vec<(&String, String)> = Vec::new();
    for ((columns, guarded), (names, rows)) in groups {
        let guard = stream.row_version.filter(|_| guarded).map(|i| &table.columns[i]);
        let (names, rows) = match row_writer.as_mut() {
            Some(writer) => {
                let mut sql: UpsertGroup = Default::default();
                for (name, (key, values)) in names.into_iter().zip(rows) {
                    let keys = [Bound { column: key_col, value: Some(key) }];
                    let set: Vec<Bound> = columns
                        .iter()
                        .zip(&values)
                        .map(|(&i, &value)| Bound { column: &table.columns[i], value })
                        .collect();
                    let update = match guard {
                        Some(version) => writer.write_if_newer(&keys, &set, version),
                        None => writer.upsert(&keys, &set),
                    };
                    match update {
                        direct::Update::Written { previous: Some(previous) } if refolded(name) => {
                            replaced.push((name, previous))
                        }
                        direct::Update::Written { .. } => {}
                        direct::Update::NotNewer(row_version) => unwritten.push((name, Some(row_version))),
                        direct::Update::NeedsSql => {
                            sql.0.push(name);
                            sql.1.push((key, values));
                        }
                    }
                }
                sql
            }
            None => (names, rows),
        };
        // Refolded entities whose row the row API could not insert: SQL inserts them if still
        // absent (their events were decided as the entity's first); if a concurrent session
        // created the row meanwhile, the run starts over.
        let (inserts, upserts): (Vec<_>, Vec<_>) = names.into_iter().zip(rows).partition(|(name, _)| refolded(name));
        for (rows, insert_only) in [(upserts, false), (inserts, true)] {
            if rows.is_empty() {
                continue;
            }
            let (names, rows): UpsertGroup = rows.into_iter().unzip();
            if let Some(written) = upsert_many(client, stream, &columns, &rows, guard, insert_only) {
                if insert_only && written.len() < names.len() {
                    return Err(Fallback::Race);
                }
                unwritten.extend(names.into_iter().filter(|name| !written.contains(*name)).map(|name| (name, None)));
            }
        }
    }
    if let Some(writer) = row_writer {
        writer.close();
    }
    for (index, child) in stream.children.iter().enumerate() {
        write_children(client, index, child, &finals);
    }
    if unwritten.iter().any(|(name, _)| !optimistic.contains(name)) {
        // A concurrent session wrote a newer version since the row was read.
        return Err(Fallback::Race);
    }
    // Refolded entities written over an older version: their events' outcomes from that version
    // (the newest event, written, applies; older ones may be stale or duplicates).
    for (key, previous) in replaced {
        refold(spec, &entities[key], previous, true, &mut results)?;
    }
    // Optimistic entities whose row was not older: their events are stale or duplicates.
    if let (Some(version_column), false) = (stream.row_version, unwritten.is_empty()) {
        let unread: Vec<Option<pg_sys::Datum>> =
            unwritten.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| Some(entities[*k][0].key)).collect();
        let mut versions =
            if unread.is_empty() { HashMap::new() } else { row_versions(client, stream, version_column, &unread) };
        for (key, seen) in unwritten {
            let Some(version) = seen.or_else(|| versions.remove(key)) else { return Err(Fallback::Race) };
            refold(spec, &entities[key], version, false, &mut results)?;
        }
    }
    // Ids taken by events not applied here (dead letters; entities gone one by one), unless an
    // event of the run went on with them.
    let unapplied_ids = ids.unrecorded();
    if !unapplied_ids.is_empty() {
        stream.store.run_once(
            client,
            "DELETE FROM {ids} WHERE stream_id = $1 AND event_id = ANY ($2::text[])",
            &[stream.id.into(), unapplied_ids.into()],
        );
    }

    // 7. Entities that need the per-event path, in order.
    for key in one_by_one_entities {
        for it in &entities[key] {
            results[it.index] = Some(apply::apply_event(client, stream, it.ev, policy));
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every event decided")).collect())
}

/// Decides an optimistic entity's events again, in order, from the version its row had (`version`,
/// as text): `wrote` tells whether the guarded write found that row older than the newest event.
/// Sets their results. If the decisions do not agree with the write (the row changed again
/// meanwhile, or was deleted by hand), the run starts over.
fn refold(
    spec: &ecst_core::spec::StreamSpec,
    items: &[Item],
    version: String,
    wrote: bool,
    results: &mut [Option<Applied>],
) -> Result<(), Fallback> {
    let state = apply::state_from_text(Some(version), None, None);
    let evs: Vec<&Event> = items.iter().map(|it| it.ev).collect();
    // Optimistic entities' events carry no oldState and no event id: nothing to compare or record.
    let none = |_: usize, _: usize| -> Option<String> { None };
    let Folded::Plan(plan) = fold(spec, Some(state), None, &evs, none, none, &mut Ids::default()) else {
        return Err(Fallback::Race);
    };
    if plan.write.is_nothing() == wrote || plan.fates.iter().any(|f| !matches!(f, Fate::Done { conflict: false, .. })) {
        return Err(Fallback::Race);
    }
    for (it, fate) in items.iter().zip(plan.fates) {
        results[it.index] = Some(applied(fate));
    }
    Ok(())
}

/// An event's result from its fate in the fold.
fn applied(fate: Fate) -> Applied {
    match fate {
        Fate::Done { outcome, conflict } => Applied::Done { outcome, conflict },
        Fate::DeadLetter(rejection) => Applied::Rejected { rejection, sqlstate: None, conflict: true },
    }
}

/// The versions in the replica rows of these keys, by canonical key text (rows whose version
/// column is NULL, and absent rows, are left out).
fn row_versions(
    client: &mut SpiClient,
    stream: &Stream,
    version_column: usize,
    keys: &[Option<pg_sys::Datum>],
) -> HashMap<String, String> {
    let table = &stream.table;
    let (key_col, version) = (&table.keys[0], &table.columns[version_column].quoted);
    let sql = format!(
        "SELECT {3}, {1}::text FROM {2} WHERE {0} = ANY ($1) AND {1} IS NOT NULL",
        key_col.quoted,
        version,
        table.qualified,
        spi::output_text(&key_col.quoted)
    );
    spi::run_once(client, &sql, &[key_col.ty.array(keys)])
        .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap()))
        .collect()
}

/// Converts one event's key and values. Returns its canonical entity key.
fn convert<'e>(stream: &'e Stream, index: usize, ev: &'e Event) -> Result<(String, Item<'e>), Rejection> {
    let table = &stream.table;
    let (keys, mut canonical) = apply::bind_keys(&table.keys, &stream.spec.key_fields, &ev.key)?;
    let key = keys[0].value.expect("keys are not null");
    let mut cells = vec![None; table.columns.len()];
    if let Op::Upsert { cells: new, .. } = &ev.op {
        for c in new {
            cells[c.column] = apply::bind(&table.columns[c.column], &c.field, &c.value)?.value;
        }
    }
    let mut children = Vec::new();
    if let Op::Upsert { children: sets, .. } = &ev.op {
        for set in sets {
            children.push((set.child, apply::bind_children(stream, set)?));
        }
    }
    let old = apply::old_texts(table, ev)?;
    Ok((canonical.pop().expect("one key"), Item { index, ev, key, cells, old, children }))
}

/// Makes the rows of child table `index` of every aggregate written in the run exactly its final
/// set: deletes the rows missing from the set (compared by canonical key text, as
/// `writer::prune_children`), then upserts the set's rows — one statement each for the whole run.
/// The children of aggregates deleted in the run are gone already.
fn write_children(client: &mut SpiClient, index: usize, child: &ChildInfo, finals: &[(&String, pg_sys::Datum, Final)]) {
    let parent_col = &child.parent[0];
    let key_cols = &child.table.keys;
    // Aggregates whose existing children are pruned, and the (parent, key) pairs to keep.
    let mut pruned: Vec<Option<pg_sys::Datum>> = Vec::new();
    let mut keep_parents: Vec<Option<pg_sys::Datum>> = Vec::new();
    let mut keep_keys: Vec<Vec<String>> = vec![Vec::new(); key_cols.len()];
    // Rows to upsert by written column set: the columns, and each column's values.
    let mut groups: BTreeMap<Vec<&str>, (Vec<&Column>, ColumnValues)> = BTreeMap::new();
    for (_, parent, fin) in finals {
        let Some(sets) = fin.children else { continue };
        if !fin.delete {
            pruned.push(Some(*parent));
        }
        for (_, rows) in sets.iter().filter(|(c, _)| *c == index) {
            for r in rows {
                keep_parents.push(Some(*parent));
                for (keys, text) in keep_keys.iter_mut().zip(&r.canonical) {
                    keys.push(text.clone());
                }
                let bound = r.keys.iter().chain(&r.cells);
                let columns: Vec<&Column> =
                    std::iter::once(parent_col).chain(bound.clone().map(|b| b.column)).collect();
                let names: Vec<&str> = columns.iter().map(|c| c.quoted.as_str()).collect();
                let n = columns.len();
                let (_, values) = groups.entry(names).or_insert_with(|| (columns, vec![Vec::new(); n]));
                for (column, value) in
                    values.iter_mut().zip(std::iter::once(Some(*parent)).chain(bound.map(|b| b.value)))
                {
                    column.push(value);
                }
            }
        }
    }
    if !pruned.is_empty() {
        let aliases: Vec<String> = (0..key_cols.len()).map(|i| format!("k{i}")).collect();
        let arrays: Vec<String> = (0..key_cols.len()).map(|i| format!("${}::text[]", i + 3)).collect();
        let matches: Vec<String> = key_cols
            .iter()
            .zip(&aliases)
            .map(|(c, k)| format!(" AND {} = k.{k}", spi::output_text(&format!("c.{}", c.quoted))))
            .collect();
        let sql = format!(
            "DELETE FROM {} AS c WHERE c.{p} = ANY ($1) AND NOT EXISTS
             (SELECT 1 FROM {} AS k (p, {}) WHERE k.p = c.{p}{})",
            child.table.qualified,
            spi::zipped(&std::iter::once("$2".to_string()).chain(arrays).collect::<Vec<_>>()),
            aliases.join(", "),
            matches.concat(),
            p = parent_col.quoted,
        );
        let mut args = vec![parent_col.ty.array(&pruned), parent_col.ty.array(&keep_parents)];
        args.extend(keep_keys.into_iter().map(Into::into));
        spi::run_once(client, &sql, &args);
    }
    for (columns, values) in groups.into_values() {
        let update: Vec<&str> =
            columns.iter().map(|c| c.quoted.as_str()).filter(|c| !child.conflict.iter().any(|k| k == c)).collect();
        let action = writer::conflict_action(&update, None, "1");
        insert_arrays(client, &child.table.qualified, &columns, &values, &child.conflict.join(", "), &action, false);
    }
}

/// `INSERT INTO table AS t (columns) SELECT * FROM unnest($1, ...) ON CONFLICT (conflict) DO
/// action`, with `values[i]` the values of `columns[i]`, one row per position. `returns`: the
/// action ends in `RETURNING` (`writer::conflict_action` with a guard).
fn insert_arrays<'c>(
    client: &mut SpiClient<'c>,
    table: &str,
    columns: &[&Column],
    values: &ColumnValues,
    conflict: &str,
    action: &str,
    returns: bool,
) -> pgrx::spi::SpiTupleTable<'c> {
    let names: Vec<&str> = columns.iter().map(|c| c.quoted.as_str()).collect();
    let params: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
    let insert = format!(
        "INSERT INTO {table} AS t ({}) SELECT * FROM {} ON CONFLICT ({conflict}) DO {action}",
        names.join(", "),
        spi::zipped(&params),
    );
    // Rows returned come through a CTE, so that the statement SPI runs is a SELECT, which counts
    // the rows it returns: Citus counts the rows of an INSERT ... SELECT it routed through the
    // coordinator instead, and SPI refuses the mismatch (XX000 "consistency check on SPI tuple
    // count failed").
    let sql = if returns { format!("WITH w AS ({insert}) SELECT * FROM w") } else { insert };
    let args: Vec<_> = columns.iter().zip(values).map(|(c, v)| c.ty.array(v)).collect();
    spi::run(client, &sql, &args)
}

/// `INSERT ... SELECT * FROM unnest(keys, col1, ...) ON CONFLICT (key) DO UPDATE SET col = EXCLUDED.col`,
/// guarded like `writer::upsert` (`insert_only`: `DO NOTHING`, only absent rows are written). With
/// a guard, returns the keys (as text) of the rows written.
fn upsert_many(
    client: &mut SpiClient,
    stream: &Stream,
    columns: &[usize],
    rows: &[RowValues],
    guard: Option<&Column>,
    insert_only: bool,
) -> Option<HashSet<String>> {
    let table = &stream.table;
    let key_col = &table.keys[0];
    let cols: Vec<&Column> = std::iter::once(key_col).chain(columns.iter().map(|&i| &table.columns[i])).collect();
    let update: Vec<&str> =
        if insert_only { Vec::new() } else { cols[1..].iter().map(|c| c.quoted.as_str()).collect() };
    let action = writer::conflict_action(&update, guard, &spi::output_text(&format!("t.{}", key_col.quoted)));
    let mut values: ColumnValues = vec![rows.iter().map(|(k, _)| Some(*k)).collect()];
    values.extend((0..columns.len()).map(|i| rows.iter().map(|(_, v)| v[i]).collect()));
    let written = insert_arrays(client, &table.qualified, &cols, &values, &key_col.quoted, &action, guard.is_some());
    guard.map(|_| written.map(|r| r.get::<String>(1).unwrap().unwrap()).collect())
}

/// Writes the new version states: updates for entities that had one, inserts for new ones. A new
/// entity that a concurrent session created meanwhile sends the run down the per-event path.
/// Existing rows go through the row API where it read them (`direct`: the rows it locked, by key).
fn save_states(
    client: &mut SpiClient,
    stream: &Stream,
    states: &[(String, EntityState, bool)],
    direct_rows: Option<(direct::StateRows, &HashMap<&String, direct::StateRowId>)>,
) -> Result<(), Fallback> {
    let text = |v: &Option<Version>| v.as_ref().map(Version::to_numeric_string);
    let sql_updates = direct_rows.is_none();
    if let Some((mut rows, ids)) = direct_rows {
        for (key, state, _) in states.iter().filter(|s| s.2) {
            let fields = apply::fields_to_text(state);
            let (live, tomb) = (text(&state.live), text(&state.tomb));
            rows.update(ids[key], stream.id, key, live.as_deref(), tomb.as_deref(), fields.as_deref());
        }
        rows.close();
    }
    for existed in [true, false] {
        if existed && !sql_updates {
            continue; // updated through the row API above
        }
        let chosen: Vec<&(String, EntityState, bool)> = states.iter().filter(|s| s.2 == existed).collect();
        if chosen.is_empty() {
            continue;
        }
        let keys: Vec<String> = chosen.iter().map(|s| s.0.clone()).collect();
        let live: Vec<Option<String>> = chosen.iter().map(|s| text(&s.1.live)).collect();
        let tomb: Vec<Option<String>> = chosen.iter().map(|s| text(&s.1.tomb)).collect();
        let fields: Vec<Option<String>> = chosen.iter().map(|s| apply::fields_to_text(&s.1)).collect();
        let args = [stream.id.into(), keys.into(), live.into(), tomb.into(), fields.into()];
        if existed {
            stream.store.run_once(
                client,
                "UPDATE {state} s SET live_version = u.l::numeric, tomb_version = u.t::numeric,
                        field_versions = u.f::jsonb
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS u (k, l, t, f)
                 WHERE s.stream_id = $1 AND s.entity_key = u.k",
                &args,
            );
        } else {
            let inserted = stream.store.run(
                client,
                "INSERT INTO {state} (stream_id, entity_key, live_version, tomb_version, field_versions{+dist})
                 SELECT $1, u.k, u.l::numeric, u.t::numeric, u.f::jsonb{+dist_of:u.k}
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS u (k, l, t, f)
                 ON CONFLICT DO NOTHING RETURNING 1",
                &args,
            );
            if inserted.len() < chosen.len() {
                return Err(Fallback::Race);
            }
        }
    }
    Ok(())
}
