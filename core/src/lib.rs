//! The pure core of pg_ecst: everything that decides *what* to write, with no PostgreSQL
//! types. The pgrx shell moves data between PostgreSQL and these functions.
//!
//! - [`asyncapi`]: an AsyncAPI 3.x document's received messages → shapes, keys and replica DDL.
//! - [`spec`]: a stream's definition (shape, key, mappings, children) and field→column resolution.
//! - [`event`]: parsing one raw event into keys, version, id and mapped cells, or a [`reject::Rejection`].
//! - [`version`]: entity versions (JSON numbers or RFC 3339 timestamps) and their order.
//! - [`merge`]: the per-entity state and the decision an event makes against it (idempotence,
//!   staleness, per-field merge for deltas, tombstones, conflicts).
//! - [`fold`]: a run of events of one entity folded into one plan: each event's outcome, the one
//!   write they amount to and the new state (every entrance decides through it).
//! - [`compact`]: the event log flattened to what a replay needs.
//! - [`export`]: a replica entity rendered as the create event that would write it.
//! - [`reject`]: the stable dead-letter codes.
//! - [`schema`]: a stream's JSON Schema, checked against each event (`schema_violation`).
//! - [`route`]: which stream an event of a feed with several event types goes to.
//! - [`sim`]: an in-memory replica and the in-order reference, for property tests and fuzzing.

pub mod asyncapi;
pub mod compact;
pub mod event;
pub mod examples;
pub mod export;
pub mod fold;
pub mod merge;
pub mod reject;
pub mod route;
pub mod schema;
pub mod sim;
pub mod spec;
pub mod version;
