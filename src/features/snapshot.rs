//! Bootstrap and backfill (docs/guides/bootstrap.md): loading a snapshot in bulk, and exporting the replica as
//! create events in the stream's own format.
//!
//! A load reads the source's `payload` column through a cursor and applies it in chunks through
//! the set-based path, so version rules decide per entity exactly as for events: an older
//! snapshot row never overwrites newer state, and events applied meanwhile stay correct.

use crate::engine;
use crate::engine::apply;
use crate::engine::copy_in;
use crate::engine::counters;
use crate::engine::outcome::{Applied, ErrorPolicy};
use crate::engine::record::{self, EventLog};
use crate::pg::errors;
use crate::pg::errors::raise;
use crate::pg::parallel;
use crate::pg::spi;
use crate::pg::subxact::{self, SubResult};
use crate::stream::catalog::{self, Column, Stream, TableInfo};
use crate::stream::security;
use ecst_core::event::{parse_key, Op, Value as CellValue};
use ecst_core::export;
use ecst_core::fold::{fold, Fate, Folded, Ids, RowWrite};
use ecst_core::merge::Outcome;
use ecst_core::reject::Rejection;
use ecst_core::spec::StreamSpec;
use ecst_core::version::Version;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiCursor};
use pgrx::{pg_sys, PgSqlErrorCode as Code};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;

/// Rows applied per chunk of a load.
const CHUNK: i64 = 10_000;
/// A progress NOTICE every this many rows.
const PROGRESS_EVERY: i64 = 100_000;

#[derive(Debug, Default, Clone, Copy)]
pub struct LoadCounts {
    pub loaded: i64,
    pub stale: i64,
    pub deleted: i64,
    pub dead_lettered: i64,
}

/// `ecst.load_snapshot(stream, source, mode, as_of)`.
pub fn load(stream_name: &str, source: pg_sys::Oid, mode: &str, as_of: Option<&str>) -> LoadCounts {
    let stream = catalog::stream(stream_name);
    let stream = stream.styled();
    security::require_apply(&stream);
    security::require_trusted_code(&stream);
    let replace = match mode {
        "merge" => false,
        "replace" => true,
        other => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown mode \"{other}\""),
            Some("mode must be 'merge' or 'replace'."),
        ),
    };
    let as_of = as_of.map(|text| {
        Version::parse_decimal(text).or_else(|_| Version::parse_timestamp(text)).unwrap_or_else(|_| {
            raise(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("as_of {text:?} is neither a number nor an RFC 3339 timestamp"),
                None,
            )
        })
    });
    if replace && stream.spec.is_versioned() && as_of.is_none() {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("mode 'replace' on versioned stream \"{stream_name}\" needs as_of"),
            Some("Pass the version the snapshot was taken at: entities absent from it are deleted only if not newer."),
        );
    }
    if as_of.is_some() && !stream.spec.is_versioned() {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("as_of needs a versioned stream; \"{stream_name}\" has no version path"),
            None,
        );
    }
    let source_name = catalog::payload_source(source);
    if replace {
        // The deletions of absent entities decide on versions read up front: no writer of the
        // stream may move them meanwhile.
        crate::pg::locks::lock_stream(stream.id, true);
    }
    if let Some(counts) = load_into_empty(&stream, &source_name) {
        return counts;
    }
    let mut counts = LoadCounts::default();
    let mut seen: HashSet<String> = HashSet::new();
    let mut unkeyed = 0i64;
    Spi::connect_mut(|client| {
        let mut cursor = open_source(client, &source_name);
        let mut progress = Progress::new(stream_name);
        while let Some(payloads) = next_chunk(&mut cursor, CHUNK) {
            let events: Vec<Result<_, Rejection>> =
                payloads.iter().map(|p| apply::parse_payload(&stream.spec, p.as_deref())).collect();
            if replace {
                // A row that fails (a bad value, a missing version) still names its entity, which
                // therefore is not absent; a row whose entity cannot be told stops the deletions.
                for (payload, event) in payloads.iter().zip(&events) {
                    let key = match event {
                        Ok(ev) => apply::entity_key(&stream, &ev.key),
                        Err(_) => payload
                            .as_deref()
                            .and_then(|p| parse_key(&stream.spec, p).ok())
                            .and_then(|key| apply::entity_key(&stream, &key)),
                    };
                    match key {
                        Some(key) => {
                            seen.insert(key);
                        }
                        None => unkeyed += 1,
                    }
                }
            }
            let texts: Vec<Option<&str>> = payloads.iter().map(|p| p.as_deref()).collect();
            let results = engine::apply(client, &stream, &texts, &events, ErrorPolicy::Caller);
            for result in &results {
                match result {
                    Applied::Done { outcome: Outcome::Applied, .. } => counts.loaded += 1,
                    Applied::Done { .. } => counts.stale += 1,
                    Applied::Rejected { .. } => counts.dead_lettered += 1,
                }
            }
            let events = payloads.iter().map(|p| (p.as_deref(), None));
            record::record_all(client, Some(&stream), Some(stream_name), events, &results, EventLog::Append);
            progress.advance(payloads.len(), &counts);
        }
        if replace && unkeyed > 0 {
            pgrx::warning!(
                "pg_ecst: {unkeyed} snapshot row(s) of stream \"{stream_name}\" name no entity (see ecst.dead_letters): \
                 no entity was deleted as absent; fix them and load again"
            );
        } else if replace {
            counts.deleted = delete_absent(client, &stream, &seen, as_of.as_ref());
        }
    });
    counts
}

