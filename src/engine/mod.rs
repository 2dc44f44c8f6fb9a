//! Layer 3, the apply engine: events of a stream in, replica rows out. It converts values,
//! records event ids, locks and reads the entities' states, asks the core for the plan of each
//! entity's run (`ecst_core::fold`), and executes it — set-based ([`bulk`]), per event ([`apply`]),
//! through SQL ([`writer`]) or the executor's row API ([`direct`]) — then records outcomes.
//!
//! Imports: `ecst_core`, [`crate::pg`], [`crate::stream`] and this layer.

use crate::engine::outcome::{Applied, ErrorPolicy};
use crate::stream::catalog::Styled;
use ecst_core::event::Event;
use ecst_core::reject::Rejection;
use pgrx::spi::SpiClient;

pub mod apply;
pub mod bulk;
pub mod copy_in;
pub mod counters;
pub mod direct;
pub mod outcome;
pub mod record;
pub mod shards;
pub mod writer;

/// The engine's entrance: applies `events` of one stream (parsed, or rejected by the parser) and
/// returns one result per event. Events of one entity keep their order; entities are visited in
/// key order. Every entrance of pg_ecst — `ecst.apply` (a run of one), `apply_batch`, the inbox,
/// retry, `load_snapshot`'s general path and `rebuild` — comes through here; [`bulk`] chooses the
/// executor (set-based, or one event at a time) in one place. A stream on a distributed replica
/// is applied on its shards' nodes instead ([`shards`]), which need the events' `payloads`.
pub fn apply(
    client: &mut SpiClient,
    stream: &Styled,
    payloads: &[Option<&str>],
    events: &[Result<Event, Rejection>],
    policy: ErrorPolicy,
) -> Vec<Applied> {
    if stream.store.routed() {
        shards::apply_routed(client, stream, payloads, events, policy)
    } else {
        bulk::apply_run(client, stream, events, policy)
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;
