//! The SQL that writes replicas and pg_ecst's own state. Every statement is built from quoted
//! identifiers only (values always travel as typed parameters, never inside the SQL text) and
//! prepared once per backend: the plan cache is keyed by the statement text.

use crate::catalog::{ChildInfo, Column, TableInfo};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;

/// A column with the value to bind (`None` is NULL).
#[derive(Clone, Copy)]
pub struct Bound<'a> {
    pub column: &'a Column,
    pub value: Option<pg_sys::Datum>,
}

impl Bound<'_> {
    pub fn arg(&self) -> DatumWithOid<'static> {
        match self.value {
            // SAFETY: the datum was produced by this column type's input function.
            Some(d) => unsafe { DatumWithOid::new(d, self.column.ty.oid) },
            None => DatumWithOid::null_oid(self.column.ty.oid),
        }
    }
}

/// Plans are dropped when the cache grows past this (streams × column subsets).
const MAX_PLANS: usize = 4096;

thread_local! {
    static PLANS: RefCell<HashMap<String, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Plans made while pg_ecst's statements run do not use sequential scans (it stays `off` until the
/// guard is dropped, also when an error unwinds). Every pg_ecst statement looks rows up by key;
/// a plan made while a table was analyzed nearly empty would otherwise scan it — and all its
/// dead row versions — once per event as it grows (measured: 26M tuples read for 18k calls).
struct NoSeqScan(bool);

impl NoSeqScan {
    fn new() -> NoSeqScan {
        // SAFETY: the planner's global setting, read and restored in this backend only.
        unsafe {
            let was = pg_sys::enable_seqscan;
            pg_sys::enable_seqscan = false;
            NoSeqScan(was)
        }
    }
}

impl Drop for NoSeqScan {
    fn drop(&mut self) {
        unsafe { pg_sys::enable_seqscan = self.0 };
    }
}

/// Runs `sql` with `args` through a cached prepared plan.
pub fn run<'c>(client: &mut SpiClient<'c>, sql: &str, args: &[DatumWithOid<'_>]) -> SpiTupleTable<'c> {
    let _no_seqscan = NoSeqScan::new();
    let cached = PLANS.with(|p| p.borrow().contains_key(sql));
    if !cached {
        let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
        let plan = client.prepare_mut(sql, &types).unwrap_or_else(|e| panic!("preparing {sql}: {e}")).keep();
        PLANS.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() >= MAX_PLANS {
                p.clear();
            }
            p.insert(sql.to_string(), plan);
        });
    }
    PLANS.with(|p| {
        let plans = p.borrow();
        let plan = plans.get(sql).expect("plan just cached");
        client.update(plan, None, args).unwrap_or_else(|e| panic!("running {sql}: {e}"))
    })
}