/// Source rows read per `COPY` of the empty-replica path.
const COPY_CHUNK: i64 = 20_000;

/// What the empty-replica path did (written down only once its subtransaction committed).
struct Copied {
    loaded: i64,
    rejected: Vec<(Option<String>, Rejection)>,
}

/// The bootstrap case: an entity snapshot loaded into an empty replica with no version state.
/// The rows go in through PostgreSQL's `COPY` machinery in the source's order, and their version
/// stays in the replica row (`Stream::row_version`) instead of a version-state row per entity,
/// so the load writes each entity once — what a plain `COPY` of the final rows does.
///
/// Taken only when nothing can compete: the replica is locked `SHARE ROW EXCLUSIVE` (concurrent
/// appliers wait for the load to commit, then see its rows and versions) and found empty with no
/// version state, in a READ COMMITTED transaction. Anything the path cannot do exactly — a delete
/// in the snapshot, two rows of one entity (a unique violation), a value that does not fit —
/// rolls it back, and the general path loads the snapshot instead. Never where `COPY` would not
/// write as SQL does (`copy_in::writes_as_sql`). `None`: the general path.
fn load_into_empty(stream: &Stream, source_name: &str) -> Option<LoadCounts> {
    let spec = &stream.spec;
    let applicable = spec.shape == ecst_core::spec::Shape::EntitySnapshot
        && (stream.row_version.is_some() || !spec.is_versioned())
        && spec.event_id.is_none()
        && !stream.retain_events
        && stream.children.is_empty()
        && crate::pg::subxact::read_committed()
        && copy_in::writes_as_sql(&stream.table);
    if !applicable {
        return None;
    }
    Spi::connect_mut(|client| {
        let empty = |client: &mut SpiClient| {
            let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {})", stream.table.qualified);
            let replica: bool = client.select(&sql, None, &[]).expect("reading the replica").first().get(1).unwrap()?;
            let state: bool = stream
                .store
                .run(client, "SELECT NOT EXISTS (SELECT 1 FROM {state} WHERE stream_id = $1)", &[stream.id.into()])
                .first()
                .get(1)
                .unwrap()?;
            Some(replica && state)
        };
        if empty(client) != Some(true) {
            return None;
        }
        let lock = format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", stream.table.qualified);
        client.update(&lock, None, &[]).expect("locking the replica");
        if empty(client) != Some(true) {
            return None;
        }
        let copied = match subxact::run(|| copy_snapshot(client, stream, source_name)) {
            SubResult::Committed(copied) => copied,
            SubResult::RolledBack(()) => return None,
            SubResult::Failed(caught) => match *caught {
                CaughtError::PostgresError(ref r) if errors::is_event_error(&errors::sqlstate(r.sql_error_code())) => {
                    notice!(
                        "pg_ecst: load_snapshot(\"{}\"): the bulk path stopped ({}); loading row by row instead",
                        spec.name,
                        r.message()
                    );
                    return None;
                }
                other => other.rethrow(),
            },
        };
        let mut counts = LoadCounts { loaded: copied.loaded, ..LoadCounts::default() };
        counters::count_many(stream.id, &Applied::Done { outcome: Outcome::Applied, conflict: false }, copied.loaded);
        counts.dead_lettered = copied.rejected.len() as i64;
        let (payloads, results): (Vec<Option<String>>, Vec<Applied>) = copied
            .rejected
            .into_iter()
            .map(|(payload, rejection)| (payload, Applied::Rejected { rejection, sqlstate: None, conflict: false }))
            .unzip();
        let events = payloads.iter().map(|p| (p.as_deref(), None));
        record::record_all(client, Some(stream), Some(&spec.name), events, &results, EventLog::Append);
        Some(counts)
    })
}

