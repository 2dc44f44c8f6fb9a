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

/// An event's result as a shard's node reports it to the coordinator (`engine::shards`): a JSON
/// array `[seq, outcome, conflict]`, or `[seq, "dead_lettered", conflict, code, message, sqlstate]`.
pub fn to_wire(seq: i32, applied: &Applied) -> serde_json::Value {
    match applied {
        Applied::Done { outcome, conflict } => serde_json::json!([seq, outcome.as_str(), conflict]),
        Applied::Rejected { rejection, sqlstate, conflict } => {
            serde_json::json!([seq, "dead_lettered", conflict, rejection.code.as_str(), rejection.message, sqlstate])
        }
    }
}

/// [`to_wire`]'s inverse: the sequence number and the result (`None`: not a result).
pub fn from_wire(v: &serde_json::Value) -> Option<(i32, Applied)> {
    use ecst_core::reject::RejectCode;
    let seq = i32::try_from(v.get(0)?.as_i64()?).ok()?;
    let conflict = v.get(2)?.as_bool()?;
    let applied = match v.get(1)?.as_str()? {
        "dead_lettered" => {
            let code = v.get(3)?.as_str()?;
            let code = *RejectCode::ALL.iter().find(|c| c.as_str() == code)?;
            Applied::Rejected {
                rejection: Rejection::new(code, v.get(4)?.as_str()?),
                sqlstate: v.get(5)?.as_str().map(str::to_string),
                conflict,
            }
        }
        outcome => {
            let outcome = [Outcome::Applied, Outcome::Duplicate, Outcome::Stale, Outcome::Skipped]
                .into_iter()
                .find(|o| o.as_str() == outcome)?;
            Applied::Done { outcome, conflict }
        }
    };
    Some((seq, applied))
}

/// How an error policy (and a worker's last try) travels to a shard's node.
pub fn policy_name(policy: ErrorPolicy) -> &'static str {
    match policy {
        ErrorPolicy::Caller => "caller",
        ErrorPolicy::Worker if LAST_TRY.with(|l| l.get()) => "worker_last",
        ErrorPolicy::Worker => "worker",
    }
}

/// [`policy_name`]'s inverse: the policy, and whether this is a last try.
pub fn policy_from_name(name: &str) -> Option<(ErrorPolicy, bool)> {
    match name {
        "caller" => Some((ErrorPolicy::Caller, false)),
        "worker" => Some((ErrorPolicy::Worker, false)),
        "worker_last" => Some((ErrorPolicy::Worker, true)),
        _ => None,
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;
    use ecst_core::reject::RejectCode;

    #[test]
    fn results_cross_nodes_unchanged() {
        let cases = [
            Applied::Done { outcome: Outcome::Applied, conflict: false },
            Applied::Done { outcome: Outcome::Stale, conflict: true },
            Applied::Done { outcome: Outcome::Duplicate, conflict: false },
            Applied::Done { outcome: Outcome::Skipped, conflict: true },
            Applied::Rejected {
                rejection: Rejection::new(RejectCode::WriteFailed, "a \"quoted\" message\nover lines"),
                sqlstate: Some("23514".into()),
                conflict: false,
            },
            Applied::rejected(Rejection::new(RejectCode::Conflict, "")),
        ];
        for (seq, applied) in cases.iter().enumerate() {
            let text = to_wire(seq as i32, applied).to_string();
            let (back_seq, back) = from_wire(&serde_json::from_str(&text).unwrap()).unwrap();
            assert_eq!(back_seq, seq as i32);
            assert_eq!(format!("{back:?}"), format!("{applied:?}"));
        }
        assert!(from_wire(&serde_json::json!([1, "nonsense", false])).is_none());
        for name in ["caller", "worker", "worker_last"] {
            let (policy, last) = policy_from_name(name).unwrap();
            assert_eq!(last_try(last, || policy_name(policy)), name);
        }
    }
}
