//! Layer 4, features built on the engine: the inbox and its drain, the feed (`ecst.feed`), snapshots (load, export),
//! event retention (rebuild, compaction) and dead-letter housekeeping.
//!
//! Imports: `ecst_core`, the layers below and this layer (without a circle).

pub mod dead_letters;
pub mod feed;
pub mod inbox;
pub mod retention;
pub mod rows;
pub mod snapshot;
pub mod sorted;

#[cfg(any(test, feature = "pg_test"))]
mod tests;