/// Reads the source and `COPY`s its rows into the (empty, locked) replica. `Err(())`: an event the
/// path cannot apply exactly (a delete).
///
/// Three stages overlap (`parallel::pipeline`): this backend fetches a chunk of payloads and
/// `COPY`s the previous chunk's rows while a helper thread parses the chunk in between into `COPY`
/// text; the parsing is pure Rust and about a third of the work.
fn copy_snapshot(client: &mut SpiClient, stream: &Stream, source_name: &str) -> Result<Copied, ()> {
    let table = &stream.table;
    let columns: Vec<&crate::stream::catalog::Column> = table.keys.iter().chain(&table.columns).collect();
    let mut copied = Copied { loaded: 0, rejected: Vec::new() };
    let mut cursor = open_source(client, source_name);
    let spec = stream.spec.clone();
    let (keys, width) = (table.keys.len(), columns.len());
    let mut progress = Progress::new(&stream.spec.name);
    let stopped = parallel::pipeline(
        || next_chunk(&mut cursor, COPY_CHUNK),
        move |payloads| parse_chunk(&spec, keys, width, payloads),
        |chunk| {
            let Some(chunk) = chunk else {
                return ControlFlow::Break(());
            };
            let read = chunk.rows.count + chunk.rejected.len();
            copied.loaded += copy_in::copy_rows(table, &columns, chunk.rows) as i64;
            copied.rejected.extend(chunk.rejected);
            let counts = LoadCounts {
                loaded: copied.loaded,
                dead_lettered: copied.rejected.len() as i64,
                ..LoadCounts::default()
            };
            progress.advance(read, &counts);
            ControlFlow::Continue(())
        },
    );
    match stopped {
        Some(()) => Err(()),
        None => Ok(copied),
    }
}

/// One chunk of source rows parsed for `copy_snapshot`.
struct ParsedChunk {
    rows: copy_in::Rows,
    rejected: Vec<(Option<String>, Rejection)>,
}

/// Parses payloads into `COPY` rows (key columns, then every writable column). Runs on the
/// pipeline's helper thread: pure Rust only. `None`: a delete, which this path cannot apply.
fn parse_chunk(spec: &StreamSpec, keys: usize, width: usize, payloads: Vec<Option<String>>) -> Option<ParsedChunk> {
    let mut chunk = ParsedChunk { rows: copy_in::Rows::default(), rejected: Vec::new() };
    let mut events = Vec::with_capacity(payloads.len());
    for payload in payloads {
        match apply::parse_payload(spec, payload.as_deref()) {
            Ok(ev) => events.push(ev),
            Err(rejection) => chunk.rejected.push((payload, rejection)),
        }
    }
    // In key order, each chunk's index insertions walk the key index's leaf pages in order
    // instead of at random (far fewer cache misses); the heap order of a bulk load is immaterial.
    events.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    for ev in &events {
        // The plan of the event for an entity that does not exist yet (the replica is empty; an
        // entity named twice makes the COPY fail on the key and the load go the general way):
        // this path executes it only where it is a plain insert of the event's cells.
        let none = |_: usize, _: usize| ();
        let Folded::Plan(plan) = fold(spec, None, None, &[ev], none, none, &mut Ids::new(None)) else { return None };
        let insert = match (&plan.fates[..], &plan.write) {
            (
                [Fate::Done { outcome: Outcome::Applied, .. }],
                RowWrite { delete: false, upsert: Some(cells), children: None, .. },
            ) => cells,
            _ => return None,
        };
        let Op::Upsert { cells, .. } = &ev.op else { return None };
        let mut values: Vec<Option<&str>> = ev.key.iter().map(|k| Some(k.as_str())).collect();
        values.resize(width, None);
        for c in cells.iter().filter(|c| insert.contains_key(&c.column)) {
            if let CellValue::Text(t) = &c.value {
                values[keys + c.column] = Some(t.as_str());
            }
        }
        chunk.rows.push_row(values);
    }
    Some(chunk)
}

