//! Running a piece of work in an internal subtransaction, as PL/pgSQL's exception blocks do:
//! on error (or when the work returns `Err`) everything it wrote is rolled back and the
//! caller goes on in the same transaction. And what the paths that depend on it ask of the
//! transaction: whether it is READ COMMITTED.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;

/// What came out of a subtransaction.
pub enum SubResult<T, E> {
    /// The work succeeded and was kept.
    Committed(T),
    /// The work returned `Err`; its writes were rolled back.
    RolledBack(E),
    /// PostgreSQL (or Rust) raised an error; its writes were rolled back.
    Failed(Box<CaughtError>),
}

pub fn run<T, E>(work: impl FnOnce() -> Result<T, E>) -> SubResult<T, E> {
    // SAFETY: the standard internal-subtransaction protocol (see pl_exec.c's exec_stmt_block):
    // remember the memory context and resource owner, and restore both after commit or rollback.
    // Kept as addresses so the catch closure is trivially unwind-safe.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext as usize, pg_sys::CurrentResourceOwner as usize) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context as pg_sys::MemoryContext);
    }
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context as pg_sys::MemoryContext);
        pg_sys::CurrentResourceOwner = owner as pg_sys::ResourceOwner;
    };
    let mut work = Some(work);
    PgTryBuilder::new(AssertUnwindSafe(|| {
        let result = (work.take().expect("work runs once"))();
        match result {
            Ok(value) => {
                unsafe { pg_sys::ReleaseCurrentSubTransaction() };
                restore();
                SubResult::Committed(value)
            }
            Err(e) => {
                unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
                restore();
                SubResult::RolledBack(e)
            }
        }
    }))
    .catch_others(move |caught: CaughtError| {
        unsafe {
            pg_sys::MemoryContextSwitchTo(context as pg_sys::MemoryContext);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        restore();
        SubResult::Failed(Box::new(caught))
    })
    .execute()
}

/// Whether the current transaction is READ COMMITTED: each statement (and each claim, each row
/// lookup made for one) sees a snapshot taken for it, not one taken when the transaction began.
pub fn read_committed() -> bool {
    // SAFETY: a plain read of the transaction's isolation level.
    unsafe { pg_sys::XactIsoLevel == pg_sys::XACT_READ_COMMITTED as i32 }
}
