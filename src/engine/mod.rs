//! Layer 3, the apply engine: events of a stream in, replica rows out. It converts values,
//! records event ids, locks and reads the entities' states, asks the core for the plan of each
//! entity's run (`ecst_core::fold`), and executes it — set-based ([`bulk`]), per event ([`apply`]),
//! through SQL ([`writer`]) or the executor's row API ([`direct`]) — then records outcomes.
//!
//! Imports: `ecst_core`, [`crate::pg`], [`crate::stream`] and this layer.

pub mod apply;
pub mod bulk;
pub mod copy_in;
pub mod counters;
pub mod direct;
pub mod outcome;
pub mod record;
pub mod writer;
