//! What happened to an event ([`Applied`]), and which errors raised while applying one make it a
//! dead letter rather than an error of the caller ([`ErrorPolicy`], [`last_try`]).

use crate::pg::errors;
use ecst_core::merge::Outcome;
use ecst_core::reject::Rejection;

/// What happened to one event.
#[derive(Debug, Clone)]
pub enum Applied {
    Done {
        outcome: Outcome,
        conflict: bool,
    },
    /// The event goes to the dead letters (with the SQLSTATE when PostgreSQL refused it).
    Rejected {
        rejection: Rejection,
        sqlstate: Option<String>,
        conflict: bool,
    },
}

/// Which PostgreSQL errors raised while applying one event make it a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// A SQL caller: data errors are dead letters; anything else (permissions, cancel...) is raised.
    Caller,
    /// The background worker has nobody to raise to: every error that is not about the session or
    /// server (cancel, out of memory, deadlock, internal) is a dead letter, so one poison event
    /// never stops the worker.
    Worker,
}

thread_local! {
    /// The worker's batch has failed [`LAST_TRY_AFTER`] times in a row on an error about the
    /// session (a serialization failure, a deadlock...): this time such an error is the event's,
    /// and makes it a dead letter, so that one event that always fails that way (a replica trigger
    /// raising 40001) cannot hold up the inbox forever. Only operator intervention (57: cancel,
    /// shutdown) still ends the batch.
    static LAST_TRY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Failed attempts of one worker batch (from the same inbox row) before the next is its last try.
pub const LAST_TRY_AFTER: u32 = 3;

/// Runs `work` as a batch's last try (see [`LAST_TRY`]) when `last` is true.
pub fn last_try<R>(last: bool, work: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            LAST_TRY.with(|l| l.set(false));
        }
    }
    LAST_TRY.with(|l| l.set(last));
    let _reset = Reset;
    work()
}

impl ErrorPolicy {
    pub fn dead_letters(self, sqlstate: &str) -> bool {
        match self {
            ErrorPolicy::Caller => errors::is_event_error(sqlstate),
            ErrorPolicy::Worker => {
                !errors::is_session_error(sqlstate) || (LAST_TRY.with(|l| l.get()) && !sqlstate.starts_with("57"))
            }
        }
    }
}

impl Applied {
    /// An event pg_ecst refused before PostgreSQL saw it (it goes to the dead letters).
    pub fn rejected(rejection: Rejection) -> Applied {
        Applied::Rejected { rejection, sqlstate: None, conflict: false }
    }
}
