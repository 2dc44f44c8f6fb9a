//! `ecst.feed`: events applied within the statement that inserts them — `COPY ecst.feed (stream,
//! payload) FROM STDIN` or `INSERT INTO ecst.feed ... SELECT` — with nothing of them stored but
//! dead letters and retained events. The statement's own transaction is the durability: the
//! replica is up to date when it commits, and a rollback leaves nothing.
//!
//! `ecst.feed` is a view with three triggers: BEFORE STATEMENT opens a sorter
//! ([`crate::features::sorted`]), the INSTEAD OF row trigger adds each row to it (and the row
//! counts in the command tag), and AFTER STATEMENT applies the rows, sorted by (stream, entity, row
//! order) and in chunks, memory bounded by `ecst.feed_buffer`.
//!
//! Buffers form a stack (a replica's trigger may feed events while a chunk applies). A statement
//! that fails takes its buffer with it: its sort lives in the memory of the (sub)transaction
//! running the statement, and an aborted subtransaction drops the buffers it opened, an aborted
//! transaction all of them. A transaction never commits with rows left unapplied.

use crate::engine::outcome::ErrorPolicy;
use crate::features::sorted::Sorter;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};

struct Buffer {
    /// The subtransaction of the statement that opened it.
    subxact: pg_sys::SubTransactionId,
    sorter: Sorter,
    /// When the transaction started (`now()`), each row's arrival time.
    now: TimestampWithTimeZone,
}

thread_local! {
    static STACK: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// BEFORE INSERT ... FOR EACH STATEMENT: a statement starts feeding.
pub fn begin_statement() {
    register_callbacks();
    // SAFETY: reads the current subtransaction's id, and the transaction's start time (now()).
    let (subxact, now) =
        unsafe { (pg_sys::GetCurrentSubTransactionId(), pg_sys::GetCurrentTransactionStartTimestamp()) };
    // SAFETY: a TimestampTz is the datum of a timestamptz.
    let now = unsafe { TimestampWithTimeZone::from_datum(pg_sys::Datum::from(now), false) }.expect("a timestamp");
    let sorter = Sorter::new(ErrorPolicy::Caller);
    STACK.with(|s| s.borrow_mut().push(Buffer { subxact, sorter, now }));
}

/// The INSTEAD OF row trigger: one row fed.
pub fn add_row(stream: Option<&str>, payload: Option<&str>) {
    STACK.with(|s| {
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
        let seq = buffer.sorter.rows() + 1;
        buffer.sorter.add(seq, stream, payload, buffer.now);
    })
}

/// AFTER INSERT ... FOR EACH STATEMENT: the statement's rows are all in; apply them, sorted.
pub fn end_statement() {
    let Some(buffer) = STACK.with(|s| s.borrow_mut().pop()) else { return };
    buffer.sorter.apply();
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
        // The sorts' memory goes with the transaction's; only forget them.
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            STACK.with(|s| s.borrow_mut().clear())
        }
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            let left = STACK.with(|s| {
                let mut stack = s.borrow_mut();
                let rows: i64 = stack.iter().map(|b| b.sorter.rows()).sum();
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
