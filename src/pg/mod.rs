//! Layer 1, PostgreSQL glue: what any PostgreSQL extension would need, with nothing of pg_ecst's
//! streams or rules — errors with SQLSTATEs, settings, subtransactions, helper threads, value
//! conversion through column types, advisory and relation locks, SPI with cached plans, the
//! catalog lookups and the owner context of internal statements.
//!
//! Imports: `ecst_core` and this layer only.

pub mod convert;
pub mod errors;
pub mod gucs;
pub mod locks;
pub mod owner;
pub mod parallel;
pub mod spi;
pub mod store;
pub mod subxact;
pub mod syscache;
