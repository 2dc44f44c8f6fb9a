//! Which transactions inserted into the inbox, counted server-wide in shared memory, for the
//! drainers' [`super::Cursor`]; and this backend's own inbox inserts.
//!
//! Transactions that inserted into the inbox, server-wide: `begun` counts those about to commit
//! (before their rows become visible), `ended` those that have committed or aborted since (after
//! their rows became visible, if they did). A drainer whose claim's snapshot came after `begun`
//! read `n`, and whose previous claim's snapshot came before `ended` read `n`, knows that no
//! inbox row became visible in between (`inbox::Cursor`). A prepared transaction is counted as
//! begun and never as ended: its `COMMIT PREPARED` runs in another session.

use pgrx::atomics::PgAtomic;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The counters (see the module doc).
#[derive(Default)]
pub struct InboxCommits {
    begun: AtomicU64,
    ended: AtomicU64,
}

unsafe impl PGRXSharedMemory for InboxCommits {}

static INBOX_COMMITS: PgAtomic<InboxCommits> = unsafe { PgAtomic::new(c"pg_ecst_inbox_commits") };

thread_local! {
    static PRELOADED: Cell<bool> = const { Cell::new(false) };
    /// This transaction inserted into the inbox (its statement trigger ran).
    static INSERTED: Cell<bool> = const { Cell::new(false) };
    /// ... and was counted in `InboxCommits::begun`.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
    /// Inbox insert statements of this backend, counted as they end (their rows visible to the
    /// transaction's later commands).
    static OWN_INSERTS: Cell<u64> = const { Cell::new(0) };
}

/// Called while the library is preloaded (`shared_preload_libraries`): the counters' shared memory.
// pgrx's pg_shmem_init! tests a `pg13` feature, which this crate does not have.
#[allow(unexpected_cfgs)]
pub fn init_shared_memory() {
    pg_shmem_init!(INBOX_COMMITS);
    PRELOADED.with(|p| p.set(true));
}

/// Whether shared memory (and so the workers) exists in this server.
pub fn preloaded() -> bool {
    // In backends forked from a postmaster that preloaded us, the flag was set before fork.
    PRELOADED.with(|p| p.get())
}

/// Notes that the current transaction inserted into the inbox: it is counted in `InboxCommits`,
/// and wakes the workers when it commits ([`on_xact_event`]).
pub fn inserted() {
    OWN_INSERTS.with(|n| n.set(n.get() + 1));
    if preloaded() {
        INSERTED.with(|w| w.set(true));
    }
}

/// `InboxCommits::begun` (`None` without shared memory: pg_ecst is not preloaded).
pub fn begun() -> Option<u64> {
    preloaded().then(|| INBOX_COMMITS.get().begun.load(Ordering::SeqCst))
}

/// `InboxCommits::ended` (`None` without shared memory).
pub fn ended() -> Option<u64> {
    preloaded().then(|| INBOX_COMMITS.get().ended.load(Ordering::SeqCst))
}

/// Inbox insert statements this backend has run.
pub fn own_inserts() -> u64 {
    OWN_INSERTS.with(|n| n.get())
}

/// The transaction callback's part (called by the worker's, which also wakes workers): counts
/// the transaction. Returns whether a transaction that inserted into the inbox committed.
pub fn on_xact_event(event: pg_sys::XactEvent::Type) -> bool {
    use pg_sys::XactEvent::*;
    let count = |counter: fn(&InboxCommits) -> &AtomicU64| {
        counter(INBOX_COMMITS.get()).fetch_add(1, Ordering::SeqCst);
    };
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE if INSERTED.with(|i| i.get()) => {
            count(|c| &c.begun);
            COUNTED.with(|c| c.set(event == XACT_EVENT_PRE_COMMIT));
            false
        }
        XACT_EVENT_COMMIT => {
            if COUNTED.with(|c| c.replace(false)) {
                count(|c| &c.ended);
            }
            INSERTED.with(|i| i.replace(false))
        }
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE => {
            if COUNTED.with(|c| c.replace(false)) {
                count(|c| &c.ended);
            }
            INSERTED.with(|i| i.set(false));
            false
        }
        _ => false,
    }
}
