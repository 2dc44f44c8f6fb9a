//! The SQL executor of writes to replica rows, one row at a time: upsert (guarded by the row's
//! version where it keeps it), reset to DEFAULT, delete, a parent's child rows, and the row read
//! for the oldState check. Every statement is built from quoted identifiers only (values always
//! travel as typed parameters, never inside the SQL text) and prepared once per backend through
//! [`crate::pg::spi`].

use crate::pg::spi::{output_text, run, zipped};
use crate::stream::catalog::{ChildInfo, Column, TableInfo};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

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
