//! Per-stream counters behind `ecst.stats`. Counts accumulate in backend memory during a
//! transaction and are written as one append-only row per stream just before it commits
//! (so concurrent appliers never contend on a counter row, and a single `ecst.apply` pays
//! no extra statement). An aborted transaction's counts are discarded with it.

use ecst_core::merge::Outcome;
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};
use std::cell::RefCell;
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub applied: i64,
    pub duplicate: i64,
    pub stale: i64,
    pub skipped: i64,
    pub conflicts: i64,
    pub dead_lettered: i64,
}

thread_local! {
    static PENDING: RefCell<BTreeMap<i32, Counts>> = const { RefCell::new(BTreeMap::new()) };
}

/// Counts `n` events with one outcome (`None`: dead-lettered).
fn add(stream_id: i32, outcome: Option<Outcome>, conflict: bool, n: i64) {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let c = p.entry(stream_id).or_default();
        match outcome {
            Some(Outcome::Applied) => c.applied += n,
            Some(Outcome::Duplicate) => c.duplicate += n,
            Some(Outcome::Stale) => c.stale += n,
            Some(Outcome::Skipped) => c.skipped += n,
            None => c.dead_lettered += n,
        }
        c.conflicts += conflict as i64 * n;
    });
}

/// Counts what happened to one event.
pub fn count(stream_id: i32, applied: &crate::engine::outcome::Applied) {
    count_many(stream_id, applied, 1);
}

/// Counts `n` events with the same outcome.
pub fn count_many(stream_id: i32, applied: &crate::engine::outcome::Applied, n: i64) {
    match applied {
        crate::engine::outcome::Applied::Done { outcome, conflict } => add(stream_id, Some(*outcome), *conflict, n),
        crate::engine::outcome::Applied::Rejected { conflict, .. } => add(stream_id, None, *conflict, n),
    }
}

/// This backend's counts not yet written (for `ecst.stats` inside the same transaction).
pub fn unflushed() -> Vec<(i32, Counts)> {
    PENDING.with(|p| p.borrow().iter().map(|(k, v)| (*k, *v)).collect())
}

fn flush() {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if pending.is_empty() {
        return;
    }
    let rows: Vec<serde_json::Value> = pending
        .iter()
        .map(|(id, c)| {
            serde_json::json!([id, c.applied, c.duplicate, c.stale, c.skipped, c.conflicts, c.dead_lettered])
        })
        .collect();
    // At pre-commit the statement's snapshot is gone: take one for the INSERT.
    // SAFETY: balanced push/pop around the statement, inside a live transaction.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    // A stream dropped in this same transaction has no row left to count against.
    Spi::connect_mut(|client| {
        crate::pg::spi::internal::run_once(
            client,
            "INSERT INTO ecst.stream_counters
         SELECT (r->>0)::int, (r->>1)::bigint, (r->>2)::bigint, (r->>3)::bigint, (r->>4)::bigint,
                (r->>5)::bigint, (r->>6)::bigint,
                CASE WHEN (r->>1)::bigint > 0 THEN clock_timestamp() END
         FROM jsonb_array_elements($1) r
         WHERE EXISTS (SELECT 1 FROM ecst.streams s WHERE s.id = (r->>0)::int)",
            &[JsonB(serde_json::Value::Array(rows)).into()],
        );
    });
    unsafe { pg_sys::PopActiveSnapshot() };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => flush(),
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => PENDING.with(|p| p.borrow_mut().clear()),
        _ => {}
    }
}

pub fn register_flush() {
    // SAFETY: registered once per backend from _PG_init.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}