/// A cursor over the source's payloads, as text whatever the column type.
fn open_source<'c>(client: &SpiClient<'c>, source_name: &str) -> SpiCursor<'c> {
    client.open_cursor(&format!("SELECT payload::text FROM {source_name}"), &[])
}

/// The next `rows` payloads of the source (`None` at the end).
fn next_chunk(cursor: &mut SpiCursor, rows: i64) -> Option<Vec<Option<String>>> {
    let payloads: Vec<Option<String>> =
        cursor.fetch(rows as _).expect("reading the snapshot").map(|r| r.get::<String>(1).unwrap()).collect();
    (!payloads.is_empty()).then_some(payloads)
}

/// A `NOTICE` every [`PROGRESS_EVERY`] source rows.
struct Progress<'a> {
    stream: &'a str,
    read: i64,
}

impl<'a> Progress<'a> {
    fn new(stream: &'a str) -> Progress<'a> {
        Progress { stream, read: 0 }
    }

    fn advance(&mut self, rows: usize, counts: &LoadCounts) {
        let before = self.read;
        self.read += rows as i64;
        if self.read / PROGRESS_EVERY > before / PROGRESS_EVERY {
            notice!(
                "pg_ecst: load_snapshot(\"{}\"): {} rows read ({} loaded, {} stale, {} dead-lettered)",
                self.stream,
                self.read,
                counts.loaded,
                counts.stale,
                counts.dead_lettered
            );
        }
    }
}

/// SQL for an entity's canonical key text from a table's key columns (see `apply::entity_key`).
fn key_expr(alias: &str, columns: &[&str]) -> String {
    let text = |c: &str| crate::pg::spi::output_text(&format!("{alias}.{c}"));
    match columns {
        [one] => text(one),
        many => {
            format!("pg_catalog.to_json(ARRAY[{}])::text", many.iter().map(|c| text(c)).collect::<Vec<_>>().join(", "))
        }
    }
}

/// Rows whose key columns are all set: a row with a NULL key (possible under a unique index that
/// is not a primary key) is no entity of the stream — never exported, never deleted as absent.
fn keys_not_null(alias: &str, columns: &[&str]) -> String {
    columns.iter().map(|c| format!("{alias}.{c} IS NOT NULL")).collect::<Vec<_>>().join(" AND ")
}

/// The rows of `table` whose `columns` hold one of the entities `keys` (canonical texts), as SQL
/// over typed arrays (`$1`…, one per column) and those arrays. The rows are matched by their
/// columns (not by a text computed from each row: Citus refuses a `STABLE` function of a column in
/// a distributed table's `DELETE`, and the comparison can use the key's index). `None`: no key
/// fits the columns' types.
fn keyed(columns: &[Column], keys: &[String]) -> Option<(String, Vec<pgrx::datum::DatumWithOid<'static>>)> {
    let mut values: Vec<Vec<Option<pg_sys::Datum>>> = vec![Vec::with_capacity(keys.len()); columns.len()];
    for key in keys {
        let parts = ecst_core::spec::entity_key_parts(key, columns.len()).expect("an entity key read from the replica");
        // A key that does not fit these columns' types (a child column of another type than the
        // aggregate's key) names none of their rows: no event could have written one.
        let Some(datums) = columns.iter().zip(&parts).map(|(c, p)| c.ty.input(p).ok()).collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        for (datum, out) in datums.into_iter().zip(values.iter_mut()) {
            out.push(Some(datum));
        }
    }
    if values[0].is_empty() {
        return None;
    }
    let args: Vec<_> = columns.iter().zip(&values).map(|(c, v)| c.ty.array(v)).collect();
    let sql = match columns {
        [one] => format!("t.{} = ANY ($1)", one.quoted),
        many => {
            let arrays: Vec<String> = (1..=many.len()).map(|i| format!("${i}")).collect();
            let names: Vec<String> = many.iter().map(|c| format!("t.{}", c.quoted)).collect();
            format!("({}) IN (SELECT * FROM {})", names.join(", "), spi::zipped(&arrays))
        }
    };
    Some((sql, args))
}

/// Deletes the rows of `table` whose `columns` hold one of the entities `keys` ([`keyed`]); with
/// `not_newer`, only those whose version column is not newer than the given version.
fn delete_keyed(
    client: &mut SpiClient,
    table: &str,
    columns: &[Column],
    keys: &[String],
    not_newer: Option<(&Column, &str)>,
) {
    let Some((matching, mut args)) = keyed(columns, keys) else { return };
    let mut sql = format!("DELETE FROM {table} t WHERE {matching}");
    if let Some((column, version)) = not_newer {
        args.push(version.to_string().into());
        sql.push_str(&format!(" AND t.{}::numeric <= ${}::numeric", column.quoted, args.len()));
    }
    client.update(&sql, None, &args).expect("deleting replica rows");
}

/// Which of the entities `keys` have a row in `table` ([`keyed`]).
fn existing(client: &mut SpiClient, table: &TableInfo, keys: &[String]) -> HashSet<String> {
    let Some((matching, args)) = keyed(&table.keys, keys) else { return HashSet::new() };
    let names: Vec<&str> = table.keys.iter().map(|k| k.quoted.as_str()).collect();
    let sql = format!("SELECT {} FROM {} t WHERE {matching}", key_expr("t", &names), table.qualified);
    client
        .select(&sql, None, &args)
        .expect("reading the replica")
        .map(|r| r.get::<String>(1).unwrap().unwrap())
        .collect()
}

/// Replace mode: deletes the replica entities absent from the snapshot whose version is not newer
/// than `as_of`, leaving tombstones at `as_of`. Returns how many were deleted.
fn delete_absent(client: &mut SpiClient, stream: &Stream, seen: &HashSet<String>, as_of: Option<&Version>) -> i64 {
    let table = &stream.table;
    let keys: Vec<&str> = table.keys.iter().map(|k| k.quoted.as_str()).collect();
    // Bulk-loaded entities without a state row, by key: their version (from the replica row).
    let mut unstored: BTreeMap<String, String> = BTreeMap::new();
    let candidates: Vec<String> = match as_of {
        Some(v) => {
            let mut candidates: Vec<String> = stream
                .store
                .run_once(
                    client, // Locked: a concurrent event of a state-row stream (whose writers do not take the
                    // stream lock) waits, or has made its entity newer, which the lock's re-check of
                    // the newest row version then sees.
                    "SELECT entity_key FROM {state}
                 WHERE stream_id = $1 AND live_version IS NOT NULL
                   AND (tomb_version IS NULL OR live_version > tomb_version) AND live_version <= $2::numeric
                 ORDER BY entity_key COLLATE \"C\" {for_update}",
                    &[stream.id.into(), v.to_numeric_string().into()],
                )
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect();
            if let Some(column) = stream.row_version {
                let column = &table.columns[column].quoted;
                let sql = format!(
                    "SELECT {}, t.{column}::text FROM {} t WHERE t.{column}::numeric <= $1::numeric AND {}",
                    key_expr("t", &keys),
                    table.qualified,
                    keys_not_null("t", &keys)
                );
                let rows: Vec<(String, String)> = client
                    .select(&sql, None, &[v.to_numeric_string().into()])
                    .expect("reading the replica")
                    .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap()))
                    .collect();
                if !rows.is_empty() {
                    let all: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
                    let with_state: HashSet<String> = stream
                        .store
                        .run_once(
                            client,
                            "SELECT entity_key FROM {state} WHERE stream_id = $1 AND entity_key = ANY ($2)",
                            &[stream.id.into(), all.into()],
                        )
                        .map(|r| r.get::<String>(1).unwrap().unwrap())
                        .collect();
                    for (key, version) in rows {
                        if !with_state.contains(&key) {
                            candidates.push(key.clone());
                            unstored.insert(key, version);
                        }
                    }
                }
            }
            candidates
        }
        None => client
            .select(
                &format!(
                    "SELECT {} FROM {} t WHERE {}",
                    key_expr("t", &keys),
                    table.qualified,
                    keys_not_null("t", &keys)
                ),
                None,
                &[],
            )
            .expect("reading the replica")
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect(),
    };
    let mut gone: Vec<String> = candidates.into_iter().filter(|k| !seen.contains(k)).collect();
    if gone.is_empty() {
        return 0;
    }
    let mut removed = 0;
    if let Some(v) = as_of {
        // Each entity goes only if it is still not newer than as_of: one that a concurrent event
        // made newer meanwhile keeps its rows. (On a local replica the candidates' state rows are
        // locked already; on a distributed one nothing on the coordinator stops the nodes'
        // appliers.) Entities with a state row: their tombstones first, which locks the state
        // rows before the replica rows, in the order every applier takes them.
        let tombstoned: HashSet<String> = stream
            .store
            .run_once(
                client,
                "UPDATE {state} SET tomb_version = $3::numeric, field_versions = NULL
                 WHERE stream_id = $1 AND entity_key = ANY ($2::text[]) AND live_version IS NOT NULL
                   AND (tomb_version IS NULL OR live_version > tomb_version) AND live_version <= $3::numeric
                 RETURNING entity_key",
                &[stream.id.into(), gone.clone().into(), v.to_numeric_string().into()],
            )
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect();
        // Bulk-loaded entities (their version in the row): the rows not newer than as_of, then
        // tombstones for those that are gone.
        let unstored: BTreeMap<String, String> = unstored.into_iter().filter(|(k, _)| !seen.contains(k)).collect();
        if let (Some(column), false) = (stream.row_version, unstored.is_empty()) {
            let keys: Vec<String> = unstored.keys().cloned().collect();
            let column = &table.columns[column];
            delete_keyed(client, &table.qualified, &table.keys, &keys, Some((column, &v.to_numeric_string())));
            let kept = existing(client, table, &keys);
            let (keys, versions): (Vec<String>, Vec<String>) =
                unstored.into_iter().filter(|(k, _)| !kept.contains(k)).unzip();
            if !keys.is_empty() {
                // A state row that a concurrent event wrote meanwhile (a newer version, or a newer
                // tombstone from a delete that took the row) is left as it is: that entity is not
                // one this load deleted.
                removed += stream
                    .store
                    .run_once(
                        client,
                        "INSERT INTO {state} AS s (stream_id, entity_key, live_version, tomb_version{+dist})
                         SELECT $1, u.k, u.l::numeric, $4::numeric{+dist_of:u.k} FROM unnest($2::text[], $3::text[]) AS u (k, l)
                         ON CONFLICT (stream_id, entity_key{+dist})
                         DO UPDATE SET tomb_version = EXCLUDED.tomb_version, field_versions = NULL
                         WHERE (s.tomb_version IS NULL OR s.tomb_version < EXCLUDED.tomb_version)
                           AND (s.live_version IS NULL OR s.live_version <= EXCLUDED.tomb_version)
                         RETURNING 1",
                        &[stream.id.into(), keys.into(), versions.into(), v.to_numeric_string().into()],
                    )
                    .len() as i64;
            }
        }
        gone.retain(|k| tombstoned.contains(k));
    }
    for child in &stream.children {
        delete_keyed(client, &child.table.qualified, &child.parent, &gone, None);
    }
    delete_keyed(client, &table.qualified, &table.keys, &gone, None);
    removed += gone.len() as i64;
    removed
}

