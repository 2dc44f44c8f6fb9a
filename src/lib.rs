//! pg_ecst: applies Event-Carried State Transfer events into local replica tables.
//!
//! This crate is the thin PostgreSQL shell around the pure `ecst_core`: it reads stream
//! definitions, converts values through column types, runs the writes through SPI and
//! exposes the SQL functions. `lib.rs` only wires the modules together.

use pgrx::prelude::*;

// The layers, bottom up; each imports only the ones above it here (checked by
// scripts/check-layers). The pure core, `ecst_core`, is below them all.
mod pg;

mod stream;

mod engine;

mod features;

mod entry;

#[cfg(any(test, feature = "pg_test"))]
mod testing;

pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    pg::gucs::init();
    entry::worker::init();
    stream::catalog::register_invalidation();
    engine::counters::register_flush();
}

/// Used by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
