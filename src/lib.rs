//! pg_ecst: applies Event-Carried State Transfer events into local replica tables.
//!
//! This crate is the thin PostgreSQL shell around the pure `ecst_core`: it reads stream
//! definitions, converts values through column types, runs the writes through SPI and
//! exposes the SQL functions. `lib.rs` only wires the modules together.

use pgrx::prelude::*;

mod api;
mod apply;
mod bulk;
mod catalog;
mod convert;
mod copy_in;
mod counters;
mod dead_letters;
mod direct;
mod errors;
mod gucs;
mod inbox;
mod locks;
mod parallel;
mod retention;
mod security;
mod snapshot;
mod subxact;
mod worker;
mod writer;

#[cfg(any(test, feature = "pg_test"))]
mod tests;

pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    worker::init();
    catalog::register_invalidation();
    counters::register_flush();
}

/// Used by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