/// Runs `sql` planned for these very arguments (no cached plan). For statements whose best plan
/// depends on the values — lookups by an array of keys, `LIMIT $n` over a queue — a cached
/// generic plan made while a table was small turns into a sequential scan forever after.
pub fn run_once<'c>(client: &mut SpiClient<'c>, sql: &str, args: &[DatumWithOid<'_>]) -> SpiTupleTable<'c> {
    let _no_seqscan = NoSeqScan::new();
    client.update(sql, None, args).unwrap_or_else(|e| panic!("running {sql}: {e}"))
}

fn list(columns: &[&str]) -> String {
    columns.join(", ")
}

fn where_keys(keys: &[Bound], first_param: usize) -> String {
    keys.iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ${}", k.column.quoted, first_param + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `INSERT ... ON CONFLICT (conflict) DO UPDATE SET <update> = EXCLUDED.<update>`
/// (`DO NOTHING` when there is nothing to update).
pub fn upsert(client: &mut SpiClient, table: &str, row: &[Bound], conflict: &[String], update: &[&str]) {
    let cols: Vec<&str> = row.iter().map(|b| b.column.quoted.as_str()).collect();
    let params: Vec<String> = (1..=row.len()).map(|i| format!("${i}")).collect();
    let action = if update.is_empty() {
        "NOTHING".to_string()
    } else {
        format!("UPDATE SET {}", update.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect::<Vec<_>>().join(", "))
    };
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
        list(&cols),
        params.join(", "),
        conflict.join(", ")
    );
    let args: Vec<_> = row.iter().map(Bound::arg).collect();
    run(client, &sql, &args);
}

/// Resets columns to their DEFAULT (a delta delete older than a surviving update).
pub fn clear(client: &mut SpiClient, table: &TableInfo, keys: &[Bound], columns: &[&Column]) {
    let sets: Vec<String> = columns.iter().map(|c| format!("{} = DEFAULT", c.quoted)).collect();
    let sql = format!("UPDATE {} SET {} WHERE {}", table.qualified, sets.join(", "), where_keys(keys, 1));
    let args: Vec<_> = keys.iter().map(Bound::arg).collect();
    run(client, &sql, &args);
}

/// Deletes the rows matching `keys` (a replica row, or all child rows of a parent).
pub fn delete(client: &mut SpiClient, table: &str, keys: &[Bound]) {
    let sql = format!("DELETE FROM {table} WHERE {}", where_keys(keys, 1));
    let args: Vec<_> = keys.iter().map(Bound::arg).collect();
    run(client, &sql, &args);
}

/// Deletes a parent's child rows whose key is not among `keep` (canonical key texts).
pub fn prune_children(client: &mut SpiClient, child: &ChildInfo, parent: &[Bound], keep: &[Vec<String>]) {
    let n = parent.len();
    let key_cols = &child.table.keys;
    let arrays: Vec<String> = (0..key_cols.len()).map(|i| format!("${}::text[]", n + 1 + i)).collect();
    let aliases: Vec<String> = (0..key_cols.len()).map(|i| format!("k{i}")).collect();
    let matches: Vec<String> =
        key_cols.iter().enumerate().map(|(i, c)| format!("c.{}::text = k.k{i}", c.quoted)).collect();
    let sql = format!(
        "DELETE FROM {} AS c WHERE {} AND NOT EXISTS (SELECT 1 FROM unnest({}) AS k({}) WHERE {})",
        child.table.qualified,
        parent
            .iter()
            .enumerate()
            .map(|(i, p)| format!("c.{} = ${}", p.column.quoted, i + 1))
            .collect::<Vec<_>>()
            .join(" AND "),
        arrays.join(", "),
        aliases.join(", "),
        matches.join(" AND ")
    );
    let mut args: Vec<_> = parent.iter().map(Bound::arg).collect();
    for i in 0..key_cols.len() {
        let column: Vec<String> = keep.iter().map(|k| k[i].clone()).collect();
        args.push(column.into());
    }
    run(client, &sql, &args);
}

/// For each `old` cell: does the replica's current value differ? `None` if the row is absent.
pub fn differs(client: &mut SpiClient, table: &TableInfo, keys: &[Bound], old: &[Bound]) -> Option<Vec<bool>> {
    let n = keys.len();
    let tests: Vec<String> = old
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{}::text IS DISTINCT FROM ${}::text", b.column.quoted, n + 1 + i))
        .collect();
    let sql = format!("SELECT {} FROM {} WHERE {}", tests.join(", "), table.qualified, where_keys(keys, 1));
    let args: Vec<_> = keys.iter().chain(old.iter()).map(Bound::arg).collect();
    let rows = run(client, &sql, &args);
    let row = rows.into_iter().next()?;
    Some((1..=old.len()).map(|i| row.get::<bool>(i).unwrap().unwrap_or(true)).collect())
}

/// Above this many entities a call locks the whole stream instead of each entity: every
/// transaction-level lock takes a slot in PostgreSQL's shared lock table
/// (`max_locks_per_transaction` × connections, about 7,800 by default), which a batch of 50,000
/// entity locks overflows ("out of shared memory").
const ENTITY_LOCKS_MAX: usize = 256;

/// The first key of the two-key advisory lock space used for whole-stream locks (the second is
/// the stream id); entity locks use the one-bigint key space, which is distinct.
const STREAM_LOCK_SPACE: u32 = 0x6563_7374; // "ecst"

/// Locks entities of an unversioned stream (no version-state row to lock), in the order given,
/// until the end of the transaction: every path (set-based and per-event) takes these before any
/// replica row, in key order, so two sessions writing the same entities in different column-set
/// groups or with deletes cannot deadlock.
///
/// Two levels: up to [`ENTITY_LOCKS_MAX`] entities, the stream's lock in share mode and then one
/// transaction-level advisory lock per entity on a 64-bit hash of (stream, entity key) — a
/// collision only makes two entities share a lock; more entities than that, the stream's lock
/// in exclusive mode alone, which excludes every other writer of the stream until commit.
pub fn lock_entities(client: &mut SpiClient, stream_id: i32, keys: Vec<String>) {
    let whole = keys.len() > ENTITY_LOCKS_MAX;
    lock_stream(stream_id, whole);
    if whole {
        return;
    }
    run(
        client,
        "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(u.k, $1))
         FROM pg_catalog.unnest($2::text[]) WITH ORDINALITY AS u (k, n) ORDER BY u.n",
        &[(stream_id as i64).into(), keys.into()],
    );
}

/// `pg_advisory_xact_lock[_shared](STREAM_LOCK_SPACE, stream_id)`, taken directly.
fn lock_stream(stream_id: i32, exclusive: bool) {
    let mode = if exclusive { pg_sys::ExclusiveLock } else { pg_sys::ShareLock };
    // SAFETY: the lock tag advisory.c builds for the two-int4 form (SET_LOCKTAG_INT32), in the
    // user lock method; a transaction-level lock, released at commit or abort.
    unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: STREAM_LOCK_SPACE,
            locktag_field3: stream_id as u32,
            locktag_field4: 2,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, false);
    }
}
