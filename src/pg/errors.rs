//! Raising errors with a proper SQLSTATE and hint, and reading SQLSTATEs of caught errors.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR with `code`, `message` and an optional hint. Never returns.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "pg_ecst");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR returned")
}

/// The five-character SQLSTATE of an error code (e.g. `22P02`).
pub fn sqlstate(code: PgSqlErrorCode) -> String {
    let mut packed = code as i32;
    let mut s = String::with_capacity(5);
    for _ in 0..5 {
        s.push((b'0' + (packed & 0x3F) as u8) as char);
        packed >>= 6;
    }
    s
}

/// Whether an error raised while applying one event is about that event's data — so the
/// event goes to the dead letters — rather than about the session or the server (cancel,
/// permissions, out of memory, deadlock...), which must reach the caller.
pub fn is_event_error(sqlstate: &str) -> bool {
    matches!(
        &sqlstate[..2],
        "22" // data exception (bad value, overflow, invalid text representation...)
            | "23" // integrity constraint (NOT NULL, CHECK, FK, other unique indexes)
            | "P0" // RAISE EXCEPTION in a user trigger on the replica
            | "2F" | "38" | "39" // errors from user functions/triggers
    )
}

/// Errors about the session or the server rather than any one event: operator intervention
/// (cancel, shutdown), insufficient resources, system errors, serialization failures and
/// deadlocks, connection problems, internal errors. The worker retries its batch on these.
pub fn is_session_error(sqlstate: &str) -> bool {
    // 55P03: a lock wait that timed out (lock_timeout) — transient, about the moment, not the event.
    matches!(&sqlstate[..2], "57" | "53" | "54" | "58" | "XX" | "40" | "08" | "25") || sqlstate == "55P03"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_unpack() {
        assert_eq!(sqlstate(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION), "22P02");
        assert_eq!(sqlstate(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION), "23505");
        assert!(is_event_error("22P02"));
        assert!(!is_event_error("57014"));
        assert!(!is_event_error("42501"));
        assert!(is_session_error("57014") && is_session_error("40P01"));
        assert!(!is_session_error("42501") && !is_session_error("23505"));
    }
}
