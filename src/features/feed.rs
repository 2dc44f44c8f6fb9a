//! `ecst.feed`: events applied within the statement that inserts them — `COPY ecst.feed (stream,
//! payload) FROM STDIN` or `INSERT INTO ecst.feed ... SELECT` — with nothing of them stored but
//! dead letters and retained events. The statement's own transaction is the durability: the
//! replica is up to date when it commits, and a rollback leaves nothing.
//!
//! `ecst.feed` is a view with three triggers: BEFORE STATEMENT opens a buffer, the INSTEAD OF row
//! trigger appends each row to it (and the row counts in the command tag), and AFTER STATEMENT
//! applies what is left. A buffer that reaches `ecst.feed_buffer` bytes of payload is applied
//! there and then, so memory is bounded by the setting, not by the statement's size. Each chunk
//! goes the inbox drain's way ([`inbox::apply_rows`]): by stream (routes resolved), each stream's
//! events to the engine in one run — collapsed per entity, decided by the core's fold, written
//! set-based — streams in name order and entities in key order, the lock order every entrance
//! keeps. Chunks apply in row order, so each entity's events apply in the order they were fed.
//!
//! Buffers form a stack (a replica's trigger may feed events while a chunk applies). A statement
//! that fails takes its buffer with it: an aborted subtransaction drops the buffers it opened,
//! an aborted transaction all of them. A transaction never commits with rows left unapplied.

use crate::engine::direct::InboxRow;
use crate::engine::outcome::ErrorPolicy;
use crate::features::inbox;
use crate::pg::gucs;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};

struct Buffer {
    /// The subtransaction of the statement that opened it.
    subxact: pg_sys::SubTransactionId,
    rows: Vec<InboxRow>,
    /// Bytes of payload buffered.
    bytes: usize,
    /// Rows fed by the statement so far (their order).
    seq: i64,
}

thread_local! {
    static STACK: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// BEFORE INSERT ... FOR EACH STATEMENT: a statement starts feeding.
pub fn begin_statement() {
    register_callbacks();
    // SAFETY: reads the current subtransaction's id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    STACK.with(|s| s.borrow_mut().push(Buffer { subxact, rows: Vec::new(), bytes: 0, seq: 0 }));
}

/// The INSTEAD OF row trigger: one row fed.
pub fn add_row(stream: Option<&str>, payload: Option<&str>) {
    let full = STACK.with(|s| {
        let mut stack = s.borrow_mut();
        let Some(buffer) = stack.last_mut() else {
            // A row without its statement's BEFORE trigger (it never happens): refuse rather
            // than buffer where nothing would apply it.
            crate::pg::errors::raise(
                pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "a row reached ecst.feed without its statement's trigger",
                Some("ecst.feed's triggers are part of the extension: do not drop or disable them."),
            )
        };
        buffer.seq += 1;
        buffer.bytes += payload.map_or(0, str::len) + stream.map_or(0, str::len) + ROW_OVERHEAD;
        buffer.rows.push(InboxRow {
            seq: buffer.seq,
            stream: stream.map(str::to_string),
            payload: payload.map(str::to_string),
            received_at: now(),
        });
        buffer.bytes >= limit()
    });
    if full {
        apply_buffered();
    }
}

/// AFTER INSERT ... FOR EACH STATEMENT: the statement's rows are all in; apply the rest.
pub fn end_statement() {
    apply_buffered();
    STACK.with(|s| s.borrow_mut().pop());
}

/// What a row costs in memory beside its text (the row, its two strings' headers).
const ROW_OVERHEAD: usize = std::mem::size_of::<InboxRow>() + 2 * std::mem::size_of::<usize>();

/// `ecst.feed_buffer` in bytes.
fn limit() -> usize {
    (gucs::FEED_BUFFER_KB.get().max(1) as usize) * 1024
}

fn now() -> pgrx::datum::TimestampWithTimeZone {
    // SAFETY: the transaction's start time, as now() gives it.
    let ts = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    // SAFETY: a TimestampTz is the datum of a timestamptz.
    unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(ts), false) }.expect("a timestamp")
}

/// Applies the rows of the innermost buffer and empties it.
fn apply_buffered() {
    let rows = STACK.with(|s| {
        let mut stack = s.borrow_mut();
        let buffer = stack.last_mut()?;
        buffer.bytes = 0;
        Some(std::mem::take(&mut buffer.rows))
    });
    let Some(rows) = rows.filter(|r| !r.is_empty()) else { return };
    Spi::connect_mut(|client| inbox::apply_rows(client, &rows, ErrorPolicy::Caller));
}

fn register_callbacks() {
    if CALLBACKS.with(|c| c.replace(true)) {
        return;
    }
    // SAFETY: backend-lifetime callbacks, registered once.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            STACK.with(|s| s.borrow_mut().clear())
        }
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            let left = STACK.with(|s| {
                let mut stack = s.borrow_mut();
                let rows: usize = stack.iter().map(|b| b.rows.len()).sum();
                stack.clear();
                rows
            });
            if left > 0 {
                crate::pg::errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("{left} rows fed to ecst.feed were not applied; the transaction is rolled back"),
                    Some("ecst.feed's triggers are part of the extension: do not drop or disable them."),
                );
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        STACK.with(|s| {
            let mut stack = s.borrow_mut();
            // Subtransaction ids grow: those at or after this one are this one's or its children's.
            while stack.last().is_some_and(|b| b.subxact >= my_subid) {
                stack.pop();
            }
        });
    }
}
