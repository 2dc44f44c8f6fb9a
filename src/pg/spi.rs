//! SPI with cached plans: every statement pg_ecst runs goes through [`run`] (a prepared plan
//! per statement text and parameter types) or [`run_once`] (planned for its arguments), with
//! sequential scans off while it is planned.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

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

/// pg_ecst's own statements — on its tables in schema `ecst`, never on a replica or anything a
/// caller names — run as the extension's owner with `search_path = pg_catalog, pg_temp`
/// ([`crate::pg::owner`]). This is the only way into that context: the owner switch is private
/// to this layer, and a statement's text must be a `&'static str`, so no value and no caller's
/// identifier can be part of it (values travel as parameters).
pub mod internal {
    use crate::pg::owner::as_owner;
    use pgrx::datum::DatumWithOid;
    use pgrx::spi::{SpiClient, SpiCursor, SpiTupleTable};

    /// [`super::run`] (a cached plan) as the extension's owner.
    pub fn run<'c>(client: &mut SpiClient<'c>, sql: &'static str, args: &[DatumWithOid<'_>]) -> SpiTupleTable<'c> {
        as_owner(|| super::run(client, sql, args))
    }

    /// [`super::run_once`] (planned for these arguments) as the extension's owner.
    pub fn run_once<'c>(client: &mut SpiClient<'c>, sql: &'static str, args: &[DatumWithOid<'_>]) -> SpiTupleTable<'c> {
        as_owner(|| super::run_once(client, sql, args))
    }

    /// A cursor over an internal query; each fetch runs as the extension's owner.
    pub struct Cursor<'c>(SpiCursor<'c>);

    /// Opens a cursor over the query `sql` as the extension's owner.
    pub fn open<'c>(client: &SpiClient<'c>, sql: &'static str, args: &[DatumWithOid<'_>]) -> Cursor<'c> {
        Cursor(as_owner(|| client.open_cursor(sql, args)))
    }

    impl Cursor<'_> {
        /// The next `count` rows (none at the end).
        pub fn fetch(&mut self, count: i64) -> SpiTupleTable<'_> {
            as_owner(|| self.0.fetch(count as _).unwrap_or_else(|e| panic!("fetching from a cursor: {e}")))
        }
    }
}