/// `ecst.export_snapshot(stream)`: every replica entity as a create event in the stream's format.
pub fn export(stream_name: &str) -> Vec<Value> {
    let stream = catalog::stream(stream_name);
    // The keys are printed as every session reads them.
    let stream = stream.styled();
    security::require_select(&stream);
    let spec = &stream.spec;
    let table = &stream.table;
    Spi::connect_mut(|client| {
        let mut versions: HashMap<String, String> = HashMap::new();
        if spec.version.is_some() {
            let rows = stream.store.run_once(
                client,
                "SELECT entity_key, live_version::text FROM {state}
                 WHERE stream_id = $1 AND live_version IS NOT NULL",
                &[stream.id.into()],
            );
            versions.extend(rows.map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap())));
        }
        let keys: Vec<&str> = table.keys.iter().map(|k| k.quoted.as_str()).collect();
        let mut select: Vec<String> = vec![key_expr("t", &keys)];
        select.extend(table.keys.iter().map(|k| export_expr("t", k)));
        select.extend(table.columns.iter().map(|c| export_expr("t", c)));
        // The last column tells rows that name an entity; those with a NULL key are counted and
        // skipped in the same scan.
        select.push(format!("({})", keys_not_null("t", &keys)));
        let keyed_at = select.len();
        let sql = format!("SELECT {} FROM {} t ORDER BY 1", select.join(", "), table.qualified);
        let children = export_children(client, &stream);
        // A date/time version column's version is rendered as a timestamp (`export::event`).
        let temporal_version = spec.version_column().is_some_and(|i| {
            // SAFETY: a catalog lookup for the column's existing type (a domain's base type).
            let base = unsafe { pg_sys::getBaseType(table.columns[i].ty.oid) };
            [pg_sys::TIMESTAMPTZOID, pg_sys::TIMESTAMPOID, pg_sys::DATEOID].contains(&base)
        });
        let mut unkeyed = 0i64;
        let events = client
            .select(&sql, None, &[])
            .expect("reading the replica")
            .filter(|r| {
                let keyed = r.get::<bool>(keyed_at).unwrap().unwrap_or(false);
                unkeyed += i64::from(!keyed);
                keyed
            })
            .map(|r| {
                let entity_key: String = r.get(1).unwrap().unwrap();
                let first = 2 + table.keys.len();
                // Bulk-loaded entities without a state row carry their version in the row.
                let version: Option<String> = versions
                    .get(&entity_key)
                    .cloned()
                    .or_else(|| stream.row_version.and_then(|i| r.get::<String>(first + i).unwrap()));
                let row = export::Row {
                    keys: (0..table.keys.len()).map(|i| parse_json(r.get(2 + i).unwrap())).collect(),
                    columns: (0..table.columns.len()).map(|i| parse_json(r.get(first + i).unwrap())).collect(),
                    version: version.and_then(|v| Version::parse_decimal(&v).ok()),
                    children: (0..spec.children.len())
                        .map(|ci| children.get(&(ci, entity_key.clone())).cloned().unwrap_or_default())
                        .collect(),
                };
                export::event(spec, row, temporal_version)
            })
            .collect();
        if unkeyed > 0 {
            pgrx::warning!(
                "pg_ecst: {unkeyed} row(s) of {} have a NULL key column: no event can name them, they are not exported",
                table.qualified
            );
        }
        events
    })
}

