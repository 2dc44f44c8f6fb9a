//! The SQL that writes replicas and pg_ecst's own state. Every statement is built from quoted
//! identifiers only (values always travel as typed parameters, never inside the SQL text) and
//! prepared once per backend: the plan cache is keyed by the statement text and its parameters'
//! types (a column whose type changed gets a new plan, never one bound to the old type).

use crate::catalog::{ChildInfo, Column, TableInfo};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

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

/// A cached plan's statement and parameter types: the same text with other types (after an
/// `ALTER TABLE … ALTER COLUMN … TYPE`) is another plan. A plan prepared for the old types would
/// read the new values as the old type — garbage, or a crash.
type PlanKey = (String, Vec<pg_sys::Oid>);

thread_local! {
    static PLANS: RefCell<HashMap<PlanKey, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
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
    // The plan is taken out of the cache before it runs: the statement may call pg_ecst again (a
    // trigger on a replica applying events), which must find the cache free to borrow.
    let key: PlanKey = (sql.to_string(), args.iter().map(|a| a.oid()).collect());
    let plan = match PLANS.with(|p| p.borrow().get(&key).cloned()) {
        Some(plan) => plan,
        None => {
            let types: Vec<PgOid> = key.1.iter().map(|&oid| PgOid::from(oid)).collect();
            let plan =
                Rc::new(client.prepare_mut(sql, &types).unwrap_or_else(|e| panic!("preparing {sql}: {e}")).keep());
            PLANS.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() >= MAX_PLANS {
                    p.clear();
                }
                p.insert(key, plan.clone());
            });
            plan
        }
    };
    client.update(&*plan, None, args).unwrap_or_else(|e| panic!("running {sql}: {e}"))
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
/// (`DO NOTHING` when there is nothing to update). With a `guard` (the row's version column) an
/// existing row is only updated if that does not lower its version; returns whether the row was
/// written (always true without a guard).
pub fn upsert(
    client: &mut SpiClient,
    table: &str,
    row: &[Bound],
    conflict: &[String],
    update: &[&str],
    guard: Option<&Column>,
) -> bool {
    let cols: Vec<&str> = row.iter().map(|b| b.column.quoted.as_str()).collect();
    let params: Vec<String> = (1..=row.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "INSERT INTO {table} AS t ({}) VALUES ({}) ON CONFLICT ({}) DO {}",
        list(&cols),
        params.join(", "),
        conflict.join(", "),
        conflict_action(update, guard, "1")
    );
    let args: Vec<_> = row.iter().map(Bound::arg).collect();
    let written = run(client, &sql, &args);
    guard.is_none() || !written.is_empty()
}

/// The `DO ...` of an upsert: `NOTHING`, or `UPDATE SET c = EXCLUDED.c, ...`, with a `guard`
/// version column only where the stored version is older (or NULL), `RETURNING <returning>`.
pub fn conflict_action(update: &[&str], guard: Option<&Column>, returning: &str) -> String {
    let mut action = if update.is_empty() {
        "NOTHING".to_string()
    } else {
        format!("UPDATE SET {}", update.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect::<Vec<_>>().join(", "))
    };
    if let Some(v) = guard {
        let v = &v.quoted;
        if !update.is_empty() {
            action.push_str(&format!(" WHERE t.{v} IS NULL OR t.{v} < EXCLUDED.{v}"));
        }
        action.push_str(&format!(" RETURNING {returning}"));
    }
    action
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

/// SQL for a value's text as its type's output function prints it (NULL stays NULL) — the text
/// pg_ecst's canonical keys and conflict checks use on the Rust side (`ColumnType::output`).
/// `::text` is not that for every type: a boolean casts to `true` but prints `t`, a `char(n)`
/// casts without its padding.
pub fn output_text(expr: &str) -> String {
    // num_nulls, not IS NULL: a composite whose fields are all NULL IS NULL, yet prints "(,)".
    format!("(CASE WHEN pg_catalog.num_nulls({expr}) = 1 THEN NULL ELSE pg_catalog.format('%s', {expr}) END)")
}

/// SQL for the rows of arrays read side by side, as `unnest(a, b, …)` gives them: written as
/// `ROWS FROM (pg_catalog.unnest(a), …)`, because only the unqualified name takes several arrays,
/// and an unqualified name could be someone else's function (see `output_text`).
pub fn zipped(arrays: &[String]) -> String {
    let each: Vec<String> = arrays.iter().map(|a| format!("pg_catalog.unnest({a})")).collect();
    format!("ROWS FROM ({})", each.join(", "))
}

/// Deletes a parent's child rows whose key is not among `keep` (canonical key texts).
pub fn prune_children(client: &mut SpiClient, child: &ChildInfo, parent: &[Bound], keep: &[Vec<String>]) {
    let n = parent.len();
    let key_cols = &child.table.keys;
    let arrays: Vec<String> = (0..key_cols.len()).map(|i| format!("${}::text[]", n + 1 + i)).collect();
    let aliases: Vec<String> = (0..key_cols.len()).map(|i| format!("k{i}")).collect();
    let matches: Vec<String> = key_cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = k.k{i}", output_text(&format!("c.{}", c.quoted))))
        .collect();
    let sql = format!(
        "DELETE FROM {} AS c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} AS k({}) WHERE {})",
        child.table.qualified,
        parent
            .iter()
            .enumerate()
            .map(|(i, p)| format!("c.{} = ${}", p.column.quoted, i + 1))
            .collect::<Vec<_>>()
            .join(" AND "),
        zipped(&arrays),
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

/// The replica row matching `keys`, each column as its type's output text (how the engine compares
/// `oldState` with the row), or `None` if the row is absent.
pub fn row_texts(client: &mut SpiClient, table: &TableInfo, keys: &[Bound]) -> Option<Vec<Option<String>>> {
    // A leading 1: a table with no column but its key still has a row to find.
    let cols: String = table.columns.iter().map(|c| format!(", {}", output_text(&c.quoted))).collect();
    let sql = format!("SELECT 1{cols} FROM {} WHERE {}", table.qualified, where_keys(keys, 1));
    let args: Vec<_> = keys.iter().map(Bound::arg).collect();
    let mut rows = run(client, &sql, &args);
    let row = rows.next()?;
    Some((2..=table.columns.len() + 1).map(|i| row.get::<String>(i).unwrap()).collect())
}
