//! Layer 2, streams: a stream's definition as PostgreSQL holds it (the catalog rows, the replica
//! and child tables resolved to typed columns, the per-backend cache) and who may apply it
//! (privileges, the owners of code that runs in a replica).
//!
//! Imports: `ecst_core`, [`crate::pg`] and this layer.

pub mod catalog;
pub mod citus;
pub mod routes;
pub mod security;

#[cfg(any(test, feature = "pg_test"))]
mod tests;