/// Child rows as JSON objects, by (child index, canonical parent key), in key order.
fn export_children(client: &SpiClient, stream: &Stream) -> BTreeMap<(usize, String), Vec<Value>> {
    let mut out: BTreeMap<(usize, String), Vec<Value>> = BTreeMap::new();
    for (ci, (info, spec)) in stream.children.iter().zip(&stream.spec.children).enumerate() {
        let parent: Vec<&str> = info.parent.iter().map(|c| c.quoted.as_str()).collect();
        let mut select = vec![key_expr("c", &parent)];
        select.extend(info.table.keys.iter().map(|k| export_expr("c", k)));
        select.extend(info.table.columns.iter().map(|c| export_expr("c", c)));
        let order: Vec<String> = info.table.keys.iter().map(|k| format!("c.{}", k.quoted)).collect();
        let sql =
            format!("SELECT {} FROM {} c ORDER BY 1, {}", select.join(", "), info.table.qualified, order.join(", "));
        for r in client.select(&sql, None, &[]).expect("reading child rows") {
            let parent_key: String = r.get(1).unwrap().unwrap();
            let first = 2 + info.table.keys.len();
            let keys = (0..info.table.keys.len()).map(|i| parse_json(r.get(2 + i).unwrap())).collect();
            let columns = (0..info.table.columns.len()).map(|i| parse_json(r.get(first + i).unwrap())).collect();
            out.entry((ci, parent_key)).or_default().push(export::child(spec, keys, columns));
        }
    }
    out
}

/// A column's value as the JSON that an event must carry to write it again: events pass a JSON
/// string's content, and any other JSON value's text, to the column's input function. So a value
/// whose JSON form that input does not read back (an array's JSON array, a composite's object)
/// travels as its text; a json/jsonb value that is itself a JSON string or null travels as its
/// JSON text in a string (a bare JSON null would mean SQL NULL).
fn export_expr(alias: &str, column: &Column) -> String {
    let c = format!("{alias}.{}", column.quoted);
    if column.ty.oid == pg_sys::JSONBOID || column.ty.oid == pg_sys::JSONOID {
        format!("(CASE WHEN pg_catalog.jsonb_typeof({c}::jsonb) IN ('string', 'null') THEN pg_catalog.to_jsonb({c}::text) ELSE {c}::jsonb END)::text")
    } else {
        format!("(CASE WHEN pg_catalog.jsonb_typeof(pg_catalog.to_jsonb({c})) IN ('object', 'array') THEN pg_catalog.to_jsonb({c}::text) ELSE pg_catalog.to_jsonb({c}) END)::text")
    }
}

fn parse_json(text: Option<String>) -> Value {
    text.map(|t| serde_json::from_str(&t).expect("to_jsonb is JSON")).unwrap_or(Value::Null)
}
