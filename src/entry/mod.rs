//! Layer 5, entrances: the SQL functions and triggers ([`api`]) and the background workers
//! ([`worker`]). They only hand work to the layers below.
//!
//! Imports: anything below.

pub mod api;
pub mod asyncapi;
pub mod worker;

#[cfg(any(test, feature = "pg_test"))]
mod tests;
